"""Synthetic Criteo-shaped CTR data with a planted, recorded ground truth.

Shape: 13 dense features ``I1..I13`` (log-transformed counts, like the converters' output) and 26
sparse fields ``C1..C26`` whose cardinalities follow a Criteo profile (``preset``), scaled down in
log space so the largest is about ``num_rows / 2``, then capped by ``cardinality_cap``. Field ``f``
has ids ``1..K_f`` (``num_embeddings = K_f + 1``; id 0 is OOV, used with a small per-field rate),
drawn from a bounded power law (Zipf, exponent 1.05-1.2, by inverse CDF; id 1 is the most
frequent). The last ``multi_hot_fields`` fields are multi-hot: 1..L ids per row (``list<int64>``).

Planted model (formula ``planted-v1``)::

    u_f(id) ~ N(0, I_{r_f})            from a counter-based hash of (seed, f, id); u_f(0) = 0
    logit   = bias
            + sum_f        signal_f * <u_f(id_f), v_f>                 (v_f: a unit vector)
            + sum_(f,g,m)  weight_fg * <u_f(id_f)[:m], u_g(id_g)[:m]> / sqrt(m)
            + sum_j        w_j * (I_j - c_j)
    label   ~ Bernoulli(sigmoid(logit))

(for a multi-hot field, u_f is averaged over the row's ids). Every field has a signal strength
``signal_f`` (exactly 0 for the pure-noise fields, which are in no pair either) and a true rank
``r_f`` in {0, 2, 4, 8, 16} (0 for noise fields); the signal fields are paired so that each one
interacts with a partner over all of its ``r_f`` dimensions, so an embedding narrower than ``r_f``
cannot represent it exactly. ``bias`` is calibrated for a positive rate of about 0.25. No per-id
table is ever stored, so cardinalities of 1e8 and more cost nothing but their id counts.

The truth is recorded in ``manifest.extra``: ``planted`` = {field: {"signal", "rank", "index",
"cardinality", "zipf_exponent", "oov_rate", "direction", "partners"}}, ``planted_model`` =
{"formula_version", "seed", "bias", "pairs", "dense", ...}, plus ``seed`` and ``formula_version``.
``field_contribution(extra, field, ids)`` recomputes ``signal_f * <u_f(id), v_f>``.

Determinism: file ``i`` is generated from ``(seed, i)`` (and its row count) alone, in fixed chunks
of ``GEN_CHUNK`` rows, so the same ``(seed, num_rows, options)`` gives byte-identical Parquet files
whatever the number of worker processes. Rows are cut train 80% / valid 10% / test 10% in that
order (whole files per split; file indices run over train, then valid, then test files).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from embdim.trainer.data.manifest import Manifest, SparseField, SplitInfo, write_manifest
from embdim.io import die_with_parent
from embdim.trainer.data.writer import (
    DEFAULT_ROW_GROUP_SIZE,
    SplitWriter,
    claim_output,
    list_array,
    output_schema,
    save_counts,
    staged_output,
)

FORMULA_VERSION = "planted-v1"
LABEL = "label"
NUM_DENSE = 13
GEN_CHUNK = 65536
"""Rows generated per random-stream chunk (fixed: the data does not depend on row_group_size)."""
DEFAULT_ROWS_PER_FILE = 1 << 20
RANKS = (0, 2, 4, 8, 16)
MULTI_HOT_MAX_LEN = 5
TARGET_POSITIVE_RATE = 0.25
SIGNAL_VARIANCE = 3.0
"""Sum of squared main-effect signals and pair weights (the planted logit's variance, roughly)."""
NOISE_FRACTION = 0.3
CALIBRATION_ROWS = 2 * GEN_CHUNK

CRITEO_KAGGLE_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]
"""Distinct values of C1..C26 in the Criteo Kaggle train set."""
CRITEO_1TB_CARDINALITIES = [
    45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10, 2209, 11267,
    128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35,
]
"""C1..C26 of the Criteo 1TB click logs (values seen at least 3 times; the torchrec DLRM table sizes)."""
PRESETS = {"criteo": CRITEO_KAGGLE_CARDINALITIES, "criteo-1tb": CRITEO_1TB_CARDINALITIES}

