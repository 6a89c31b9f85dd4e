"""Process-group setup: one code path for torchrun, spawned test ranks and a plain ``python`` run.

TorchRec's ``DistributedModelParallel`` always needs a process group, even on one rank, so a run
started without torchrun gets a 1-rank gloo group on a free localhost port.

Backend choice follows the TorchRec DLRM reference (``dlrm_main.py``): NCCL on ``cuda:LOCAL_RANK``
when CUDA is available, gloo on CPU otherwise.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Args:
        rank (int): global rank.
        world_size (int): number of ranks.
        local_rank (int): rank within this host (selects the GPU).
        local_world_size (int): ranks on this host (the planner's ``Topology`` uses it).
        device (torch.device): ``cuda:LOCAL_RANK`` with NCCL, ``cpu`` with gloo.
        backend (str): ``"nccl"`` or ``"gloo"``.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def pg(self) -> dist.ProcessGroup:
        return dist.group.WORLD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _make_env(backend: str) -> DistEnv:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = env_int("LOCAL_RANK", rank)
    local_world_size = env_int("LOCAL_WORLD_SIZE", world_size)
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistEnv(rank, world_size, local_rank, local_world_size, device, backend)


def init_distributed(backend: str | None = None) -> DistEnv:
    """Initialises (or adopts) the default process group and returns this rank's ``DistEnv``.

    Under torchrun (``RANK`` in the environment) the group is built from the environment; without
    it, a 1-rank gloo group on a free localhost port. Idempotent: when a group already exists (a
    second call, or a test harness that made one) it is adopted as is.

    Args:
        backend (str | None): force ``"gloo"`` or ``"nccl"``; by default NCCL when CUDA is
            available, gloo otherwise.
    """
    if dist.is_initialized():
        return _make_env(dist.get_backend())
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if "RANK" in os.environ:
        if backend == "nccl":
            # Bind the device before init so NCCL's communicators land on the right GPU.
            torch.cuda.set_device(env_int("LOCAL_RANK", 0))
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(
            backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    env = _make_env(backend)
    logger.info("rank %d/%d on %s (%s)", env.rank, env.world_size, env.device, backend)
    return env


def destroy() -> None:
    """Destroys the default process group if there is one (safe to call twice)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    # The sharded model's reference cycles still hold the gloo ProcessGroup. Free them here: a
    # DataLoader worker forked later from this process (an in-process CLI call, as in the tests)
    # would otherwise collect that garbage itself and hang in ~ProcessGroupGloo, which waits on
    # gloo threads that do not exist in the child.
    gc.collect()


def abort() -> None:
    """Tears the process group down after a failure, without waiting for peers.

    ``destroy_process_group`` with NCCL blocks while another rank sits in a collective (a rank
    that raised mid-step leaves its peers there), so the failing process would never exit and
    torchrun would never restart or stop the job. NCCL communicators are aborted instead; gloo's
    teardown does not wait and is destroyed normally.
    """
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        from torch.distributed import distributed_c10d

        abort_group = getattr(distributed_c10d, "_abort_process_group", None)
        if abort_group is not None:
            try:
                abort_group()
            except Exception as e:  # best effort: the process is exiting with the original error
                logger.warning("aborting the NCCL process group failed: %s", e)
        return
    dist.destroy_process_group()
