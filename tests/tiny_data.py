"""A tiny dataset in the on-disk format of ``trainer.data.manifest``, with a learnable signal.

The label of a row is drawn from ``sigmoid(sum_f w_f[id_f] + v . dense)`` with planted per-id
effects ``w_f`` (multi-hot fields sum the effects of their ids), so a model that learns the
embeddings reaches an AUC well above 0.5 within an epoch or two. Everything is seeded: two calls
with the same arguments write byte-identical Parquet files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embdim.trainer.data.manifest import Manifest, SparseField, SplitInfo, counts_path, write_manifest

# (name, num_embeddings, multi_hot): small tables so the test models stay tiny.
FIELDS = (("c0", 40, False), ("c1", 24, False), ("c2", 12, False), ("c3", 30, True))
NUM_DENSE = 3


def write_tiny_dataset(
    out: str | Path,
    *,
    num_rows: dict[str, int] | None = None,
    seed: int = 0,
    row_group_size: int = 128,
) -> Manifest:
    """Writes train/valid/test splits and ``dataset.json`` into ``out``; returns the manifest."""
    out = Path(out)
    num_rows = num_rows or {"train": 2048, "valid": 512, "test": 512}
    rng = np.random.default_rng(seed)
    # The planted truth: strong per-id effects (std 1.5) and a weaker dense effect.
    effects = {name: rng.normal(0.0, 1.5, size=n) for name, n, _ in FIELDS}
    dense_weight = rng.normal(0.0, 0.5, size=NUM_DENSE)
    counts = {name: np.zeros(n, dtype=np.int64) for name, n, _ in FIELDS}
    splits = {}
    for split, rows in num_rows.items():
        columns: dict[str, pa.Array] = {}
        logit = np.zeros(rows)
        dense = rng.exponential(1.0, size=(rows, NUM_DENSE)).astype(np.float32)
        dense = np.log1p(dense)  # the converters' log(1 + x) transform
        logit += dense @ dense_weight
        for name, n, multi_hot in FIELDS:
            if multi_hot:
                lengths = rng.integers(0, 4, size=rows)  # 0..3 ids, empty bags included
                flat = rng.integers(0, n, size=int(lengths.sum()))
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                logit += np.add.reduceat(np.append(effects[name][flat], 0.0), offsets[:-1]) * (lengths > 0)
                columns[name] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int64()))
                ids = flat
            else:
                ids = rng.integers(0, n, size=rows)
                logit += effects[name][ids]
                columns[name] = pa.array(ids, pa.int64())
            if split == "train":
                counts[name] += np.bincount(ids, minlength=n)
        label = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        table = pa.table({
            "label": pa.array(label),
            **{f"i{j}": pa.array(dense[:, j]) for j in range(NUM_DENSE)},
            **columns,
        })
        rel = f"{split}/part-00000.parquet"
        (out / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / rel, row_group_size=row_group_size)
        splits[split] = SplitInfo(files=[rel], num_rows=rows)
    for name, _, _ in FIELDS:
        path = counts_path(out, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, counts[name])
    manifest = Manifest(
        label="label",
        dense=[f"i{j}" for j in range(NUM_DENSE)],
        sparse=[SparseField(name=name, num_embeddings=n, multi_hot=mh) for name, n, mh in FIELDS],
        splits=splits,
        source="tests.tiny_data",
        extra={"seed": seed},
    )
    write_manifest(out, manifest)
    return manifest


def tiny_run_flags(embedding_dim: int, *, epochs: int) -> list[str]:
    """``--set`` flags for a seconds-long search/retrain on this data: a tiny DLRM and small
    method settings (tests/test_phases.py, tests/test_run_compare.py)."""
    settings = [
        "data.batch_size=64", "data.eval_batch_size=128", f"model.embedding_dim={embedding_dim}",
        f"model.dense_arch_layer_sizes=[16, {embedding_dim}]", "model.over_arch_layer_sizes=[16, 1]",
        f"train.epochs={epochs}", "train.log_every=16", "train.progress_bar=false", "optim.dense_lr=0.01",
        "optim.sparse_lr=0.1",
        "optembed.generations=3", "optembed.mutation_num=4", "optembed.crossover_num=4", "optembed.keep_num=4",
        "pme.saliency_batches=4", "mde.md_threshold=0",
    ]
    return [a for s in settings for a in ("--set", s)]
