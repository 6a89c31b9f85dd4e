"""The mixed-dimension embedding module that stands in for a TorchRec ``EmbeddingBagCollection``.

``MixedDimEmbeddingBagCollection`` holds a real ``EmbeddingBagCollection`` (attribute ``ebc``)
whose tables have their own widths, and maps each pooled output to the common width D with a
bias-free projection, as MDE does (Ginart et al. 2021, Sec. 3: ``E_t = V_t P_t``, ``P_t`` in
``R^{d_t x D}``; Xavier init as in dlrm ``tricks/md_embedding_bag.py``). Its output is a
``KeyedTensor`` of uniform width D keyed by the *output* fields, and ``embedding_bag_configs()``
reports one D-wide config per output field, so an unmodified ``torchrec.models.dlrm.DLRM`` or
``DLRM_DCN`` accepts it (they assert one width and read feature names from those configs).

Why a wrapper and not a subclass: ``DistributedModelParallel``'s default sharders find the inner
collection by type and shard it, the projections stay dense (DDP-replicated) parameters, and
``TrainPipelineSparseDist`` pipelines the inner collection because the KJT reaches ``self.ebc``
untouched (torchrec.md Sec. 1.3 and 3.4). Id remapping for compact tables happens on the host
(``embedding_methods.remap.IdRemapper``), never here.

A field can own several inner features (its width groups, ``<field>@g<k>``). Every id lives in
exactly one group, so with sum pooling the field's embedding is the sum of its groups' projected
pooled vectors: ``sum_g P_g sum_{i in bag, i in g} v_i``.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embedding_methods.plan import SizePlan, group_feature_name, load_plan, plan_file, resolve_init_checkpoint

logger = logging.getLogger(__name__)

RETRAIN_WEIGHTS = Path("retrain") / "compact_embedding.pt"
"""Where the trainer writes the retrained module's state_dict, relative to the run folder."""


class CompactWeightsError(ValueError):
    """Weights cannot be loaded into a compact module; the message names the file and the key."""


def table_name_for_feature(feature: str) -> str:
    """Inner table name of a KJT feature: ``t_<feature>`` with characters a module name forbids replaced."""
    return "t_" + re.sub(r"[^A-Za-z0-9_@-]", "_", feature)


