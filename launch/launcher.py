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
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from embdim.launch.procs import Interrupted, supervised, torchrun_command
from embdim.io import held_locks_env
from embdim.trainer.orchestrator import PhaseFailed, ProgressLines, error_message

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


# ---------------------------------------------------------------------------- running a phase
# ``embdim run``, ``compare`` and ``demo`` start their phases here (``trainer.orchestrator`` and
# ``trainer.demo`` take ``run_phase`` as an argument, so that they import nothing from launch/).
def _launch_namespace(nproc: int, command: list[str]) -> argparse.Namespace:
    return argparse.Namespace(
        nproc_per_node=str(nproc), nnodes=None, node_rank=None, rdzv_backend=None, rdzv_endpoint=None, rdzv_id=None,
        max_restarts=None, master_addr=None, master_port=None, standalone=True, command=command,
    )


def run_logged(argv: list[str], log_path: Path, header: str, *, echo: bool, cwd: Path | None = None,
               env: dict[str, str] | None = None, progress: ProgressLines | None = None) -> int:
    """Runs ``argv`` (repository root on its PYTHONPATH, ``env`` added to this process's
    environment) with stdout and stderr appended to ``log_path`` under a ``=== <time> <header>``
    line and, with ``echo``, copied to stdout (else the lines ``progress`` picks are shown);
    returns the exit code. The child runs in its own session; when this call ends in any other way
    than the child's exit (``Interrupted`` by a signal, an error), the child and all its
    descendants are stopped before it returns (``launch.procs.supervised``)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The log is a running record, not an artifact: appended as it comes, never replaced.
    with open(log_path, "ab") as log:
        log.write(f"\n=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} {header}\n".encode())
        log.flush()
        try:
            with supervised(argv, cwd=cwd, env=repo_env({**os.environ, **(env or {})}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) as proc:
                # read1 returns what is there: tqdm's carriage-return updates pass through unbuffered.
                while chunk := proc.stdout.read1(65536):
                    log.write(chunk)
                    log.flush()
                    if echo:
                        sys.stdout.write(chunk.decode(errors="replace"))
                        sys.stdout.flush()
                    elif progress is not None:
                        progress.feed(chunk)
                return proc.wait()
        except Interrupted as e:
            log.write(f"\n=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} {e}: stopped every "
                      f"process of the phase\n".encode())
            raise


def run_phase(name: str, command: list[str], nproc: int, log_path: Path, echo: bool, *,
              env: dict[str, str] | None = None, say=None) -> None:
    """Runs ``embdim COMMAND`` on ``nproc`` ranks through torchrun, copying the ranks' output to
    ``log_path`` (appended: a resumed phase keeps the interrupted attempt's lines above) and, with
    ``echo``, to stdout (else their progress lines go to ``say``). Raises ``PhaseFailed`` with the
    ranks' error on a non-zero exit."""
    argv = torchrun_command(torchrun_argv(_launch_namespace(nproc, command)))
    code = run_logged(argv, log_path, f"embdim {' '.join(command)} (nproc {nproc})", echo=echo, env=env,
                      progress=ProgressLines(say) if say is not None else None)
    if code != 0:
        message = error_message(log_path.read_text(errors="replace").split("\n=== ")[-1]) or f"exit code {code}"
        raise PhaseFailed(name, code, message, log_path)