_TAG_PLAN, _TAG_ROWS, _TAG_CALIB = 1, 2, 3
_M64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------
# primitives


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorized SplitMix64 finalizer over uint64 (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _field_key(seed: int, field_index: int) -> np.uint64:
    k = splitmix64(np.array([seed & _M64], np.uint64))
    k = splitmix64(k ^ np.uint64((0xD1B54A32D192ED03 * (field_index + 1)) & _M64))
    return k[0]


def latent(seed: int, field_index: int, ids: np.ndarray, rank: int) -> np.ndarray:
    """u_f(id) in R^rank for each id: standard normal entries from a hash of (seed, field, id, k)
    (Box-Muller on the two 32-bit halves of one SplitMix64 output); rows of id 0 (OOV) are zero."""
    ids = np.asarray(ids, np.int64)
    if rank == 0:
        return np.zeros((len(ids), 0))
    with np.errstate(over="ignore"):
        base = splitmix64(ids.astype(np.uint64) ^ _field_key(seed, field_index))
        ks = (np.arange(1, rank + 1, dtype=np.uint64) * np.uint64(0xBF58476D1CE4E5B9))
        h = splitmix64(base[:, None] + ks[None, :])
    u1 = ((h >> np.uint64(32)).astype(np.float64) + 0.5) * (1.0 / 4294967296.0)
    u2 = (h & np.uint64(0xFFFFFFFF)).astype(np.float64) * (1.0 / 4294967296.0)
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    z[ids == 0] = 0.0
    return z


def zipf_ids(u: np.ndarray, n: int, exponent: float) -> np.ndarray:
    """Bounded power law on 1..n by inverse CDF of the continuous density ~ x^-a on [1, n+1):
    id 1 is the most frequent. ``u`` are uniforms in [0, 1)."""
    u = np.asarray(u, np.float64)
    a = float(exponent)
    if abs(a - 1.0) < 1e-9:
        x = np.exp(u * math.log(n + 1.0))
    else:
        top = (n + 1.0) ** (1.0 - a)
        x = (1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - a))
    return np.clip(np.floor(x), 1, n).astype(np.int64)


