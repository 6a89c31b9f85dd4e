"""CTR metrics over a split spread across ranks: AUC (torchmetrics) and logloss.

Each rank scores its own part of the data. ``compute()`` gathers every rank's logits and labels
(uneven lengths allowed) in rank order, so every rank computes the same AUC on the same full
vector: the exact (threshold-free) ``binary_auroc`` of torchmetrics, and the mean binary
cross-entropy in float64.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_varlen(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates a 1-D tensor of any length from every rank, in rank order (on every rank)."""
    if _world() == 1:
        return tensor
    length = torch.tensor([tensor.numel()], device=tensor.device, dtype=torch.long)
    lengths = [torch.zeros_like(length) for _ in range(_world())]
    dist.all_gather(lengths, length)
    sizes = [int(n.item()) for n in lengths]
    padded = torch.zeros(max(sizes), device=tensor.device, dtype=tensor.dtype)
    padded[: tensor.numel()] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """AUC and logloss of logits against 0/1 labels (rank-local; see ``MetricAccumulator``).

    AUC is ``None`` when the labels hold one class only (it is undefined there).
    """
    logits = logits.detach().double().cpu()
    labels = labels.detach().double().cpu()
    if logits.numel() == 0:
        return {"auc": None, "logloss": None, "num_rows": 0}
    logloss = float(F.binary_cross_entropy_with_logits(logits, labels, reduction="mean"))
    positives = int(labels.sum().item())
    if 0 < positives < labels.numel():
        auc: float | None = float(binary_auroc(torch.sigmoid(logits), labels.long()))
    else:
        auc = None
    return {"auc": auc, "logloss": logloss if math.isfinite(logloss) else None, "num_rows": int(labels.numel())}


class MetricAccumulator:
    """Collects logits and labels batch by batch; ``compute()`` is collective (all ranks call it).

    Example::

        acc = MetricAccumulator()
        for batch in reader:
            _, (_, logits, labels) = model(batch)
            acc.update(logits, labels)
        acc.compute()  # {"auc": 0.79, "logloss": 0.45, "num_rows": 1000000}, same on every rank
    """

    def __init__(self) -> None:
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        # Kept on the device: moving every batch to the host would synchronise the GPU each step.
        self._logits.append(logits.detach().reshape(-1).float())
        self._labels.append(labels.detach().reshape(-1).float())

    def reset(self) -> None:
        self._logits.clear()
        self._labels.clear()

    def compute(self, device: torch.device | None = None) -> dict[str, float | None]:
        """Gathers all ranks' values and returns ``{"auc", "logloss", "num_rows"}`` (collective).

        Args:
            device (torch.device | None): where to run the gather (the rank's GPU under NCCL);
                defaults to the device of the collected tensors, or CPU when there are none.
        """
        if device is None:
            device = self._logits[0].device if self._logits else torch.device("cpu")
            if dist.is_initialized() and dist.get_backend() == "nccl" and device.type != "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
        logits = torch.cat(self._logits).to(device) if self._logits else torch.zeros(0, device=device)
        labels = torch.cat(self._labels).to(device) if self._labels else torch.zeros(0, device=device)
        return binary_metrics(all_gather_varlen(logits), all_gather_varlen(labels))
