"""The sharding and optimizer settings ``shard_model`` needs: the ``[sharding]`` and ``[optim]``
sections of the run configuration (``trainer/config.py`` assembles them with the others).

They live in the sharding layer so that the planner takes exactly these two sections, not the
trainer's whole ``Config``. Each validates itself in ``__post_init__`` and raises ``ConfigError``
naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass

from embdim.errors import check as _check

SPARSE_OPTIMIZERS = ("adagrad", "rowwise_adagrad", "adam", "sgd")
DENSE_OPTIMIZERS = ("adagrad", "adam", "sgd")
SHARDING_TYPES = ("auto", "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")


@dataclass
class OptimConfig:
    sparse_optimizer: str = "adagrad"
    """Optimizer fused into the embedding tables' backward: adagrad, rowwise_adagrad, adam, sgd."""
    sparse_lr: float = 0.05
    """Learning rate of the embedding tables."""
    dense_optimizer: str = "adam"
    """Optimizer of the dense (MLP, projection) parameters: adagrad, adam, sgd."""
    dense_lr: float = 0.001
    """Learning rate of the dense parameters."""
    eps: float = 1e-8
    """Epsilon of Adagrad/Adam."""
    weight_decay: float = 0.0
    """L2 weight decay of the dense parameters."""

    def __post_init__(self) -> None:
        _check(self.sparse_optimizer in SPARSE_OPTIMIZERS, "optim.sparse_optimizer",
               f"unknown {self.sparse_optimizer!r}; choose from {list(SPARSE_OPTIMIZERS)}")
        _check(self.dense_optimizer in DENSE_OPTIMIZERS, "optim.dense_optimizer",
               f"unknown {self.dense_optimizer!r}; choose from {list(DENSE_OPTIMIZERS)}")
        _check(self.sparse_lr > 0 and self.dense_lr > 0, "optim.sparse_lr", "learning rates must be positive")
        _check(self.eps > 0, "optim.eps", f"must be positive, got {self.eps}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")


@dataclass
class ShardingConfig:
    sharding_type: str = "auto"
    """Force one sharding type for every table, or "auto" to let the TorchRec planner choose."""
    compute_kernel: str = "fused"
    """Embedding compute kernel: "fused" (TBE in HBM / host memory) or "fused_uvm_caching" (GPU)."""
    comm_precision: str = "fp32"
    """Precision of the embedding all-to-all / reduce-scatter between ranks, forward and backward:
    "fp32", or "fp16" / "bf16" (TorchRec's quantized comms: half the bytes, rounded values)."""

    def __post_init__(self) -> None:
        _check(self.sharding_type in SHARDING_TYPES, "sharding.sharding_type",
               f"unknown {self.sharding_type!r}; choose from {list(SHARDING_TYPES)}")
        _check(self.comm_precision in ("fp32", "fp16", "bf16"), "sharding.comm_precision",
               f"unknown {self.comm_precision!r}; choose from ['fp32', 'fp16', 'bf16']")
        _check(self.compute_kernel in ("fused", "fused_uvm_caching"), "sharding.compute_kernel",
               f"unknown {self.compute_kernel!r}; choose from ['fused', 'fused_uvm_caching']")
