"""Baseline training throughput: plain TorchRec DLRM (sharded EBC, fused optimizer,
TrainPipelineSparseDist, Parquet streaming) through ``embdim train`` on 1..N ranks.

Generates a synthetic Criteo-shaped dataset once, then runs ``embdim launch --nproc-per-node P
-- train`` for each P and reads ``samples_per_s`` (global, training steps only) from
``metrics.json``. Prints a markdown table with the command, machine and date.

Usage::

    python -m bench.bench_train --rows 2000000 --nproc 1,2 --batch-size 8192 --out /tmp/bench_train
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import cpu_description


def _machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    except ImportError:
        pass
    return cpu_description()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--nproc", default="1,2", help="comma-separated rank counts")
    p.add_argument("--batch-size", type=int, default=8192, help="rows per rank per step")
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--sharding-type", default="table_wise")
    p.add_argument("--num-workers", type=int, default=2, help="loader processes per rank")
    p.add_argument("--cardinality-cap", type=int, default=1_000_000)
    p.add_argument("--out", default="/tmp/embdim_bench_train")
    args = p.parse_args(argv)

    out = Path(args.out)
    data = out / "data"
    if not (data / "dataset.json").exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "embdim.launch.main", "data", "synth", "--out", str(data), "--rows",
                        str(args.rows), "--cardinality-cap", str(args.cardinality_cap), "--no-progress"], check=True)
        print(f"generated {args.rows} rows in {time.perf_counter() - t0:.0f} s", flush=True)
    d = args.embedding_dim
    sets = [f"data.batch_size={args.batch_size}", "data.eval_batch_size=65536", f"model.embedding_dim={d}",
            f"model.dense_arch_layer_sizes=[512, 256, {d}]", "model.over_arch_layer_sizes=[512, 256, 1]",
            f"sharding.sharding_type={args.sharding_type}", f"data.num_workers={args.num_workers}",
            "train.progress_bar=false", "train.log_every=100", "data.pin_memory=true"]
    rows = []
    for nproc in [int(x) for x in args.nproc.split(",")]:
        run = out / f"run_p{nproc}"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        cmd = [sys.executable, "-m", "embdim.launch.main", "launch", "--nproc-per-node", str(nproc), "--", "train",
               "--data", str(data), "--out", str(run), *[a for s in sets for a in ("--set", s)]]
        subprocess.run(cmd, check=True)
        m = json.loads((run / "metrics.json").read_text())
        rows.append((nproc, m["samples_per_s"], m["samples_per_s"] / nproc, m["steps"], m["test_auc"],
                     m["embedding_params"]))
    print(f"\nCommand: python -m bench.bench_train {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"Machine: {_machine()}; date {datetime.date.today().isoformat()}")
    print(f"Data: synthetic Criteo-shaped, {args.rows} rows, cardinalities capped at {args.cardinality_cap}; "
          f"width {d}, {args.sharding_type}, batch {args.batch_size} per rank, {args.num_workers} loader workers/rank\n")
    print("| ranks | samples/s (global) | samples/s per rank | steps | test AUC | embedding params |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:,.0f} | {r[2]:,.0f} | {r[3]} | {r[4]:.4f} | {r[5]:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
