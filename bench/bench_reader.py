"""Throughput of ``ParquetBatchReader``: rows/s into ``Batch(dense, KJT, labels)`` on Criteo-shaped data.

Generates (fixed seed) a dataset of ``--rows`` rows with 13 float32 dense columns, 26 int64 single-hot
columns and a float32 label, written by pyarrow (snappy, ``--row-group-size`` rows per row group), then
reads shuffled training epochs per configuration (batch size x num_workers; the fastest of
``--repeats`` is reported, since the machine may be shared) and prints a markdown table.
"rows/s per process" divides by the decoding processes (max(1, num_workers)); times include
starting the DataLoader workers. A row with validate=off shows what the value checks cost.

Usage::

    python -m bench.bench_reader --rows 2000000
    python -m bench.bench_reader --rows 500000 --batch-sizes 8192 --workers 0 2 --dir /tmp/criteo_like
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embdim.trainer.data.manifest import Manifest, SparseField, SplitInfo, load_manifest, write_manifest
from embdim.trainer.data.reader import ParquetBatchReader

NUM_DENSE = 13
# Criteo 1TB cardinalities as in the MLPerf DLRMv2 config, capped: the cap changes value ranges, not
# the decoding work.
CARDINALITIES = [40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10, 2209,
                 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36]
MAX_CARDINALITY = 10_000_000


def generate(root: Path, num_rows: int, row_group_size: int, rows_per_file: int, seed: int) -> None:
    """Writes a Criteo-shaped "train" split under ``root`` (skewed ids, like real click logs)."""
    rng = np.random.default_rng(seed)
    cards = [min(c, MAX_CARDINALITY) for c in CARDINALITIES]
    dense_names = [f"int_{i}" for i in range(NUM_DENSE)]
    sparse_names = [f"cat_{i}" for i in range(len(cards))]
    (root / "train").mkdir(parents=True, exist_ok=True)
    files, written = [], 0
    while written < num_rows:
        file = f"train/part-{len(files):05d}.parquet"
        file_rows = min(rows_per_file, num_rows - written)
        writer = None
        for begin in range(0, file_rows, row_group_size):
            n = min(row_group_size, file_rows - begin)
            columns = {"label": pa.array((rng.random(n) < 0.25).astype(np.float32))}
            for name in dense_names:
                columns[name] = pa.array(np.log1p(rng.geometric(0.05, n)).astype(np.float32))
            for name, card in zip(sparse_names, cards):
                columns[name] = pa.array(np.minimum(rng.zipf(1.3, n) - 1, card - 1).astype(np.int64))
            table = pa.table(columns)
            if writer is None:
                writer = pq.ParquetWriter(root / file, table.schema, compression="snappy")
            writer.write_table(table, row_group_size=n)
        writer.close()
        files.append(file)
        written += file_rows
    write_manifest(root, Manifest(
        label="label", dense=dense_names,
        sparse=[SparseField(name, card) for name, card in zip(sparse_names, cards)],
        splits={"train": SplitInfo(files=files, num_rows=num_rows)}, source="synth",
        extra={"bench": {"seed": seed, "row_group_size": row_group_size}}))


def measure(root: Path, batch_size: int, num_workers: int, validate: bool, repeats: int) -> dict:
    """Best of ``repeats`` epochs (other epochs each: a new shuffle, the same amount of work)."""
    reader = ParquetBatchReader(root, "train", batch_size=batch_size, num_workers=num_workers, shuffle=True,
                                seed=0, validate=validate)
    best = None
    for _ in range(repeats):
        rows = 0
        start = time.perf_counter()
        first = None
        for batch in reader:
            if first is None:
                first = time.perf_counter() - start
            rows += batch.labels.numel()
            assert batch.sparse_features.values().numel() == 26 * batch.labels.numel()
        seconds = time.perf_counter() - start
        if best is None or seconds < best["seconds"]:
            best = {"rows": rows, "seconds": seconds, "first": first, "rows_per_s": rows / seconds,
                    "per_process": rows / seconds / max(1, num_workers)}
    return best


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of the generated dataset")
    parser.add_argument("--row-group-size", type=int, default=131072)
    parser.add_argument("--rows-per-file", type=int, default=1_048_576)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seed", type=int, default=0, help="data generation seed")
    parser.add_argument("--repeats", type=int, default=3, help="epochs per configuration; the fastest is reported")
    parser.add_argument("--dir", type=Path, default=None,
                        help="dataset folder to reuse (generated there if absent); default: a temporary folder")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_reader_") as tmp:
        root = args.dir or Path(tmp)
        reuse = (root / "dataset.json").exists() and load_manifest(root).splits["train"].num_rows == args.rows
        start = time.perf_counter()
        if not reuse:
            generate(root, args.rows, args.row_group_size, args.rows_per_file, args.seed)
        generated = time.perf_counter() - start
        size_mb = sum(f.stat().st_size for f in root.rglob("*.parquet")) / 2**20
        results = []
        for batch_size in args.batch_sizes:
            configs = [(w, True) for w in args.workers] + [(min(args.workers), False)]
            for num_workers, validate in configs:
                r = measure(root, batch_size, num_workers, validate, args.repeats)
                results.append((batch_size, num_workers, validate, r))
                print(f"batch {batch_size} workers {num_workers} validate {validate}: "
                      f"{r['rows_per_s'] / 1e6:.3f}M rows/s", file=sys.stderr, flush=True)

    command = ["python", "-m", "bench.bench_reader", *(argv if argv is not None else sys.argv[1:])]
    print(f"Command: `{shlex.join(command)}`")
    print(f"Machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}; "
          f"python {platform.python_version()}, pyarrow {pa.__version__}, numpy {np.__version__}")
    print(f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"Data: {args.rows} rows, 13 float32 + 26 int64 + label, snappy, {args.row_group_size}-row groups, "
          f"{size_mb:.0f} MiB ({'reused' if reuse else f'generated in {generated:.0f} s'})")
    print()
    print("| batch | workers | validate | rows read | epoch s | first batch s | rows/s | rows/s per process |")
    print("|---:|---:|:---:|---:|---:|---:|---:|---:|")
    for batch_size, num_workers, validate, r in results:
        print(f"| {batch_size} | {num_workers} | {'on' if validate else 'off'} | {r['rows']} | {r['seconds']:.2f} | "
              f"{r['first']:.2f} | {r['rows_per_s'] / 1e6:.3f}M | {r['per_process'] / 1e6:.3f}M |")


if __name__ == "__main__":
    main()
