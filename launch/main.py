"""The ``embdim`` command line.

Subcommands::

    embdim data {synth,criteo,avazu,csv} ...      build a dataset folder
    embdim train --data DIR --out RUN_DIR [--config FILE.toml] [--set section.key=value ...]
    embdim launch --nproc-per-node N [torchrun flags] -- SUBCOMMAND ARGS...
    embdim search / retrain ...                   learn embedding sizes, train the compact model
    embdim plan show PLAN                         summarize a size plan
    embdim run / compare ...                      search + retrain + report in one command; a grid of them
    embdim demo --out DIR [--rows N]              synthetic data, search + retrain on 2 CPU ranks, prints AUC

Rank-level subcommands (``train``) read their rank from torchrun's environment, so both
``embdim launch --nproc-per-node 2 -- train ...`` and ``torchrun --nproc_per_node 2 -m embdim.launch.main
train ...`` work; without torchrun they run on one rank.

Each subcommand lives in a ``register(subparsers)`` function listed in ``COMMANDS``; a handler
takes the parsed arguments and returns the exit code. User errors (bad config, dataset, flags, an
output folder another job holds, a path that cannot be written, a full disk) print one ``embdim:
error: ...`` line and return 2; ``EMBDIM_TRACEBACK=1`` re-raises them. SIGINT, SIGTERM and SIGHUP
stop the command and every process it started, print one ``embdim: interrupted by SIG...`` line
saying how to resume, and return 128 + the signal number (``launch.procs``).

This file and the ``*_cli.py`` beside it parse flags and call: the ``run`` / ``compare``
orchestration is ``trainer/orchestrator.py``, the demo ``trainer/demo.py``; both start their
phases through ``launch.launcher.run_phase``, which they are handed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from typing import Callable

from embdim.launch import data_cli, phases_cli, plan_cli, run_cli
from embdim.launch.launcher import add_arguments as add_launch_arguments
from embdim.launch.launcher import run_phase, torchrun_argv, torchrun_env, run_torchrun
from embdim.launch.procs import AGENT_ENV, Interrupted, die_with_parent, interrupt_on_signals
from embdim.trainer.checkpoint import CheckpointError
from embdim.trainer.config import ConfigError, load_config
from embdim.trainer.data.manifest import DatasetError, require_dataset
from embdim.trainer.demo import DEMO_ROWS, run_demo
from embdim.io import FolderBusy, StorageError, output_lock, storage_cause
from embdim.trainer.logger import init_logger

logger = logging.getLogger("embdim")

USER_ERRORS = (ConfigError, DatasetError, CheckpointError, ValueError, FolderBusy, StorageError)
RESUME_HINT = "rerun the same command to resume"

# ---------------------------------------------------------------------------- train
def _train(args: argparse.Namespace) -> int:
    from embdim.sharding.distributed import abort, destroy, init_distributed
    from embdim.trainer.loop import Trainer

    from embdim.trainer.phases import RunConfig

    # One TOML serves train, search and retrain: method sections are accepted (and unused) here.
    config = load_config(args.config, args.set, cls=RunConfig)
    data = require_dataset(args.data)
    with phases_cli.run_output(args):
        env = init_distributed()
        try:
            Trainer(config, data, args.out, env=env).fit()
        except BaseException:
            abort()  # peers may be blocked in a collective: an orderly destroy would hang (NCCL)
            raise
        destroy()
    return 0


def register_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a sharded DLRM on a dataset folder (one rank, or under torchrun)")
    p.add_argument("--data", required=True, help="dataset folder made by `embdim data`")
    p.add_argument("--out", required=True, help="run folder: metrics.json, ckpt/, tensorboard/ (resumes from ckpt/latest)")
    phases_cli.add_config_arguments(p)
    p.set_defaults(func=_train)


# ---------------------------------------------------------------------------- launch
RANK_COMMANDS = ("train", "search", "retrain")


def _launch(args: argparse.Namespace) -> int:
    """torchrun with the subcommand; its arguments are parsed here first (a typo fails once, not
    on every rank), and its ``--out`` is locked by this process for all ranks (one job per run
    folder; ranks are told through ``EMBDIM_LOCKED``)."""
    argv = torchrun_argv(args)
    command = argv[argv.index("embdim.launch.main") + 1:]
    try:
        sub = build_parser().parse_args(command)
    except SystemExit as e:  # argparse printed the usage and the error
        return int(e.code or 0)
    if getattr(sub, "command_name", None) not in RANK_COMMANDS:
        return run_torchrun(argv, env=torchrun_env(args))
    phases_cli.check_out(sub.out, sub.data)
    with output_lock(sub.out):
        return run_torchrun(argv, env=torchrun_env(args))


def register_launch(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("launch", help="run a subcommand on N ranks per node through torchrun")
    add_launch_arguments(p)
    p.set_defaults(func=_launch)


# ---------------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    return run_demo(args.out, rows=args.rows, seed=args.seed, method=args.method, budget=args.budget,
                    verbose=args.verbose, run_phase=run_phase)


def register_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="synthetic data, size search and compact retrain on 2 CPU ranks; prints AUC")
    p.add_argument("--out", required=True, help="demo folder (data/ and run/ go inside)")
    p.add_argument("--rows", type=int, default=DEMO_ROWS, help="synthetic rows (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--method", default="optembed", help="size method (default %(default)s)")
    p.add_argument("--budget", type=float, default=0.25,
                   help="fraction of the full-width embedding parameters (default %(default)s)")
    run_cli.add_verbose_argument(p)
    p.set_defaults(func=_demo, interrupt_hint="rerun the same command to start the demo run again")


# ---------------------------------------------------------------------------- entry point
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    data_cli.register,
    register_train,
    phases_cli.register,
    plan_cli.register,
    run_cli.register,
    register_launch,
    register_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embdim", description="Learned embedding sizes for TorchRec DLRM models.")
    subparsers = parser.add_subparsers(dest="command_name", metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``), runs the subcommand, returns the exit code."""
    init_logger()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed usage and the error (or --help)
        return int(e.code or 0)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    # A torchrun rank keeps the default signal actions: its agent stops it with SIGTERM, which must
    # end it at once even when it is blocked in a collective.
    guard = contextlib.nullcontext() if "TORCHELASTIC_RUN_ID" in os.environ else interrupt_on_signals()
    try:
        with guard:
            return int(args.func(args) or 0)
    except Interrupted as e:
        print(f"embdim: {e}; {getattr(args, 'interrupt_hint', RESUME_HINT)}", file=sys.stderr, flush=True)
        return e.exit_code
    except USER_ERRORS as e:
        if os.environ.get("EMBDIM_TRACEBACK") == "1":
            raise
        print(f"embdim: error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        # A file-system failure in a library's own write (a path not wrapped in StorageError).
        path = getattr(e, "filename", None)
        cause = storage_cause(e, path)
        if cause is None or os.environ.get("EMBDIM_TRACEBACK") == "1":
            raise
        print(f"embdim: error: {path + ': ' if path else ''}{cause} ({e})", file=sys.stderr)
        return 2


def cli() -> None:
    """Console-script entry point (``embdim``)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # A torchrun rank dies with its agent (also one killed by SIGKILL, which cannot stop its
        # workers itself): an orphaned rank would go on training and writing checkpoints.
        agent = os.environ.get(AGENT_ENV, "")
        die_with_parent(signal.SIGKILL, int(agent) if agent.isdigit() else None)
    code = main()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # A torchrun worker whose work is done (artifacts are written atomically and fsynced)
        # exits without interpreter finalisation: a gloo/DCP C++ thread still joinable at static
        # destruction can abort the process (exit -6) after success, failing the whole job.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
