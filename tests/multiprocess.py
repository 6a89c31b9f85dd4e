"""Spawn N gloo ranks on CPU and run a module-level function in each (torchrec's multiprocess pattern).

Per-rank bodies must be module-level functions ``fn(rank, world_size, **kwargs)`` so spawn can
pickle them. A rank's exception is re-raised in the test process with its traceback.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, kwargs: dict, errors: Any) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      GLOO_DEVICE_TRANSPORT="TCP")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, **kwargs)
        # Both ranks finish their collectives before either tears gloo down.
        dist.barrier()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # A clean exit without interpreter finalisation: a background C++ thread (DCP / gloo) still
    # joinable at static destruction aborts the process ("terminate called without an active
    # exception", exit -6) after the work has succeeded; seen about once in 50 runs on CI.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_multiprocess(fn: Callable, world_size: int = 2, timeout: float = 600, **kwargs: Any) -> None:
    """Runs ``fn(rank, world_size, **kwargs)`` on ``world_size`` gloo ranks; fails on any rank error."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, kwargs, errors)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures or any(p.exitcode != 0 for p in procs):
        details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in failures)
        raise AssertionError(f"ranks exited with {[p.exitcode for p in procs]}\n{details}")