class GroupedProjection(nn.Module):
    """Bias-free per-slot linear maps ``in_dims[i] -> out_dims[i]``, batched by shape.

    Slots with the same ``(in, out)`` share one ``[G, in, out]`` parameter (``weight_<in>x<out>``)
    and run as one ``torch.bmm`` instead of G small matmuls (torchrec.md Sec. 1.3). A slot whose
    in and out widths are equal is the identity and has no parameter. ``slot_weight(i)`` is the
    ``[in, out]`` view of slot i (the transpose of the ``nn.Linear(in, out).weight`` it replaces).

    Args:
        in_dims (list[int]): input width of each slot.
        out_dims (list[int]): output width of each slot.
        device (torch.device | str | None): where the parameters live (``meta`` defers init).
        init (str): ``"xavier"`` (uniform, bound ``sqrt(6 / (in + out))`` per slot) or ``"normal"``.
        init_std (float): standard deviation of the ``"normal"`` init.
    """

    def __init__(self, in_dims: list[int], out_dims: list[int], *, device: torch.device | str | None = None,
                 init: str = "xavier", init_std: float = 0.25) -> None:
        super().__init__()
        if len(in_dims) != len(out_dims):
            raise ValueError(f"GroupedProjection: {len(in_dims)} input widths but {len(out_dims)} output widths")
        if init not in ("xavier", "normal"):
            raise ValueError(f"GroupedProjection: init must be 'xavier' or 'normal', got {init!r}")
        self._init = init
        self._init_std = init_std
        self.in_dims = [int(d) for d in in_dims]
        self.out_dims = [int(d) for d in out_dims]
        groups: dict[tuple[int, int], list[int]] = {}
        for slot, (i, o) in enumerate(zip(self.in_dims, self.out_dims)):
            if i != o:
                groups.setdefault((i, o), []).append(slot)
        # (parameter name, slots) in first-appearance order; slot -> (parameter name, index in it).
        self._groups: list[tuple[str, list[int]]] = []
        self._slot_loc: dict[int, tuple[str, int]] = {}
        for (i, o), slots in groups.items():
            name = f"weight_{i}x{o}"
            # Registered directly on this module (not in a ParameterDict) so that DMP's meta-device
            # init, which calls reset_parameters() on the module owning a meta parameter, reaches it.
            self.register_parameter(name, nn.Parameter(torch.empty(len(slots), i, o, device=device)))
            self._groups.append((name, slots))
            for j, slot in enumerate(slots):
                self._slot_loc[slot] = (name, j)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, _ in self._groups:
            weight = getattr(self, name)
            if weight.is_meta:
                continue
            _, i, o = weight.shape
            with torch.no_grad():
                if self._init == "xavier":
                    bound = math.sqrt(6.0 / (i + o))
                    weight.uniform_(-bound, bound)
                else:
                    weight.normal_(0.0, self._init_std)

    def slot_weight(self, slot: int) -> torch.Tensor | None:
        """The ``[in, out]`` weight view of one slot, or None for an identity slot."""
        if slot not in self._slot_loc:
            return None
        name, j = self._slot_loc[slot]
        return getattr(self, name)[j]

    def num_params(self) -> int:
        return sum(getattr(self, name).numel() for name, _ in self._groups)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Maps ``xs[i]`` of shape ``[B, in_i]`` to ``[B, out_i]``."""
        ys = list(xs)
        for name, slots in self._groups:
            weight = getattr(self, name)
            if len(slots) == 1:
                ys[slots[0]] = torch.mm(xs[slots[0]], weight[0])
                continue
            out = torch.bmm(torch.stack([xs[s] for s in slots]), weight)  # [G, B, out]
            for j, s in enumerate(slots):
                ys[s] = out[j]
        return ys


class _ProjectedEmbeddingBagCollection(nn.Module):
    """Shared layout and forward of modules that project an inner EBC's pooled outputs to width D."""

    ebc: nn.Module

    def _init_layout(self, inner_configs: list[EmbeddingBagConfig], output_features: dict[str, list[str]],
                     embedding_dim: int, num_embeddings_per_field: dict[str, int] | None) -> None:
        name = type(self).__name__
        if embedding_dim <= 0 or embedding_dim % 4:
            raise ValueError(f"{name}: embedding_dim must be a positive multiple of 4, got {embedding_dim}")
        if not inner_configs:
            raise ValueError(f"{name}: needs at least one inner table (the plan prunes every field?)")
        if not output_features:
            raise ValueError(f"{name}: output_features is empty")
        slot_of_feature: dict[str, int] = {}
        for slot, cfg in enumerate(inner_configs):
            if len(cfg.feature_names) != 1:
                raise ValueError(f"{name}: inner table {cfg.name!r} must have exactly one feature, "
                                 f"got {cfg.feature_names}")
            if cfg.pooling != PoolingType.SUM:
                # Summing a field's groups (and MLET's collapse) is exact only for sum pooling.
                raise ValueError(f"{name}: inner table {cfg.name!r} must use SUM pooling, got {cfg.pooling}")
            feature = cfg.feature_names[0]
            if feature in slot_of_feature:
                raise ValueError(f"{name}: feature {feature!r} appears in two inner tables")
            slot_of_feature[feature] = slot
        used: dict[str, str] = {}
        output_slots: list[list[int]] = []
        for out_name, features in output_features.items():
            slots = []
            for feature in features:
                if feature not in slot_of_feature:
                    raise ValueError(f"{name}: output {out_name!r} lists feature {feature!r}, which no inner table has")
                if feature in used:
                    raise ValueError(f"{name}: feature {feature!r} is listed by outputs {used[feature]!r} and {out_name!r}")
                used[feature] = out_name
                slots.append(slot_of_feature[feature])
            output_slots.append(slots)
        unused = sorted(set(slot_of_feature) - set(used))
        if unused:
            raise ValueError(f"{name}: inner feature(s) {unused} belong to no output field")
        self._inner_configs = list(inner_configs)
        self._inner_features = [cfg.feature_names[0] for cfg in inner_configs]
        self._output_names = list(output_features)
        self._output_slots = output_slots
        self._embedding_dim = int(embedding_dim)
        counts = num_embeddings_per_field or {}
        self._output_configs = [
            EmbeddingBagConfig(
                name=f"t_{out_name}", embedding_dim=self._embedding_dim, feature_names=[out_name],
                num_embeddings=int(counts.get(out_name) or max(1, sum(inner_configs[s].num_embeddings for s in slots))),
            )
            for out_name, slots in zip(self._output_names, output_slots)
        ]

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    @property
    def feature_names(self) -> list[str]:
        """Output field names, in output order."""
        return list(self._output_names)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """One D-wide config per OUTPUT field (what ``torchrec.models.dlrm.SparseArch`` reads)."""
        return self._output_configs

    def inner_configs(self) -> list[EmbeddingBagConfig]:
        """The real (mixed-width) configs of the inner collection."""
        return self._inner_configs

    def _project(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled ``[B, D]`` embedding per output field, as a ``KeyedTensor`` (``length_per_key == [D] * F``)."""
        # to_dict(), never positions: a sharded collection returns keys in shard order (torchrec.md 0.6).
        pooled = self.ebc(features).to_dict()
        ys = self._project([pooled[f] for f in self._inner_features])
        outs = []
        for slots in self._output_slots:
            if not slots:  # the whole field is pruned: its embedding is zero
                outs.append(ys[0].new_zeros(ys[0].shape[0], self._embedding_dim))
                continue
            out = ys[slots[0]]
            for s in slots[1:]:
                out = out + ys[s]
            outs.append(out)
        return KeyedTensor(
            keys=self._output_names,
            length_per_key=[self._embedding_dim] * len(self._output_names),
            values=torch.cat(outs, dim=1),
        )


class MixedDimEmbeddingBagCollection(_ProjectedEmbeddingBagCollection):
    """A mixed-width ``EmbeddingBagCollection`` behind per-table projections to a common width D.

    Args:
        tables (list[EmbeddingBagConfig]): the inner tables (any widths, each with one feature and
            SUM pooling).
        output_features (dict[str, list[str]]): output field -> the inner features (width groups)
            whose projected pooled vectors are summed into it; ``[]`` gives a zero output.
        embedding_dim (int): the common output width D.
        projection (str): how a narrower table reaches D; only ``"linear"`` (bias-free, Xavier).
        device (torch.device | str | None): device of tables and projections (``meta`` defers init
            to ``DistributedModelParallel``, which calls ``reset_parameters``).
        num_embeddings_per_field (dict[str, int] | None): raw cardinality per output field, reported
            by ``embedding_bag_configs()`` (default: the field's inner rows).

    Example::

        tables = [EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=10, feature_names=["a"]),
                  EmbeddingBagConfig(name="t_b", embedding_dim=8, num_embeddings=5, feature_names=["b"])]
        m = MixedDimEmbeddingBagCollection(tables, {"a": ["a"], "b": ["b"]}, embedding_dim=8)
        kt = m(KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.tensor([1, 2, 3]), torch.tensor([1, 1, 1, 0])))
        assert kt.values().shape == (2, 16) and kt.length_per_key() == [8, 8]
    """

    def __init__(self, tables: list[EmbeddingBagConfig], output_features: dict[str, list[str]], embedding_dim: int,
                 projection: str = "linear", *, device: torch.device | str | None = None,
                 num_embeddings_per_field: dict[str, int] | None = None) -> None:
        super().__init__()
        if projection != "linear":
            raise ValueError(f"MixedDimEmbeddingBagCollection: projection must be 'linear', got {projection!r}")
        self._init_layout(tables, output_features, embedding_dim, num_embeddings_per_field)
        self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device(device) if device is not None else None)
        self.projection = GroupedProjection([t.embedding_dim for t in tables], [embedding_dim] * len(tables),
                                            device=device)

    def reset_parameters(self) -> None:
        """Re-initialises the projections (the tables belong to ``ebc``, sharded or not)."""
        self.projection.reset_parameters()

    def extra_embedding_params(self) -> int:
        """Parameters of the projections (not counted in the inner tables)."""
        return self.projection.num_params()

    def _project(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.projection(xs)


def build_retrain_module(plan: SizePlan, *, device: torch.device | str = "meta") -> MixedDimEmbeddingBagCollection:
    """The compact retrain module of a plan: one table ``t_<feature>`` per width group.

    Group ``k`` of field ``f`` is the table of KJT feature ``f`` (single group) or ``f@g<k>`` with
    one row per kept id, in the order ``IdRemapper`` numbers them. Tables are created on ``meta``
    by default, for ``DistributedModelParallel`` to materialise shard by shard.
    """
    plan.validate("build_retrain_module plan")
    tables: list[EmbeddingBagConfig] = []
    output_features: dict[str, list[str]] = {}
    for f in plan.fields:
        features = []
        for k, g in enumerate(f.groups):
            feature = group_feature_name(f.name, k, len(f.groups))
            tables.append(EmbeddingBagConfig(
                name=table_name_for_feature(feature), embedding_dim=int(g.width),
                num_embeddings=g.num_rows(f.num_embeddings), feature_names=[feature], pooling=PoolingType.SUM,
            ))
            features.append(feature)
        output_features[f.name] = features
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"build_retrain_module: table names {dup} clash after sanitising field names")
    return MixedDimEmbeddingBagCollection(
        tables, output_features, plan.embedding_dim, device=device,
        num_embeddings_per_field={f.name: f.num_embeddings for f in plan.fields},
    )


def features_to_kjt(features: dict[str, tuple[np.ndarray, np.ndarray]],
                    keys: list[str] | None = None) -> KeyedJaggedTensor:
    """A KJT from ``{feature: (values int64, lengths int32)}`` (e.g. an ``IdRemapper`` output)."""
    keys = list(features) if keys is None else keys
    values = np.concatenate([np.asarray(features[k][0], dtype=np.int64) for k in keys])
    lengths = np.concatenate([np.asarray(features[k][1], dtype=np.int32) for k in keys])
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.from_numpy(values),
                                               lengths=torch.from_numpy(lengths))


def load_module_weights(module: nn.Module, path: str | Path) -> None:
    """Loads a plain ``state_dict`` file (``torch.save``) or a ``torch.distributed.checkpoint`` folder."""
    path = Path(path)
    if not path.exists():
        raise CompactWeightsError(f"{path}: weights not found")
    if path.is_dir():
        import torch.distributed.checkpoint as dcp

        state = module.state_dict()
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as e:  # DCP raises CheckpointException / RuntimeError with per-key details
            raise CompactWeightsError(f"{path}: cannot load checkpoint into the plan's module: {e}") from None
        module.load_state_dict(state)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of a corrupt file
        raise CompactWeightsError(f"{path}: not a readable state_dict: {e}") from None
    if not isinstance(state, dict):
        raise CompactWeightsError(f"{path}: expected a state_dict, got {type(state).__name__}")
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CompactWeightsError(f"{path}: keys do not match the plan's module: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CompactWeightsError(f"{path}: {key} has shape {tuple(value.shape)}, the plan needs "
                                      f"{tuple(expected[key].shape)}")
    module.load_state_dict(state)


def load_compact_embedding(run_dir_or_plan: str | Path, device: torch.device | str = "cpu") -> MixedDimEmbeddingBagCollection:
    """The compact embedding module of a finished run, ready to stand in for a DLRM's EBC.

    Builds the module from ``RUN_DIR/plan.json`` (or the given plan file) and loads, in order of
    preference: the retrained weights ``RUN_DIR/retrain/compact_embedding.pt`` (a plain
    ``state_dict`` of this module written by the trainer), else the plan's ``init_checkpoint``
    (e.g. MLET's collapsed tables), else leaves the fresh initialisation (with a warning). Feed it
    KJTs produced by ``IdRemapper(plan)``.
    """
    plan_path = plan_file(run_dir_or_plan)
    plan = load_plan(plan_path)
    module = build_retrain_module(plan, device=device)
    weights = plan_path.parent / RETRAIN_WEIGHTS
    init = resolve_init_checkpoint(plan, plan_path)
    if weights.exists():
        load_module_weights(module, weights)
    elif init is not None:
        load_module_weights(module, init)
    else:
        logger.warning("%s: no retrained weights (%s) and no init checkpoint; the module is freshly initialised",
                       plan_path, weights)
    return module