def scaled_cardinalities(profile: Sequence[int], num_rows: int, cap: int | None = None) -> list[int]:
    """The profile compressed in log space so that its largest value is at most ~num_rows/2
    (order and relative spread kept: small fields stay small), then capped by ``cap``."""
    limit = max(2, num_rows // 2)
    top = max(profile)
    cards = list(profile)
    if top > limit:
        e = math.log(limit) / math.log(top)
        cards = [max(2, int(round(p ** e))) for p in profile]
    if cap is not None:
        cards = [min(c, int(cap)) for c in cards]
    return [max(1, int(c)) for c in cards]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------------------------
# the planted model


@dataclass
class _Field:
    name: str
    index: int
    cardinality: int  # real ids 1..cardinality
    zipf_exponent: float
    oov_rate: float
    multi_hot: bool
    signal: float = 0.0
    rank: int = 0
    direction: np.ndarray | None = None


@dataclass
class _Plan:
    seed: int
    fields: list[_Field]
    pairs: list[tuple[int, int, int, float]]  # (f, g, dims, weight)
    dense_mu: np.ndarray
    dense_sigma: np.ndarray
    dense_missing: np.ndarray
    dense_weight: np.ndarray
    dense_center: np.ndarray
    multi_hot_max_len: int
    bias: float = 0.0


def _allowed_rank(card: int) -> int:
    return max(r for r in RANKS if r <= max(card, 2))


def _make_plan(seed: int, cards: list[int], multi_hot_fields: int, multi_hot_max_len: int) -> _Plan:
    rng = np.random.default_rng([seed & _M64, _TAG_PLAN])
    n = len(cards)
    fields = []
    for i, c in enumerate(cards):
        fields.append(_Field(
            name=f"C{i + 1}", index=i, cardinality=int(c),
            zipf_exponent=round(float(rng.uniform(1.05, 1.2)), 4),
            oov_rate=round(float(rng.uniform(0.0, 0.01)), 5),
            multi_hot=i >= n - multi_hot_fields,
        ))
    # noise fields; signal fields paired with a neighbour in cardinality, each pair sharing one rank
    # (ranks dealt from a shuffled balanced list so every level appears, clipped to what the
    # cardinalities can carry)
    n_noise = min(int(round(NOISE_FRACTION * n)), n - 1)
    order = rng.permutation(n)
    noise = sorted(order[:n_noise].tolist())
    signal = sorted(order[n_noise:].tolist(), key=lambda i: (cards[i], i))
    n_pairs = len(signal) // 2
    deck = [RANKS[1 + k % (len(RANKS) - 1)] for k in range(max(n_pairs, 1))]
    deck = [int(r) for r in rng.permutation(deck)]
    raw_pairs: list[tuple[int, int, int, float]] = []
    for k in range(n_pairs):
        f, g = signal[2 * k], signal[2 * k + 1]
        r = min(deck[k], _allowed_rank(cards[f]), _allowed_rank(cards[g]))
        fields[f].rank = fields[g].rank = r
        raw_pairs.append((f, g, r, float(rng.uniform(0.3, 0.8))))
    if len(signal) % 2 == 1:
        last = signal[-1]  # the largest: pair it with the previous pair's larger field
        if len(signal) == 1:
            fields[last].rank = min(deck[0], _allowed_rank(cards[last]))
        else:
            partner = signal[-2]
            fields[last].rank = r = fields[partner].rank
            raw_pairs.append((last, partner, r, float(rng.uniform(0.3, 0.8))))
    raw_signal = {f: float(math.exp(rng.uniform(math.log(0.1), 0.0))) for f in signal}  # weak..strong
    total = sum(s * s for s in raw_signal.values()) + sum(w * w for *_, w in raw_pairs)
    scale = math.sqrt(SIGNAL_VARIANCE / total)
    for f in signal:
        fields[f].signal = round(raw_signal[f] * scale, 4)
        v = rng.normal(size=fields[f].rank)
        fields[f].direction = np.round(v / np.linalg.norm(v), 6)
    for f in noise:
        fields[f].signal, fields[f].rank = 0.0, 0
    pairs = [(f, g, m, round(w * scale, 4)) for f, g, m, w in raw_pairs]
    mu = np.round(rng.uniform(0.5, 4.0, NUM_DENSE), 4)
    sigma = np.round(rng.uniform(0.5, 1.5, NUM_DENSE), 4)
    missing = np.round(rng.uniform(0.0, 0.4, NUM_DENSE), 4)
    weight = np.round(rng.normal(0.0, 0.1, NUM_DENSE), 4)
    center = np.round(mu * (1 - missing), 4)  # about the mean of log1p(floor(lognormal))
    return _Plan(seed=seed, fields=fields, pairs=pairs, dense_mu=mu, dense_sigma=sigma, dense_missing=missing,
                 dense_weight=weight, dense_center=center, multi_hot_max_len=multi_hot_max_len)


def _latent_rows(seed: int, field_index: int, ids: np.ndarray, rank: int) -> np.ndarray:
    """latent() per row, hashing each distinct id once (Zipf-distributed ids repeat a lot)."""
    uniq, inv = np.unique(ids, return_inverse=True)
    if len(uniq) > 0.7 * len(ids):
        return latent(seed, field_index, ids, rank)
    return latent(seed, field_index, uniq, rank)[inv.reshape(-1)]


def _gen_chunk(plan: _Plan, rng: np.random.Generator, n: int):
    """Rows of one chunk: (dense list, sparse list of int64 arrays or (offsets, ids), logit w/o bias)."""
    dense = []
    z = np.zeros(n)
    for j in range(NUM_DENSE):
        raw = np.floor(np.exp(rng.normal(plan.dense_mu[j], plan.dense_sigma[j], n)))
        raw[rng.random(n) < plan.dense_missing[j]] = 0.0
        d = np.log1p(raw).astype(np.float32)
        dense.append(d)
        z += plan.dense_weight[j] * (d.astype(np.float64) - plan.dense_center[j])
    sparse = []
    lat: dict[int, np.ndarray] = {}
    for f in plan.fields:
        if f.multi_hot:
            lengths = rng.integers(1, plan.multi_hot_max_len + 1, n)
            offsets = np.zeros(n + 1, np.int64)
            np.cumsum(lengths, out=offsets[1:])
            total = int(offsets[-1])
            ids = zipf_ids(rng.random(total), f.cardinality, f.zipf_exponent)
            ids[rng.random(total) < f.oov_rate] = 0
            sparse.append((offsets, ids))
            if f.rank:
                u = _latent_rows(plan.seed, f.index, ids, f.rank)
                lat[f.index] = np.add.reduceat(u, offsets[:-1], axis=0) / lengths[:, None]
        else:
            ids = zipf_ids(rng.random(n), f.cardinality, f.zipf_exponent)
            ids[rng.random(n) < f.oov_rate] = 0
            sparse.append(ids)
            if f.rank:
                lat[f.index] = _latent_rows(plan.seed, f.index, ids, f.rank)
    for f in plan.fields:
        if f.signal and f.rank:
            z += f.signal * (lat[f.index] @ f.direction)
    for f, g, m, w in plan.pairs:
        z += w * np.einsum("ij,ij->i", lat[f][:, :m], lat[g][:, :m]) / math.sqrt(m)
    return dense, sparse, z


def _calibrate(plan: _Plan) -> float:
    rng = np.random.default_rng([plan.seed & _M64, _TAG_CALIB])
    z = np.concatenate([_gen_chunk(plan, rng, GEN_CHUNK)[2] for _ in range(CALIBRATION_ROWS // GEN_CHUNK)])
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if _sigmoid(mid + z).mean() > TARGET_POSITIVE_RATE:
            hi = mid
        else:
            lo = mid
    return round((lo + hi) / 2, 6)


def field_contribution(extra: dict, field_name: str, ids: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """signal_f * <u_f(id), v_f> per row, from the truth recorded in ``manifest.extra`` (for a
    multi-hot field pass a list of id lists: the bag mean is used)."""
    p = extra["planted"][field_name]
    seed = int(extra["planted_model"]["seed"])
    if p["rank"] == 0 or p["signal"] == 0:
        return np.zeros(len(ids))
    v = np.asarray(p["direction"], np.float64)
    if len(ids) and not np.isscalar(ids[0]) and not isinstance(ids, np.ndarray):
        return np.array([p["signal"] * latent(seed, p["index"], np.asarray(b, np.int64), p["rank"]).mean(0) @ v
                         for b in ids])
    return p["signal"] * (latent(seed, p["index"], np.asarray(ids, np.int64), p["rank"]) @ v)


# --------------------------------------------------------------------------------------------
# files


@dataclass
class _FileTask:
    stage: str
    split: str
    index_in_split: int
    file_index: int
    num_rows: int
    row_group_size: int


def _schema(plan: _Plan) -> pa.Schema:
    return output_schema(LABEL, [f"I{j + 1}" for j in range(NUM_DENSE)], [f.name for f in plan.fields],
                         [f.name for f in plan.fields if f.multi_hot])


def _write_file(plan: _Plan, task: _FileTask) -> tuple[int, int]:
    schema = _schema(plan)
    w = SplitWriter(task.stage, task.split, schema, row_group_size=task.row_group_size, rows_per_file=None,
                    first_index=task.index_in_split)
    positives = 0
    try:
        for c, start in enumerate(range(0, task.num_rows, GEN_CHUNK)):
            n = min(GEN_CHUNK, task.num_rows - start)
            rng = np.random.default_rng([plan.seed & _M64, _TAG_ROWS, task.file_index, c])
            dense, sparse, z = _gen_chunk(plan, rng, n)
            label = (rng.random(n) < _sigmoid(z + plan.bias)).astype(np.float32)
            positives += int(label.sum())
            arrays = [pa.array(label, pa.float32())] + [pa.array(d, pa.float32()) for d in dense]
            for s in sparse:
                arrays.append(list_array(*s) if isinstance(s, tuple) else pa.array(s, pa.int64()))
            w.write(pa.Table.from_arrays(arrays, schema=schema))
        info = w.close()
    except BaseException:
        w.abort()
        raise
    return info.num_rows, positives


_WORKER_PLAN: _Plan | None = None


def _init_worker(plan: _Plan, parent: int) -> None:
    global _WORKER_PLAN
    # A worker of a killed build would go on writing into its staging folder, even after the next
    # build of the same --out has removed it (and so recreate it).
    die_with_parent(signal.SIGKILL, parent)
    _WORKER_PLAN = plan


def _run_task(task: _FileTask) -> tuple[int, int, int]:
    assert _WORKER_PLAN is not None
    rows, pos = _write_file(_WORKER_PLAN, task)
    return task.file_index, rows, pos


def _count_field(args: tuple[str, str, int, list[str]]) -> str:
    """Train-split id counts of one field (np.bincount over row groups), saved to counts/<field>.npy."""
    stage, name, num_embeddings, files = args
    counts = np.zeros(num_embeddings, np.int64)
    for rel in files:
        pf = pq.ParquetFile(Path(stage) / rel)
        for b in pf.iter_batches(columns=[name], batch_size=1 << 20):
            col = b.column(0)
            if pa.types.is_list(col.type):
                col = col.flatten()
            ids = col.to_numpy(zero_copy_only=False)
            counts += np.bincount(ids, minlength=num_embeddings)[:num_embeddings]
    save_counts(stage, name, counts)
    return name


def _split_plan(num_rows: int, num_files: int) -> list[tuple[str, int, int]]:
    """[(split, index_in_split, rows)] in file order: train 80%, valid 10%, test 10% of the rows."""
    n_eval = num_rows // 10
    n_train = num_rows - 2 * n_eval
    k_eval = max(1, int(round(num_files * 0.1)))
    k_train = num_files - 2 * k_eval
    if k_train < 1:
        raise ValueError(f"num_files={num_files}: need at least 3 files (train, valid, test)")
    out = []
    for split, rows, k in (("train", n_train, k_train), ("valid", n_eval, k_eval), ("test", n_eval, k_eval)):
        k = max(1, min(k, rows)) if rows else 0
        for i in range(k):
            out.append((split, i, rows // k + (1 if i < rows % k else 0)))
    return out


def generate_synthetic(out: str | Path, *, num_rows: int = 100_000, seed: int = 0, preset: str = "criteo",
                       num_files: int | None = None, workers: int | None = None,
                       row_group_size: int = DEFAULT_ROW_GROUP_SIZE, cardinality_cap: int | None = None,
                       multi_hot_fields: int = 0, multi_hot_max_len: int = MULTI_HOT_MAX_LEN,
                       cardinalities: Sequence[int] | None = None, progress: bool = True,
                       overwrite: bool = False) -> Manifest:
    """Writes a synthetic dataset with a planted model to ``out`` (see the module docstring).

    ``cardinalities`` (ids per field, id 0 excluded) overrides the preset and the num_rows scaling
    (``cardinality_cap`` still applies); the number of fields follows it. A dataset already at
    ``out`` is replaced only with ``overwrite``; ``out`` is locked while it is built
    (``writer.claim_output``).
    """
    if num_rows < 10:
        raise ValueError(f"num_rows must be at least 10, got {num_rows}")
    if row_group_size < 1:
        raise ValueError(f"row_group_size must be positive, got {row_group_size}")
    if cardinality_cap is not None and cardinality_cap < 1:
        raise ValueError(f"cardinality_cap must be positive, got {cardinality_cap}")
    if cardinalities is not None:
        cards = [int(c) for c in cardinalities]
        if not cards or min(cards) < 1:
            raise ValueError(f"cardinalities must be positive integers, got {cardinalities}")
        if cardinality_cap is not None:
            cards = [min(c, int(cardinality_cap)) for c in cards]
    else:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets are {sorted(PRESETS)}")
        cards = scaled_cardinalities(PRESETS[preset], num_rows, cardinality_cap)
    if not 0 <= multi_hot_fields <= len(cards):
        raise ValueError(f"multi_hot_fields must be in [0, {len(cards)}], got {multi_hot_fields}")
    if multi_hot_max_len < 1:
        raise ValueError(f"multi_hot_max_len must be positive, got {multi_hot_max_len}")
    if num_files is None:
        num_files = max(3, -(-num_rows // DEFAULT_ROWS_PER_FILE))
    layout = _split_plan(num_rows, num_files)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    with claim_output(out, overwrite=overwrite):
        plan = _make_plan(seed, cards, multi_hot_fields, multi_hot_max_len)
        plan.bias = _calibrate(plan)
        with staged_output(out, overwrite=overwrite) as stage:
            tasks = [_FileTask(str(stage), split, i, fi, rows, row_group_size)
                     for fi, (split, i, rows) in enumerate(layout)]
            results: dict[int, tuple[int, int]] = {}
            bar = tqdm(total=num_rows, desc="synth: writing", unit="rows", unit_scale=True, disable=not progress,
                       file=sys.stderr, leave=False, dynamic_ncols=True)
            with bar:
                if workers == 1 or len(tasks) == 1:
                    for t in tasks:
                        results[t.file_index] = _write_file(plan, t)
                        bar.update(t.num_rows)
                else:
                    ctx = mp.get_context("spawn")
                    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker,
                                  initargs=(plan, os.getpid())) as pool:
                        for fi, rows, pos in pool.imap_unordered(_run_task, tasks):
                            results[fi] = (rows, pos)
                            bar.update(rows)
            splits: dict[str, SplitInfo] = {}
            positives: dict[str, int] = {}
            for t in tasks:
                info = splits.setdefault(t.split, SplitInfo(files=[], num_rows=0))
                info.files.append(f"{t.split}/part-{t.index_in_split:05d}.parquet")
                info.num_rows += results[t.file_index][0]
                positives[t.split] = positives.get(t.split, 0) + results[t.file_index][1]

            # train-split id counts, one field at a time (memory: one bincount of num_embeddings)
            count_tasks = [(str(stage), f.name, f.cardinality + 1, splits["train"].files) for f in plan.fields]
            count_tasks.sort(key=lambda a: -a[2])
            if workers == 1:
                for a in count_tasks:
                    _count_field(a)
            else:
                ctx = mp.get_context("spawn")
                with ctx.Pool(min(workers, len(count_tasks)), initializer=die_with_parent,
                              initargs=(signal.SIGKILL, os.getpid())) as pool:
                    list(pool.imap_unordered(_count_field, count_tasks))

            planted = {}
            partners: dict[int, list[str]] = {}
            for f, g, m, w in plan.pairs:
                partners.setdefault(f, []).append(plan.fields[g].name)
                partners.setdefault(g, []).append(plan.fields[f].name)
            for f in plan.fields:
                planted[f.name] = {
                    "signal": f.signal, "rank": f.rank, "index": f.index, "cardinality": f.cardinality,
                    "zipf_exponent": f.zipf_exponent, "oov_rate": f.oov_rate, "multi_hot": f.multi_hot,
                    "direction": [] if f.direction is None or not f.rank else [float(x) for x in f.direction],
                    "partners": partners.get(f.index, []),
                }
            dense_names = [f"I{j + 1}" for j in range(NUM_DENSE)]
            manifest = Manifest(
                label=LABEL,
                dense=dense_names,
                sparse=[SparseField(f.name, f.cardinality + 1, f.multi_hot) for f in plan.fields],
                splits=splits,
                source="synth",
                extra={
                    "seed": seed,
                    "formula_version": FORMULA_VERSION,
                    "preset": preset if cardinalities is None else "custom",
                    "num_rows": num_rows,
                    "num_files": num_files,
                    "row_group_size": row_group_size,
                    "cardinality_cap": cardinality_cap,
                    "multi_hot_fields": multi_hot_fields,
                    "multi_hot_max_len": multi_hot_max_len,
                    "positive_rate": {s: positives[s] / max(1, splits[s].num_rows) for s in splits},
                    "planted": planted,
                    "planted_model": {
                        "formula_version": FORMULA_VERSION,
                        "seed": seed,
                        "formula": "logit = bias + sum_f signal_f*<u_f(id_f), direction_f> "
                                   "+ sum_pairs weight*<u_f[:dims], u_g[:dims]>/sqrt(dims) "
                                   "+ sum_j dense_weight_j*(I_j - dense_center_j); label ~ Bernoulli(sigmoid(logit)); "
                                   "u_f(id) ~ N(0, I_rank) by SplitMix64 hash of (seed, field index, id), u_f(0)=0; "
                                   "multi-hot: mean of u_f over the row's ids",
                        "bias": plan.bias,
                        "target_positive_rate": TARGET_POSITIVE_RATE,
                        "pairs": [{"fields": [plan.fields[f].name, plan.fields[g].name], "dims": m, "weight": w}
                                  for f, g, m, w in plan.pairs],
                        "dense": {n: {"weight": float(plan.dense_weight[j]), "center": float(plan.dense_center[j])}
                                  for j, n in enumerate(dense_names)},
                    },
                },
            )
            write_manifest(stage, manifest)
        return manifest


__all__ = ["generate_synthetic", "field_contribution", "latent", "zipf_ids", "splitmix64",
           "scaled_cardinalities", "PRESETS", "FORMULA_VERSION"]
