"""The protocol every embedding-size method implements (single-device logic only).

A method is used in two phases by ``trainer``:

search
    ``search_tables()`` gives the EmbeddingBagConfigs of the inner collection that DMP shards;
    ``build_search_module(ebc)`` wraps that (unsharded) collection in a module that stands in for
    a TorchRec ``EmbeddingBagCollection`` (``forward(KJT) -> KeyedTensor`` of uniform width
    ``embedding_dim``); ``search_loss(module)`` adds the method's regulariser to the task loss;
    ``export_plan(module, context)`` turns the searched state into a ``SizePlan``. Anything that
    needs ranks (reading sharded rows, global thresholds, evaluating candidates) goes through the
    ``SearchContext`` that ``trainer`` passes in; method files never import torch.distributed.

retrain
    ``retrain_module(plan)`` (shared, in ``embedding_methods.mixed_dim``) builds the compact
    mixed-dimension module from the plan, whatever method produced it.

The search phase (``trainer/phases.py::run_search``) calls every hook below unconditionally; the
defaults here are what a method that does not override one gets. In call order: ``check_budget``,
``fit_schedule`` (when ``requires_search_training``), ``warm_start`` (``--init-from``, when
``supports_warm_start``), ``init_search_state``, the ``required_search_steps`` check, the
step-0 copy (``needs_initial_checkpoint``), training, ``bind_model``, ``export_plan``,
``retrain_init_state`` (when ``wants_retrain_init()``). Methods never receive the trainer: what
needs ranks, data or checkpoints goes through the ``SearchContext``.

Before any training the trainer asks the method two things, with plain numbers only:
``check_budget(budget)`` raises ``BudgetError`` (one wording for every method, naming the floor)
when no plan of the method fits the budget, and ``fit_schedule(schedule)`` lets a method whose
settings count training steps (PME's saliency batches) adapt them to the steps the data gives,
or fail naming the setting to change. Adaptations are recorded in ``plan.extra["adaptations"]``.

A subclass registers itself by name (``embedding_methods.METHODS``): see ``name``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from embdim.embedding_methods.plan import LAYOUTS, WIDTH_MULTIPLE, layout_projection_params
from embdim.errors import ConfigError


@dataclass(frozen=True)
class FieldSpec:
    """One sparse field of the dataset, as the methods see it."""

    name: str
    """Feature name (KJT key, output key of the embedding module)."""
    num_embeddings: int
    """Cardinality of the field (ids in [0, num_embeddings))."""
    multi_hot: bool = False
    """True when a row can carry several ids of this field."""


class BudgetError(ValueError):
    """A budget below the smallest plan a method can make (its floor).

    Every method raises this one exception, with one wording: ``<method>: budget B is below the
    floor of this method (<what its smallest plan is>); the floor is F``. F is rounded up to 4
    decimals, so ``--budget F`` is always reachable.
    """

    def __init__(self, method: str, budget: float, floor: float, reason: str) -> None:
        self.method, self.budget, self.floor = method, float(budget), float(floor)
        shown = math.ceil(floor * 1e4 - 1e-9) / 1e4
        super().__init__(f"{method}: budget {budget:g} is below the floor of this method ({reason}); "
                         f"the floor is {shown:.4f}")


@dataclass(frozen=True)
class TrainingSchedule:
    """The training the search phase will run, known before it starts (from ``dataset.json``,
    the batch size and the number of ranks)."""

    steps_per_epoch: int
    """Batches every rank trains on per epoch."""
    epochs: int
    """Epochs of the search (``train.epochs``)."""
    max_steps: int = 0
    """``train.max_steps`` (0 = no cap)."""
    world_size: int = 1
    """Ranks."""
    batch_size: int = 1
    """Rows per batch and rank (``data.batch_size``)."""
    valid_rows: int = 0
    """Rows of the validation split (0 = the dataset has none)."""

    @property
    def total_steps(self) -> int:
        """Training steps the search runs: epochs x steps per epoch, capped by ``max_steps``."""
        total = self.epochs * self.steps_per_epoch
        return min(total, self.max_steps) if self.max_steps else total

    def describe(self) -> str:
        text = (f"{self.steps_per_epoch} batches of {self.batch_size} rows per rank per epoch on {self.world_size} "
                f"rank(s) x {self.epochs} epoch(s)")
        return text + (f", train.max_steps={self.max_steps}" if self.max_steps else "")


class SearchContext(Protocol):
    """What the search phase offers a method for distributed steps (implemented in ``trainer``)."""

    budget: float
    """Target fraction of the full-width embedding parameters (1.0 = no budget)."""
    embedding_dim: int
    """The full (common) width D."""
    fields: list[FieldSpec]
    """The dataset's sparse fields."""

    def local_rows(self, table_name: str) -> Iterator[tuple[int, torch.Tensor]]:
        """Yields ``(first_global_row, rows)`` for each local shard of a sharded table (live views)."""
        ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums a tensor over ranks (identity on one rank)."""
        ...

    def gather_table_rows(self, table_name: str) -> torch.Tensor:
        """The full ``[num_rows, width]`` weight of a sharded table, assembled on every rank."""
        ...

    def evaluate(self, score_fn: Callable[[Any], None]) -> None:
        """Runs ``score_fn(batch)`` over this rank's part of the validation split in eval mode."""
        ...

    def counts(self, field_name: str) -> np.ndarray:
        """The train-split id counts of a field (``counts/<field>.npy``, memory-mapped)."""
        ...

    def load_tables(self, path: Path, key_map: dict[str, str]) -> dict[str, str]:
        """Loads tables of a DCP checkpoint (a ``step_N`` folder, or a run folder whose
        ``ckpt/latest`` names one) into the live sharded tables: ``key_map`` maps a checkpoint
        table key suffix to a search-model key suffix. Collective. Returns ``{checkpoint key:
        model key}``; raises ``ValueError`` naming the folder or the unmatched key."""
        ...


