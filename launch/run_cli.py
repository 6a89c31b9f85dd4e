"""``embdim run`` (search, retrain, report in one command) and ``embdim compare`` (a grid of runs).

::

    embdim run     --data DIR --method NAME --budget F --out RUN_DIR [--nproc-per-node N] [--config ...] [--set ...]
    embdim compare --data DIR --methods fixed,mde,... --budgets 0.5,0.25 --out DIR [--nproc-per-node N] [...]

This file parses and checks the flags; the orchestration (what a run writes, how it resumes, the
compare grid) is ``trainer/orchestrator.py``, and the phases start through
``launch.launcher.run_phase``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embdim.launch.data_cli import _positive_int
from embdim.launch.launcher import run_logged, run_phase  # noqa: F401 (run_logged: bench/bench_quality.py)
from embdim.trainer.config import ConfigError
from embdim.trainer.data.manifest import DatasetError, load_manifest
from embdim.launch.phases_cli import add_config_arguments, check_out, require_counts
from embdim.io import output_lock
from embdim.trainer import report as rep
# The orchestration moved to trainer/orchestrator.py; its names stay importable from here.
from embdim.trainer.orchestrator import (RUN_PHASES, PhaseFailed, ProgressLines, RunState,  # noqa: F401
                                         cell_dir, compare_grid, error_message, execute_run, phase_say)


def _validate(args: argparse.Namespace, methods: list[str], budgets: list[float]) -> None:
    """Flags, dataset and config checked once before any rank starts: a typo fails in a second,
    not after the first phase of a grid."""
    from embdim.embedding_methods import get_method
    from embdim.trainer.config import load_config
    from embdim.trainer.phases import RunConfig

    for method in methods:
        get_method(method)  # ValueError naming the choices
    for budget in budgets:
        if not 0.0 < budget <= 1.0:
            raise ConfigError(f"--budget: must be in (0, 1], got {budget}")
    data = Path(args.data)
    if not data.is_dir():
        raise DatasetError(f"{data}: dataset folder not found (--data); make one with `embdim data synth --out {data}`")
    load_manifest(data)
    check_out(args.out, data)
    for method in methods:
        require_counts(data, method)
    load_config(args.config, [*args.set, f"search.budget={budgets[0]}"], cls=RunConfig)


# ---------------------------------------------------------------------------- commands
def _parse_list(text: str, flag: str, convert) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{flag}: empty list")
    try:
        return [convert(t) for t in items]
    except ValueError:
        raise ConfigError(f"{flag}: expected a comma-separated list, got {text!r}") from None


def _run(args: argparse.Namespace) -> int:
    _validate(args, [args.method], [args.budget])
    run_dir = Path(args.out)
    say = lambda msg: print(f"run: {msg}", flush=True)  # noqa: E731
    try:
        with output_lock(run_dir):
            row = execute_run(args, args.method, args.budget, run_dir, echo=args.verbose, say=say,
                              run_phase=run_phase)
    except PhaseFailed as e:
        print(f"embdim: error: run {args.method} budget {args.budget:g}: {e}", file=sys.stderr)
        print(f"run: rerun the same command to resume; report: {run_dir / rep.REPORT}", file=sys.stderr)
        return 1
    cell = rep.format_cell
    say(f"test AUC {cell('test_auc', row.test_auc)}, logloss {cell('test_logloss', row.test_logloss)}, "
        f"{cell('embedding_params', row.embedding_params)} embedding params "
        f"({cell('compression_ratio', row.compression_ratio)} smaller than full width); report {run_dir / rep.REPORT}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    methods = _parse_list(args.methods, "--methods", str)
    budgets = _parse_list(args.budgets, "--budgets", float)
    _validate(args, methods, budgets)
    out = Path(args.out)
    with output_lock(out):
        return compare_grid(args, methods, budgets, out, run_phase)


def add_verbose_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show everything the ranks print (sharding plans, library warnings); by default it goes "
                        "to the phase's log file in logs/ and the screen shows progress and a summary")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder made by `embdim data`")
    p.add_argument("--nproc-per-node", type=_positive_int, default=1, help="ranks per phase, through torchrun (default 1)")
    add_config_arguments(p)  # for every phase
    add_verbose_argument(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    from embdim.embedding_methods import METHOD_NAMES

    p = subparsers.add_parser("run", help="search + retrain + test + report in one command (resumable)")
    _add_common(p)
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHOD_NAMES)}")
    p.add_argument("--budget", required=True, type=float, help="fraction of the full-width embedding parameters")
    p.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    p.set_defaults(func=_run)

    p = subparsers.add_parser("compare", help="full-width baseline + a grid of methods x budgets; report.md, pareto.png")
    _add_common(p)
    p.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated methods (default: all)")
    p.add_argument("--budgets", default="0.5,0.25,0.1", help="comma-separated budgets (default %(default)s)")
    p.add_argument("--out", required=True, help="comparison folder: full/, <method>_b<budget>/, report.md, pareto.png")
    p.set_defaults(func=_compare)
