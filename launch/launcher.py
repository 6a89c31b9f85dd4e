"""``embdim launch``: start any embdim subcommand on N ranks per node through torchrun.

``embdim launch --nproc-per-node 2 -- train --data D --out R`` runs
``python -m torch.distributed.run --nproc_per_node 2 --standalone -m embdim.launch.main train --data D --out R``.
The subcommands read their rank from torchrun's environment, so starting them with ``torchrun``
directly works the same.

Single node without a rendezvous endpoint or master port defaults to ``--standalone`` (a c10d
store on a free port), so concurrent jobs on one host never collide on torchrun's fixed 29500.

With ``--max-restarts`` above 0 torchrun runs with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (unless
the environment sets it): by default the c10d rendezvous hands every restarted worker group the
same agent-hosted TCPStore, still holding the previous group's keys, so the new group's
``init_process_group`` can read a dead peer's address and hang or fail (pytorch/pytorch#135712;
in 3 of 6 restarts of a 2-rank gloo job on torch 2.13). Without sharing, every rendezvous
round bootstraps a fresh store on a new port.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from embdim.launch.procs import supervised, torchrun_command
from embdim.io import held_locks_env

# The repository root (parent of launch/): put on the workers' PYTHONPATH so ``-m embdim.launch.main``
# resolves even when embdim is not pip-installed.
_ROOT = Path(__file__).resolve().parents[1]

# (our flag, torchrun flag, argparse kwargs); torchrun's underscore spellings are accepted by
# every torch release we support.
_TORCHRUN_FLAGS: list[tuple[str, str, dict]] = [
    ("--nnodes", "--nnodes", {"default": None, "help": "nodes, or MIN:MAX for elastic jobs"}),
    ("--node-rank", "--node_rank", {"type": int, "default": None, "help": "rank of this node (static rendezvous)"}),
    ("--rdzv-backend", "--rdzv_backend", {"default": None, "help": "rendezvous backend, e.g. c10d"}),
    ("--rdzv-endpoint", "--rdzv_endpoint", {"default": None, "help": "rendezvous HOST:PORT"}),
    ("--rdzv-id", "--rdzv_id", {"default": None, "help": "job id shared by all nodes"}),
    ("--max-restarts", "--max_restarts", {"type": int, "default": None,
                                          "help": "restarts of the worker group before failing "
                                                  "(each restart resumes from RUN_DIR/ckpt/latest)"}),
    ("--master-addr", "--master_addr", {"default": None, "help": "master address (static rendezvous)"}),
    ("--master-port", "--master_port", {"type": int, "default": None, "help": "master port (static rendezvous)"}),
]


def _nproc(text: str) -> str:
    if text in ("auto", "cpu", "gpu"):
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, 'auto', 'cpu' or 'gpu', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return str(n)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``launch`` flags: torchrun's, spelled with hyphens, then ``-- SUBCOMMAND ARGS...``."""
    parser.add_argument("--nproc-per-node", type=_nproc, required=True, help="ranks per node")
    for flag, _, kwargs in _TORCHRUN_FLAGS:
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--standalone", action="store_true",
                        help="single-node job with a local rendezvous on a free port (the default on one node "
                             "when no rendezvous endpoint or master port is given)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SUBCOMMAND ARGS... (e.g. -- train --data D --out R)")


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    """torchrun's arguments for a parsed ``launch`` command (without the interpreter)."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ValueError("launch: missing the subcommand to run, e.g. `embdim launch --nproc-per-node 2 -- train ...`")
    if command[0] in ("launch", "demo"):
        raise ValueError(f"launch: {command[0]!r} cannot run under the launcher; give a rank-level subcommand such as train")
    argv = ["--nproc_per_node", args.nproc_per_node]
    for flag, torchrun_flag, _ in _TORCHRUN_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            argv += [torchrun_flag, str(value)]
    single_node = args.nnodes in (None, "1", "1:1")
    if args.standalone or (single_node and args.rdzv_endpoint is None and args.master_port is None):
        argv.append("--standalone")
    return argv + ["-m", "embdim.launch.main", *command]


def torchrun_env(args: argparse.Namespace, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of torchrun for a parsed ``launch`` command (default: ``os.environ``)."""
    env = dict(os.environ if environ is None else environ)
    if args.max_restarts:
        # A fresh store per restart (see the module docstring); an explicit setting wins.
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return env


def repo_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default: ``os.environ``) with the repository root first on
    PYTHONPATH, so a child's ``-m embdim.launch.main`` (or ``-m bench.*``) resolves without a pip
    install, and the output folders this process holds locked listed for the child (it writes
    into them for this job: ``embdim.io.output_lock``)."""
    env = held_locks_env(os.environ if environ is None else environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(_ROOT) + (os.pathsep + path if path else "")
    return env


def run_torchrun(argv: list[str], env: dict[str, str] | None = None) -> int:
    """Runs torchrun with ``argv`` (its output on this process's stdout/stderr) and returns its
    exit code. A signal to this process stops torchrun and every rank before it returns
    (``launch.procs``)."""
    with supervised(torchrun_command(argv), env=repo_env(env)) as proc:
        return proc.wait()


def launch(args: argparse.Namespace) -> int:
    return run_torchrun(torchrun_argv(args), env=torchrun_env(args))
