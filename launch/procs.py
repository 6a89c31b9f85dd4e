"""The CLI's child processes (torchrun and its ranks): started apart, stopped as one tree, never
left running.

``embdim run``, ``compare``, ``demo`` and ``launch`` start torchrun (``python -m
torch.distributed.run``), whose agent starts one worker per rank in a session of its own
(torch's SubprocessHandler uses ``start_new_session``), and each worker may fork data-loader
processes. Signals that should stop the command do not reach that tree by themselves: a terminal's
Ctrl-C goes to the foreground process group only, and SIGTERM from Kubernetes, Slurm or
``timeout`` to the CLI process only. So:

- ``interrupt_on_signals``: SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` in the CLI's main
  thread (not the bare KeyboardInterrupt, and not the instant exit of SIGTERM's default action),
  so that ``finally`` blocks run: the child tree is stopped before the command returns.
- ``spawn`` starts a child in its own session, tagged through its environment with a job id that
  every descendant inherits (``EMBDIM_JOB``), so the whole tree is found in ``/proc`` even after
  a worker has been orphaned.
- ``stop_tree`` sends SIGTERM to every process of the tree, waits ``GRACE_S`` and sends SIGKILL to
  what is left: within ``GRACE_S + KILL_WAIT_S`` seconds nothing of the job runs (and so nothing
  writes into its run folder) any more.
- Against ``kill -9`` of the CLI itself, which runs no handler: torchrun is started through this
  module (``python -m embdim.launch.procs torch.distributed.run ...``), which asks the kernel to
  send it SIGTERM when its parent dies (``PR_SET_PDEATHSIG``, Linux), and every rank asks for
  SIGKILL when the torchrun agent dies (``embdim.launch.main.cli``). Killing the CLI thus takes
  the agent down, whose SIGTERM handler stops its workers, and a worker whose agent died is
  killed by the kernel.

Exit codes follow the shell's convention: a command stopped by signal N exits ``128 + N`` (130
for SIGINT, 143 for SIGTERM, 129 for SIGHUP) after one line saying how to resume.
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

from embdim.io import die_with_parent

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_S = 5.0
"""Seconds the tree gets to exit on SIGTERM before SIGKILL."""
KILL_WAIT_S = 4.0
"""Seconds to wait for SIGKILLed processes to be gone."""
JOB_ENV = "EMBDIM_JOB"
"""Set in a spawned child's environment (inherited by all its descendants): the job's tag."""
PARENT_ENV = "EMBDIM_PARENT_PID"
"""The pid a process started through this module expects as its parent (else it was orphaned
before it could ask for PR_SET_PDEATHSIG, and stops)."""
AGENT_ENV = "EMBDIM_AGENT_PID"
"""The torchrun agent's pid, for its workers (see ``die_with_parent``)."""


class Interrupted(BaseException):
    """The command received SIGINT, SIGTERM or SIGHUP. A BaseException, like KeyboardInterrupt,
    so that ``except Exception`` handlers do not swallow it."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_signals_seen = 0


def _raise_interrupted(signum: int, frame: Any) -> None:
    global _signals_seen
    _signals_seen += 1
    if _signals_seen == 1:
        raise Interrupted(signum)
    # A second signal while the first one's cleanup runs: stop_tree skips its grace period.


@contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """While active (main thread only), SIGINT, SIGTERM and SIGHUP raise ``Interrupted``. A signal
    the process ignores (``nohup``, a background job's SIGINT) stays ignored."""
    global _signals_seen
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in STOP_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is signal.SIG_IGN:
            continue
        previous[sig] = handler
        signal.signal(sig, _raise_interrupted)
    _signals_seen = 0
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------- the process tree
def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of a live process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0].decode(), int(fields[19])


