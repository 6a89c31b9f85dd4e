"""Logging: the stdout logger every process uses, and scalar loggers (no-op or TensorBoard).

Only rank 0 writes scalars; the trainer hands other ranks a ``BaseLogger``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

_FORMAT = "[embdim] %(asctime)s - %(name)s - %(levelname)s - %(message)s"


def init_logger(level: int = logging.INFO) -> None:
    """Routes ``logging`` to stdout in one format, tagged with the rank under torchrun.

    Non-zero ranks log warnings and errors only, so a multi-rank run prints each info line once.
    """
    rank = os.environ.get("RANK")
    fmt = _FORMAT if rank is None else _FORMAT.replace("%(name)s", f"rank{rank} %(name)s")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_embdim", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(_quiet_libraries)
    handler._embdim = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level if rank in (None, "0") else max(level, logging.WARNING))
    # TorchRec's planner warns about hand-built topologies and dry-run estimates on every plan;
    # neither applies here, and the warnings drown the run's own lines.
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    # The train pipeline logs every exhausted iterator at INFO; keep torchrec to warnings.
    logging.getLogger("torchrec").setLevel(max(level, logging.WARNING))
    # torch.fx warns about is_fx_tracing each time the train pipeline traces the model.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    # Deprecation notices raised inside torch.distributed / torchrec, not by our calls.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torchrec|torch\.distributed)(\.|$)")


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Drops FBGEMM's INFO lines (it logs each table-batched kernel's arguments on the root logger)."""
    return record.levelno >= logging.WARNING or "fbgemm_gpu" not in record.pathname


class BaseLogger:
    """Scalar logger interface; this base class drops everything (ranks other than 0)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(BaseLogger):
    """Writes scalars to ``log_dir`` with ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            if value is not None:
                self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def build_logger(run_dir: str | Path, *, enabled: bool, is_main: bool) -> BaseLogger:
    """TensorBoard on rank 0 when enabled (``RUN_DIR/tensorboard``), otherwise the no-op logger."""
    if enabled and is_main:
        return TensorBoardLogger(Path(run_dir) / "tensorboard")
    return BaseLogger()