class EmbeddingMethod(ABC):
    """Base class of a method. Subclasses define ``name`` and a nested ``Config`` dataclass."""

    name: str = ""
    """The method's name: ``--method``, its config section (``[<name>]`` in configs/methods.toml,
    a ``RunConfig`` field), ``plan.method``. Set it to a literal: the registry reads it from the
    source (``embedding_methods._discover``)."""
    report_order: int = -1
    """Position in ``METHOD_NAMES`` (reports, CLI help, ``compare``'s default grid), ascending; a
    literal in the class body, like ``name``."""
    default_layout: str = "pad"
    """The plan layout (``embedding_methods.plan.LAYOUTS``) used when the run does not choose one:
    ``pad`` (zero padding, the papers' models) for every method but MDE, which is defined with
    projections."""
    search_trains_compact_model: bool = False
    """True when the plan's start weights already compute exactly what the trained search model
    computed (MLET's collapse): the retrain phase then only evaluates them unless
    ``retrain.epochs`` asks for fine-tuning."""
    requires_search_training: bool = True
    """False for a closed-form plan (fixed, MDE): the search phase trains nothing and calls
    ``export_plan(None, context)`` with a context that reads no model."""
    supports_warm_start: bool = False
    """True when ``warm_start`` can start the search from a trained baseline
    (``search.init_from``); the search refuses ``--init-from`` for the others before training."""
    needs_initial_checkpoint: bool = False
    """True when ``retrain_init_state`` needs the search module's step-0 weights (a
    lottery-ticket rewind): the search phase then keeps an unsharded copy of them (also on disk,
    so a resumed search still has them) and passes it as ``initial``."""
    required_search_steps: int = 0
    """Training steps the search must run for ``export_plan`` to work (0 = any number); a
    ``train.max_steps`` below it fails before training."""

    def __init__(self, config: Any, fields: list[FieldSpec], embedding_dim: int, *, layout: str | None = None) -> None:
        config_cls = getattr(type(self), "Config", None)
        if config_cls is not None and not isinstance(config, config_cls):
            raise ValueError(f"{self.name}: config must be {type(self).__name__}.Config, got {type(config).__name__}")
        if not fields:
            raise ValueError(f"{self.name}: no sparse fields")
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim <= 0 \
                or embedding_dim % 4:
            # FBGEMM TBE: every sharded table width is a multiple of 4 (docs/torchrec-notes.md#table-widths).
            raise ValueError(f"{self.name}: embedding_dim must be a positive multiple of 4, got {embedding_dim!r}")
        layout = self.default_layout if layout is None else layout
        if layout not in LAYOUTS:
            raise ValueError(f"{self.name}: layout must be one of {list(LAYOUTS)}, got {layout!r}")
        self.config = config
        self.fields = list(fields)
        self.embedding_dim = embedding_dim
        self.layout = layout
        """How the exported plan's narrow groups reach D; the budget counts what it stores."""
        self.adaptations: list[str] = []
        """Settings ``fit_schedule`` changed to fit the data, one sentence each."""

    # -- before training ------------------------------------------------------------------------

    def budget_floor(self) -> tuple[float, str]:
        """``(fraction, what)``: the smallest achieved fraction of any plan this method can export
        under its layout, and a few words saying what that plan is. Known before training, from
        the cardinalities alone (0 when every id can be pruned)."""
        return 0.0, "every id can be pruned"

    def check_budget(self, budget: float | None) -> None:
        """Raises ``BudgetError`` when ``budget`` (< 1) is below ``budget_floor()``; call it before
        training, so an unreachable budget costs nothing."""
        if budget is None or budget >= 1.0:
            return
        floor, reason = self.budget_floor()
        if budget < floor * (1 - 1e-12):
            raise BudgetError(self.name, budget, floor, reason)

    def fit_schedule(self, schedule: TrainingSchedule) -> list[str]:
        """Adapts settings that count training steps to ``schedule`` before the search module is
        built; returns one sentence per change (also kept in ``self.adaptations``, logged by the
        caller and recorded in the plan). Raises ``ValueError`` naming the one setting to change
        when it cannot adapt. The default has no such settings."""
        return []

    def record_adaptations(self, plan: "Any") -> None:
        """Adds ``self.adaptations`` to ``plan.extra["adaptations"]`` (nothing when there are none)."""
        if self.adaptations:
            plan.extra["adaptations"] = [*plan.extra.get("adaptations", []), *self.adaptations]

    @abstractmethod
    def search_tables(self) -> list[EmbeddingBagConfig]:
        """EmbeddingBagConfigs of the inner collection trained (and sharded) during search."""

    @abstractmethod
    def build_search_module(self, ebc: EmbeddingBagCollection) -> nn.Module:
        """Wraps the inner collection; the result stands in for an EmbeddingBagCollection."""

    def search_loss(self, module: nn.Module) -> torch.Tensor | None:
        """Extra term added to the task loss during search (None = none)."""
        return None

    def extra_optimizers(self, module: nn.Module) -> list[torch.optim.Optimizer]:
        """Optimizers for parameters that must not use the dense optimizer (e.g. thresholds)."""
        return []

    def extra_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        """Parameters owned by ``extra_optimizers`` (the trainer excludes them from the dense one)."""
        return []

    def warm_start(self, module: nn.Module, context: SearchContext, path: Path) -> dict[str, str]:
        """Starts the search from a trained baseline's checkpoint at ``path`` (``--init-from``),
        before training and only when not resuming; tables load through ``context.load_tables``
        (the search phase loads the dense arches itself). Collective. Returns ``{checkpoint key:
        search-model key}``. Called only when ``supports_warm_start``; the default has none."""
        raise ConfigError(f"search.init_from: method {self.name!r} has no warm start")

    def init_search_state(self, module: nn.Module, context: SearchContext) -> None:
        """Fills per-id state of the search module (frequency side tables, zeroed accumulators)
        after sharding and before training, shard by shard through ``context.local_rows``. The
        default has none."""

    def bind_model(self, model: nn.Module) -> None:
        """Gives the method the trained model (the sharded DLRM holding the search module) after
        training, before ``export_plan``, for methods that score candidates with whole-model
        forwards (OptEmbed's evolution). The default needs none."""

    @abstractmethod
    def export_plan(self, module: nn.Module, context: SearchContext) -> "Any":
        """Turns the searched state into a ``embedding_methods.plan.SizePlan``."""

    def wants_retrain_init(self) -> bool:
        """True when ``retrain_init_state`` gives start values for the retrain (then the trainer
        gathers an unsharded copy of the trained search module to pass it)."""
        return False

    def retrain_init_state(self, searched: nn.Module, initial: nn.Module | None,
                           plan: "Any") -> dict[str, torch.Tensor] | None:
        """Start values of the retrain module, as a ``state_dict`` of
        ``mixed_dim.build_retrain_module(plan)``, or None for a fresh initialisation.

        Args:
            searched: an unsharded CPU copy of the trained search module.
            initial: the same at step 0 when ``needs_initial_checkpoint`` is true, else None.
            plan: the exported ``SizePlan``.
        """
        return None


def uniform_floor(cardinalities: list[int], embedding_dim: int, layout: str) -> float:
    """Fraction of the plan keeping every id at width 4 (with one ``4 -> D`` projection per field
    under ``project``): the floor of the methods that never prune an id."""
    params = WIDTH_MULTIPLE * sum(cardinalities) + layout_projection_params(
        [WIDTH_MULTIPLE] * len(cardinalities), embedding_dim, layout)
    return params / (sum(cardinalities) * embedding_dim)


def full_width_params(fields: list[FieldSpec], embedding_dim: int) -> int:
    """Parameters of the full-width model: every id of every field at width D."""
    return sum(f.num_embeddings for f in fields) * embedding_dim