def _tagged(tag: str) -> set[int]:
    """Processes whose environment carries ``EMBDIM_JOB=tag`` (the job's descendants, also orphans)."""
    needle = f"\0{JOB_ENV}={tag}\0".encode()
    out = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in b"\0" + f.read() + b"\0":
                    out.add(int(name))
        except OSError:
            continue
    return out


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append(int(name))
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def job_processes(proc: subprocess.Popen, tag: str | None) -> dict[int, int]:
    """Live (not zombie) processes of a spawned job: pid -> start time."""
    if not os.path.isdir("/proc"):
        return {proc.pid: 0} if proc.poll() is None else {}
    pids: set[int] = set()
    if proc.poll() is None:  # not reaped yet: its pid (and so its children) cannot be another's
        pids |= _descendants(proc.pid) | {proc.pid}
    if tag:
        pids |= _tagged(tag)
    out = {}
    for pid in pids:
        if pid == os.getpid():
            continue
        st = _stat(pid)
        if st is not None and st[1] != "Z":
            out[pid] = st[2]
    return out


def _alive(procs: dict[int, int]) -> dict[int, int]:
    out = {}
    for pid, start in procs.items():
        st = _stat(pid)
        if st is not None and st[1] != "Z" and (start == 0 or st[2] == start):
            out[pid] = start
    return out


def _signal_all(procs: dict[int, int], sig: int) -> None:
    for pid in _alive(procs):  # the start time checked: a pid reused meanwhile is not ours
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_tree(proc: subprocess.Popen, tag: str | None = None, grace: float = GRACE_S) -> None:
    """Stops a spawned child and all its descendants: SIGTERM to each, SIGKILL to what is left
    after ``grace`` seconds (at once when a second stop signal arrived). Returns when none of
    them runs any more (or after ``KILL_WAIT_S`` more seconds), with ``proc`` reaped."""
    procs = job_processes(proc, tag)
    if proc.poll() is None:  # its session: whatever the snapshot missed (only while its pid is ours)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    _signal_all(procs, signal.SIGTERM)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT_S)):
        if sig == signal.SIGKILL:
            _signal_all(procs, signal.SIGKILL)
        deadline = time.monotonic() + wait
        while procs and time.monotonic() < deadline and not (sig == signal.SIGTERM and _signals_seen > 1):
            proc.poll()  # reap the direct child, so it does not linger as a zombie
            # A worker started meanwhile (an agent restarting its group) joins the set.
            procs = _alive({**procs, **job_processes(proc, tag)})
            if procs:
                time.sleep(0.05)
        procs = _alive(procs)
        if not procs:
            break
    try:
        proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        pass


def spawn(argv: list[str], env: dict[str, str] | None = None, **popen_kwargs: Any) -> tuple[subprocess.Popen, str]:
    """Starts ``argv`` in a new session with a fresh job tag in its environment; returns
    (process, tag)."""
    tag = uuid.uuid4().hex
    env = dict(os.environ if env is None else env)
    env[JOB_ENV] = tag
    env[PARENT_ENV] = str(os.getpid())
    return subprocess.Popen(argv, env=env, start_new_session=True, **popen_kwargs), tag


@contextmanager
def supervised(argv: list[str], env: dict[str, str] | None = None, **popen_kwargs: Any
               ) -> Iterator[subprocess.Popen]:
    """``spawn`` for the block; on the way out (a return, an error, ``Interrupted``) every
    process of the job that still runs is stopped (``stop_tree``): also workers orphaned by a
    crashed agent."""
    proc, tag = spawn(argv, env, **popen_kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None or job_processes(proc, tag):
            stop_tree(proc, tag)


def torchrun_command(args: list[str]) -> list[str]:
    """The command line that runs torchrun with ``args`` through this module (see the module
    docstring: the agent dies with the CLI process that started it)."""
    return [sys.executable, "-m", "embdim.launch.procs", "torch.distributed.run", *args]


def _main() -> None:
    """``python -m embdim.launch.procs MODULE ARGS...``: runs MODULE as ``__main__`` with ARGS,
    after asking for SIGTERM when the parent dies."""
    parent = os.environ.pop(PARENT_ENV, "")
    die_with_parent(signal.SIGTERM, int(parent) if parent.isdigit() else None)
    os.environ[AGENT_ENV] = str(os.getpid())
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _main()
