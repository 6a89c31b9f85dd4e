"""``embdim demo``: synthetic data, a size search and the compact retrain on 2 CPU ranks.

The command line (``launch/main.py``) parses the flags and calls ``run_demo`` with the phase
runner of ``launch.launcher``; this module imports nothing from ``launch/``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from embdim.trainer.config import ConfigError
from embdim.io import output_lock
from embdim.trainer.orchestrator import PhaseFailed, PhaseRunner, phase_say

# The demo: small enough for 2 CPU ranks on 2 cores in about a minute, big enough for the
# planted signal of the synthetic data to show in the test AUC.
DEMO_ROWS = 150_000
DEMO_SETTINGS = [
    "data.batch_size=256",
    "data.eval_batch_size=2048",
    "model.embedding_dim=16",
    "train.epochs=1",
    "train.log_every=50",
    "train.progress_bar=false",
    "optim.sparse_lr=0.05",
    "optim.dense_lr=0.003",
]


def run_demo(out: str | Path, *, rows: int = DEMO_ROWS, seed: int = 0, method: str = "optembed",
             budget: float = 0.25, verbose: bool = False, run_phase: PhaseRunner) -> int:
    """Synthetic data in ``out/data`` (reused when there), then search and retrain into ``out/run``
    on 2 CPU ranks through ``run_phase`` (``launch.launcher.run_phase``); prints the test AUCs
    and returns the exit code of ``embdim demo`` (1 when a phase failed). Bad arguments raise
    ``ConfigError`` (or ``ValueError`` for an unknown method) before anything is written."""
    from embdim.embedding_methods import get_method

    # Check the flags before generating data and starting ranks: a typo must not cost a data set
    # and a torchrun failure report.
    get_method(method)
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"--budget: must be in (0, 1], got {budget}")
    if rows < 1:
        raise ConfigError(f"--rows: must be a positive integer, got {rows}")
    out = Path(out)
    data, run = out / "data", out / "run"
    start = time.perf_counter()
    with output_lock(out):
        if (data / "dataset.json").exists():
            print(f"demo: reusing the dataset in {data}")
        else:
            from embdim.trainer.data.synth import generate_synthetic

            print(f"demo: generating {rows} synthetic Criteo-shaped rows into {data}")
            generate_synthetic(data, num_rows=rows, seed=seed, progress=False)
        if run.exists():  # a fresh run: the trainer would otherwise resume the previous one
            shutil.rmtree(run)
        settings = [a for s in DEMO_SETTINGS for a in ("--set", s)]
        phases = [
            ("search", ["search", "--data", str(data), "--method", method, "--budget", str(budget),
                        "--out", str(run), *settings]),
            ("retrain", ["retrain", "--data", str(data), "--plan", str(run / "plan.json"), "--out",
                         str(run / "retrain"), *settings]),
        ]
        for name, command in phases:
            log = run / "logs" / f"{name}.log"
            print(f"demo: {name} ({method}, budget {budget}) on 2 CPU ranks (log: {log})", flush=True)
            # Two CPU ranks (gloo) even on a GPU host: the demo's point is to run anywhere.
            try:
                run_phase(name, command, 2, log, echo=verbose, env={"CUDA_VISIBLE_DEVICES": ""},
                          say=phase_say(name, lambda m: print(f"demo: {m}", flush=True)))
            except PhaseFailed as e:
                print(f"embdim: error: demo {e}", file=sys.stderr)
                return 1
    searched = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else None
    metrics = json.loads((run / "retrain" / "metrics.json").read_text())
    if searched is not None:
        print(f"demo: full-width search model: test AUC {searched['test_auc']:.4f}")
    print(f"demo: compact model: test AUC {metrics['test_auc']:.4f} (valid AUC {metrics['valid_auc']:.4f}) with "
          f"{metrics['embedding_params']:,} of {metrics['full_embedding_params']:,} embedding parameters "
          f"({metrics['compression_ratio']:.1f}x smaller), {time.perf_counter() - start:.0f} s wall; "
          f"plan {run / 'plan.json'}, metrics {run / 'retrain' / 'metrics.json'}")
    return 0
