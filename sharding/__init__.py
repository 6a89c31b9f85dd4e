"""Sharding: the distributed environment (``distributed``), the [sharding] and [optim] settings
(``config``), planner constraints and sharders (``planner``), shard-local reads and edits
(``state``), and retrained compact weights into a sharded model (``compact``).

``restore_compact_weights`` is importable from here; it loads on first use, so importing the
package costs nothing until then.
"""

from __future__ import annotations

from typing import Any

__all__ = ["restore_compact_weights"]


def __getattr__(name: str) -> Any:
    # PEP 562: torch and torchrec load with the first name that needs them.
    if name == "restore_compact_weights":
        from embdim.sharding.compact import restore_compact_weights

        return restore_compact_weights
    raise AttributeError(f"module 'embdim.sharding' has no attribute {name!r}")
