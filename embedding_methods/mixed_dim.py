"""The mixed-dimension embedding module that stands in for a TorchRec ``EmbeddingBagCollection``.

``MixedDimEmbeddingBagCollection`` holds a real ``EmbeddingBagCollection`` (attribute ``ebc``)
whose tables have their own widths, and brings each pooled output to the common width D in one
of two layouts (``embedding_methods.plan.LAYOUTS``):

``pad``
    a width-w table's pooled vector becomes its w values followed by D - w zeros. Nothing is
    stored beyond the tables. This is the compact model of OptEmbed, AMTL, PME and MLET (a
    narrower embedding is the full one with its trailing dims masked to zero; docs/methods.md#layouts).
``project``
    a bias-free projection, as MDE does (Ginart et al. 2021, Sec. 3: ``E_t = V_t P_t``, ``P_t``
    in ``R^{d_t x D}``; Xavier init as in dlrm ``tricks/md_embedding_bag.py``).

Its output is a ``KeyedTensor`` of uniform width D keyed by the *output* fields, and
``embedding_bag_configs()`` reports one D-wide config per output field, so an unmodified
``torchrec.models.dlrm.DLRM`` or ``DLRM_DCN`` accepts it (they assert one width and read feature
names from those configs).

Why a wrapper and not a subclass: ``DistributedModelParallel``'s default sharders find the inner
collection by type and shard it, the projections stay dense (DDP-replicated) parameters, and
``TrainPipelineSparseDist`` pipelines the inner collection because the KJT reaches ``self.ebc``
untouched (docs/torchrec-notes.md#stand-in-modules). Id remapping for compact tables happens on the host
(``embedding_methods.remap.IdRemapper``), never here.

A field can own several inner features (its width groups, ``<field>@g<k>``). Every id lives in
exactly one group, so with sum pooling the field's embedding is the sum of its groups' projected
(or padded) pooled vectors: ``sum_g P_g sum_{i in bag, i in g} v_i``.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embdim.embedding_methods.compact import CompactModuleMixin, CompactSource, attach_source
from embdim.embedding_methods.gemm import batched_weight_grad
from embdim.embedding_methods.plan import (LAYOUTS, SizePlan, group_feature_name, load_plan, plan_file,
                                           resolve_init_checkpoint)
from embdim.embedding_methods.remap import FeatureNames, rename_plan

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
    and run as one ``torch.bmm`` instead of G small matmuls (docs/torchrec-notes.md#stand-in-modules). A slot whose
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

    def groups(self) -> list[tuple[str, list[int]]]:
        """``(parameter name, slots)`` of every non-identity group, in parameter order."""
        return list(self._groups)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Maps ``xs[i]`` of shape ``[B, in_i]`` to ``[B, out_i]``."""
        ys = list(xs)
        for name, slots in self._groups:
            weight = getattr(self, name)
            if len(slots) == 1:
                ys[slots[0]] = torch.mm(xs[slots[0]], weight[0])
                continue
            out = torch.bmm(torch.stack([xs[s] for s in slots]), weight)  # [G, B, out]
            # unbind, not out[j]: each out[j] has its own SelectBackward, which zero-fills a whole
            # [G, B, out] gradient, and autograd sums the G of them (O(G^2 * B * out) memory
            # traffic, most of the compact model's step at large batches); unbind's backward is
            # one stack.
            for s, y in zip(slots, out.unbind(0)):
                ys[s] = y
        return ys


def _strided(t: torch.Tensor, first: int, step: int, count: int, width: int) -> torch.Tensor:
    """``[count, B, width]`` view of the column blocks ``[first + j * step, + width)`` of a
    row-major ``[B, S]`` tensor (no copy; every BLAS batched GEMM takes these strides)."""
    return t.as_strided((count, t.shape[0], width), (step, t.stride(0), 1), t.storage_offset() + first)


def _progression(xs: list[int], min_step: int) -> int | None:
    """The common difference of ``xs`` if they step by one constant ``>= min_step`` (1 element:
    ``min_step``), else None."""
    if len(xs) == 1:
        return min_step
    step = xs[1] - xs[0]
    if step < min_step or any(b - a != step for a, b in zip(xs, xs[1:])):
        return None
    return step


class _GroupLayout:
    """Where one ``GroupedProjection`` group reads its inputs and writes its outputs.

    ``in_step`` / ``out_step``: the column / field step when the group's slots sit at evenly
    spaced positions (strided views, no copy); None = gathered through an index. ``mode``:
    ``"write"`` / ``"index_copy"`` when the group is the first to contribute to each of its fields,
    ``"add"`` / ``"index_add"`` otherwise (strided / indexed); ``needs_zero`` when only some of its
    fields already have a contribution (the output must start zeroed).
    """

    def __init__(self, weight: int, in_width: int, columns: list[int], fields: list[int], dim: int,
                 written: set[int]) -> None:
        self.weight, self.in_width, self.columns, self.fields = weight, in_width, columns, fields
        self.in_step = _progression(columns, in_width)
        self.out_step = _progression(fields, 1)
        fresh = [f not in written for f in fields]
        first = all(fresh)
        self.needs_zero = any(fresh) and not first
        if self.out_step is not None:
            self.mode = "write" if first else "add"
        else:
            self.mode = "index_copy" if first else "index_add"
        self.column_index = [c + k for c in columns for k in range(in_width)]
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input column index [G * in], field index [G])`` on ``device``, made once (a fresh
        host-to-device copy every step would synchronise the stream)."""
        if device not in self._on:
            self._on[device] = (torch.tensor(self.column_index, dtype=torch.long, device=device),
                                torch.tensor(self.fields, dtype=torch.long, device=device))
        return self._on[device]

    def inputs(self, values: torch.Tensor) -> torch.Tensor:
        """``[G, B, in]`` inputs of the group (a view when evenly spaced, else a gathered copy)."""
        g = len(self.columns)
        if self.in_step is not None:
            return _strided(values, self.columns[0], self.in_step, g, self.in_width)
        columns, _ = self.indices(values.device)
        return values.index_select(1, columns).view(values.shape[0], g, self.in_width).transpose(0, 1)

    def outputs(self, out: torch.Tensor, dim: int) -> torch.Tensor:
        """``[G, B, D]`` view of the group's output fields in a ``[B, F * D]`` tensor (``out_step`` set)."""
        return _strided(out, self.fields[0] * dim, self.out_step * dim, len(self.fields), dim)


class _ProjectionLayout:
    """How the pooled ``[B, S]`` values of an inner collection (keys in the collection's order)
    map through a ``GroupedProjection`` into the ``[B, F * D]`` output (fields in output order).

    Built once per key order (a sharded collection returns keys in shard order). Groups write in
    parameter order; identity slots (in = out = D) are copied or added after them.
    """

    def __init__(self, projection: GroupedProjection, slot_columns: list[int], width: int,
                 field_of_slot: list[int | None], num_fields: int, dim: int) -> None:
        self.num_fields, self.dim, self.width = num_fields, dim, width
        self.weight_names = [name for name, _ in projection.groups()]
        written: set[int] = set()
        self.groups: list[_GroupLayout] = []
        for k, (_, slots) in enumerate(projection.groups()):
            group = _GroupLayout(k, projection.in_dims[slots[0]], [slot_columns[s] for s in slots],
                                 [field_of_slot[s] for s in slots], dim, written)
            written.update(group.fields)
            self.groups.append(group)
        # Identity slots (in = out = D): one more group, copied (or added) instead of multiplied.
        identity = [slot for slot in range(len(field_of_slot)) if projection.slot_weight(slot) is None]
        self.identity: _GroupLayout | None = None
        if identity:
            self.identity = _GroupLayout(-1, dim, [slot_columns[s] for s in identity],
                                         [field_of_slot[s] for s in identity], dim, written)
            written.update(self.identity.fields)
        # A zeroed output when some field has no slot (pruned) or a group adds to part of its fields.
        self.zero_init = len(written) < num_fields or any(g.needs_zero for g in self.all_groups())
        # Every field one whole width-D table, in output order: the pooled values are the output.
        ident = self.identity
        self.passthrough = (not self.groups and ident is not None and len(ident.fields) == num_fields
                            and ident.columns == [f * dim for f in range(num_fields)]
                            and ident.fields == list(range(num_fields)))

    def all_groups(self) -> list[_GroupLayout]:
        return self.groups + ([self.identity] if self.identity is not None else [])


class _ProjectPooled(torch.autograd.Function):
    """``out[:, f] = sum over the slots s of field f of values[:, cols(s)] @ W_s``, straight from
    the inner collection's pooled ``[B, S]`` values into one ``[B, F * D]`` output.

    Same arithmetic as ``GroupedProjection.forward`` followed by the per-field sums and the concat
    of ``_ProjectedEmbeddingBagCollection.forward``, without their copies: each group is one
    batched GEMM whose inputs are strided views of ``values`` and whose output is written (or
    accumulated, ``baddbmm_``) into strided views of ``out``; its backward is two batched GEMMs per
    group on strided views of the output gradient (no ``split``/``stack``/``cat``, no per-slot
    ``SelectBackward``). Only groups whose slots are unevenly spaced gather (``index_select``) and
    scatter (``index_add_`` / ``index_copy_``) through cached index tensors.
    """

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, layout: _ProjectionLayout, *weights: torch.Tensor) -> torch.Tensor:
        values = values.contiguous()
        ctx.layout = layout
        ctx.save_for_backward(values, *weights)
        batch, dim = values.shape[0], layout.dim
        out = (values.new_zeros if layout.zero_init else values.new_empty)(batch, layout.num_fields * dim)
        for g in layout.all_groups():
            x = g.inputs(values)
            if g.mode == "write":
                if g.weight < 0:
                    g.outputs(out, dim).copy_(x)
                else:
                    torch.bmm(x, weights[g.weight], out=g.outputs(out, dim))
            elif g.mode == "add":
                dest = g.outputs(out, dim)
                dest.add_(x) if g.weight < 0 else dest.baddbmm_(x, weights[g.weight])
            else:
                _, fields = g.indices(values.device)
                y = (x if g.weight < 0 else torch.bmm(x, weights[g.weight])).transpose(0, 1)
                out3 = out.view(batch, layout.num_fields, dim)
                out3.index_copy_(1, fields, y) if g.mode == "index_copy" else out3.index_add_(1, fields, y)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, *weights = ctx.saved_tensors
        layout: _ProjectionLayout = ctx.layout
        grad = grad.contiguous()
        batch, dim = values.shape[0], layout.dim
        need_values = ctx.needs_input_grad[0]
        # Every input column belongs to exactly one slot, so every column is written below.
        grad_values = values.new_empty(values.shape) if need_values else None
        grad_weights: list[torch.Tensor | None] = [None] * len(weights)
        for g in layout.all_groups():
            if g.out_step is not None:
                gy = g.outputs(grad, dim)  # [G, B, D] view
            else:
                _, fields = g.indices(grad.device)
                gy = grad.view(batch, layout.num_fields, dim).index_select(1, fields).transpose(0, 1)
            w = weights[g.weight] if g.weight >= 0 else None
            if w is not None and ctx.needs_input_grad[2 + g.weight]:
                # Split over rows: one batched GEMM would give each [in, D] gradient one block.
                grad_weights[g.weight] = batched_weight_grad(g.inputs(values), gy)
            if not need_values:
                continue
            if g.in_step is not None:
                dest = _strided(grad_values, g.columns[0], g.in_step, len(g.columns), g.in_width)
                dest.copy_(gy) if w is None else torch.bmm(gy, w.transpose(1, 2), out=dest)
            else:
                columns, _ = g.indices(grad.device)
                gx = gy if w is None else torch.bmm(gy, w.transpose(1, 2))
                grad_values.index_copy_(1, columns, gx.transpose(0, 1).reshape(batch, -1))
        return (grad_values, None, *grad_weights)


class _PadLayout:
    """Where the ``pad`` layout puts each pooled column: column ``c`` of a slot of width w (its
    ``j``-th value) goes to output column ``field * D + j``; the other output columns stay zero.

    ``index_copy_`` when no two columns share a destination (one group per field), ``index_add_``
    when a field sums several groups; both are one kernel forward and one ``index_select``
    backward. ``passthrough`` when the input already is the output (every field one D-wide slot,
    in output order); ``uniform_width`` (w) when every field is one w-wide slot in output order:
    then the padding is one strided copy into a ``[B, F, D]`` view, no index at all.
    """

    def __init__(self, destinations: list[int], num_fields: int, dim: int) -> None:
        self.destinations = destinations
        self.num_fields, self.dim = num_fields, dim
        self.accumulate = len(set(destinations)) != len(destinations)
        self.passthrough = destinations == list(range(num_fields * dim))
        width, rest = divmod(len(destinations), num_fields)
        self.uniform_width = width if not rest and 0 < width and destinations == [
            (c // width) * dim + c % width for c in range(len(destinations))] else 0
        self._on: dict[torch.device, torch.Tensor] = {}

    def index(self, device: torch.device) -> torch.Tensor:
        # Made once per device: a fresh host-to-device copy every step would synchronise the stream.
        if device not in self._on:
            self._on[device] = torch.tensor(self.destinations, dtype=torch.long, device=device)
        return self._on[device]

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        if self.passthrough:
            return values
        batch = values.shape[0]
        if self.uniform_width:
            out = values.new_zeros(batch, self.num_fields, self.dim)
            out[:, :, :self.uniform_width] = values.view(batch, self.num_fields, self.uniform_width)
            return out.view(batch, self.num_fields * self.dim)
        out = values.new_zeros(batch, self.num_fields * self.dim)
        index = self.index(values.device)
        return out.index_add_(1, index, values) if self.accumulate else out.index_copy_(1, index, values)


class _ProjectedEmbeddingBagCollection(CompactModuleMixin, nn.Module):
    """Shared layout and forward of modules that bring an inner EBC's pooled outputs to width D:
    projection stages (possibly none), then, for the ``pad`` layout, zero padding to D."""

    ebc: nn.Module

    def _init_layout(self, inner_configs: list[EmbeddingBagConfig], output_features: dict[str, list[str]],
                     embedding_dim: int, num_embeddings_per_field: dict[str, int] | None, layout: str) -> None:
        name = type(self).__name__
        if layout not in LAYOUTS:
            raise ValueError(f"{name}: layout must be one of {list(LAYOUTS)}, got {layout!r}")
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
        self._layout = layout
        # (projection, layout) per stage and the pad step, per key order of the inner collection's output.
        self._layouts: dict[tuple, tuple[list[tuple[GroupedProjection, _ProjectionLayout]], _PadLayout | None]] = {}
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
    def layout(self) -> str:
        """``"pad"`` or ``"project"``: how a narrower table's pooled vector reaches width D."""
        return self._layout

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

    def projection_stages(self) -> list[GroupedProjection]:
        """The projections applied in turn to the inner pooled values (the ``pad`` layout may have
        none); under ``project`` the last one outputs D."""
        raise NotImplementedError(f"{type(self).__name__} must list its projection stages")

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled ``[B, D]`` embedding per output field, as a ``KeyedTensor`` (``length_per_key == [D] * F``)."""
        self.check_input(features)  # not remapped by IdRemapper: a clear error (embedding_methods.compact)
        # The KJT reaches the (sharded) collection untouched, as pipelining needs; the projection
        # is one opaque fx node (it reads the pooled output's key order).
        return _project_pooled(self, self.ebc(features))

    def project_pooled(self, pooled: KeyedTensor) -> KeyedTensor:
        """Brings the inner collection's pooled output (any key order) to width D: one
        ``_ProjectPooled`` call per projection stage, then the ``pad`` step if the layout pads."""
        values = pooled.values()
        stages, pad = self._projection_layouts(pooled.keys(), pooled.length_per_key())
        for projection, layout in stages:
            if not layout.passthrough:
                weights = [getattr(projection, name) for name in layout.weight_names]
                values = _ProjectPooled.apply(values, layout, *weights)
        if pad is not None:
            values = pad.apply(values)
        return KeyedTensor(keys=self._output_names, length_per_key=[self._embedding_dim] * len(self._output_names),
                           values=values)

    def _projection_layouts(self, keys: list[str], lengths: list[int]
                            ) -> tuple[list[tuple[GroupedProjection, _ProjectionLayout]], _PadLayout | None]:
        """``(projection, layout)`` per stage and the pad step (None under ``project``) for one key
        order of the inner output (cached).

        Stage 0 reads the slots where the inner output put them; a later stage reads the previous
        stage's ``[B, F * width]`` output, which has one block per field, so it needs one slot per
        field (MLET's ``k -> d -> D``). The pad step reads the last stage's field blocks, or the
        inner slots when there is no stage."""
        cache_key = (tuple(keys), tuple(lengths))
        cache = self._layouts
        if cache_key in cache:
            return cache[cache_key]
        name = type(self).__name__
        stages = self.projection_stages()
        if sorted(keys) != sorted(self._inner_features):
            raise ValueError(f"{name}: the inner collection returned keys {keys}, expected {self._inner_features}")
        column, offset = {}, 0
        for key, length in zip(keys, lengths):
            column[key] = offset
            offset += length
        widths = dict(zip(keys, lengths))
        for slot, feature in enumerate(self._inner_features):
            table_width = stages[0].in_dims[slot] if stages else self._inner_configs[slot].embedding_dim
            if widths[feature] != table_width:
                raise ValueError(f"{name}: inner feature {feature!r} is {widths[feature]} wide, "
                                 f"its table {table_width}")
        field_of_slot: list[int | None] = [None] * len(self._inner_features)
        for field, slots in enumerate(self._output_slots):
            for slot in slots:
                field_of_slot[slot] = field
        num_fields = len(self._output_names)
        columns, width = [column[f] for f in self._inner_features], offset
        layouts = []
        pad = self._layout == "pad"
        for k, projection in enumerate(stages):
            last_projects = k == len(stages) - 1 and not pad
            out_width = self._embedding_dim if last_projects else projection.out_dims[0]
            if k > 0:
                if any(len(slots) != 1 for slots in self._output_slots):
                    raise ValueError(f"{name}: a projection after the first needs exactly one slot per field")
                width_in = stages[k - 1].out_dims[0]
                columns, width = [field * width_in for field in field_of_slot], num_fields * width_in  # type: ignore[operator]
            if any(d != out_width for d in projection.out_dims):
                raise ValueError(f"{name}: projection stage {k} must output width {out_width} for every slot")
            layouts.append((projection, _ProjectionLayout(projection, columns, width, field_of_slot, num_fields,
                                                          out_width)))
        pad_layout = None
        if pad:
            dim = self._embedding_dim
            wide = [f for f in self._inner_features if widths[f] > dim] if not stages else \
                ([self._inner_features[0]] if stages[-1].out_dims[0] > dim else [])
            if wide:
                raise ValueError(f"{name}: pad layout: {wide[0]!r} is wider than embedding_dim {dim}")
            if stages:
                # The last stage wrote one block of its output width per field, in field order.
                block = stages[-1].out_dims[0]
                destinations = [field * dim + j for field in range(num_fields) for j in range(block)]
            else:
                # Straight from the inner slots; every input column belongs to exactly one slot.
                destinations = [0] * offset
                for slot, feature in enumerate(self._inner_features):
                    start = column[feature]
                    for j in range(widths[feature]):
                        destinations[start + j] = field_of_slot[slot] * dim + j  # type: ignore[operator]
            pad_layout = _PadLayout(destinations, num_fields, dim)
        cache[cache_key] = (layouts, pad_layout)
        return layouts, pad_layout


class MixedDimEmbeddingBagCollection(_ProjectedEmbeddingBagCollection):
    """A mixed-width ``EmbeddingBagCollection`` whose outputs are padded or projected to a common width D.

    Args:
        tables (list[EmbeddingBagConfig]): the inner tables (any widths, each with one feature and
            SUM pooling).
        output_features (dict[str, list[str]]): output field -> the inner features (width groups)
            whose projected pooled vectors are summed into it; ``[]`` gives a zero output.
        embedding_dim (int): the common output width D.
        layout (str): how a narrower table reaches D: ``"project"`` (bias-free linear map, Xavier
            init) or ``"pad"`` (trailing zeros, no parameters).
        device (torch.device | str | None): device of tables and projections (``meta`` defers init
            to ``DistributedModelParallel``, which calls ``reset_parameters``).
        num_embeddings_per_field (dict[str, int] | None): raw cardinality per output field, reported
            by ``embedding_bag_configs()`` (default: the field's inner rows).

    Example::

        tables = [EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=10, feature_names=["a"]),
                  EmbeddingBagConfig(name="t_b", embedding_dim=8, num_embeddings=5, feature_names=["b"])]
        m = MixedDimEmbeddingBagCollection(tables, {"a": ["a"], "b": ["b"]}, embedding_dim=8, layout="pad")
        kt = m(KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.tensor([1, 2, 3]), torch.tensor([1, 1, 1, 0])))
        assert kt.values().shape == (2, 16) and kt.length_per_key() == [8, 8]
    """

    def __init__(self, tables: list[EmbeddingBagConfig], output_features: dict[str, list[str]], embedding_dim: int,
                 layout: str = "project", *, device: torch.device | str | None = None,
                 num_embeddings_per_field: dict[str, int] | None = None) -> None:
        super().__init__()
        self._init_layout(tables, output_features, embedding_dim, num_embeddings_per_field, layout)
        self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device(device) if device is not None else None)
        # pad stores nothing beyond the tables: no projection module at all (not an empty one), so
        # the state_dict, the optimizer groups and the parameter count hold the tables alone.
        self.projection = GroupedProjection([t.embedding_dim for t in tables], [embedding_dim] * len(tables),
                                            device=device) if layout == "project" else None

    def reset_parameters(self) -> None:
        """Re-initialises the projections (the tables belong to ``ebc``, sharded or not)."""
        if self.projection is not None:
            self.projection.reset_parameters()

    def extra_embedding_params(self) -> int:
        """Parameters of the projections (not counted in the inner tables; 0 under ``pad``)."""
        return 0 if self.projection is None else self.projection.num_params()

    def projection_stages(self) -> list[GroupedProjection]:
        return [] if self.projection is None else [self.projection]


def _project_pooled(module: _ProjectedEmbeddingBagCollection, pooled: KeyedTensor) -> KeyedTensor:
    return module.project_pooled(pooled)


# One opaque node for the train pipeline's fx trace (it sees ``ebc(features)``, then this call).
torch.fx.wrap("_project_pooled")


def build_retrain_module(plan: SizePlan, *, device: torch.device | str = "meta",
                         data_type: DataType = DataType.FP32,
                         feature_names: FeatureNames = None) -> MixedDimEmbeddingBagCollection:
    """The compact retrain module of a plan: one table ``t_<feature>`` per width group, padded or
    projected to D as ``plan.layout`` says.

    Group ``k`` of field ``f`` is the table of KJT feature ``f`` (single group) or ``f@g<k>`` with
    one row per kept id, in the order ``IdRemapper`` numbers them. Tables are created on ``meta``
    by default, for ``DistributedModelParallel`` to materialise shard by shard, and stored as
    ``data_type`` (``DataType.FP16``: half-precision tables; projections stay fp32).
    ``feature_names`` renames the fields (``remap.rename_plan``): KJT features and outputs take the
    new names, the tables keep the plan's (so the run's weights load unchanged).
    """
    plan.validate("build_retrain_module plan")
    renamed = rename_plan(plan, feature_names, "build_retrain_module feature_names")
    tables: list[EmbeddingBagConfig] = []
    output_features: dict[str, list[str]] = {}
    for f, rf in zip(plan.fields, renamed.fields):
        features = []
        for k, g in enumerate(f.groups):
            feature = group_feature_name(rf.name, k, len(f.groups))
            tables.append(EmbeddingBagConfig(
                name=table_name_for_feature(group_feature_name(f.name, k, len(f.groups))), embedding_dim=int(g.width),
                num_embeddings=g.num_rows(f.num_embeddings), feature_names=[feature], pooling=PoolingType.SUM,
                data_type=data_type,
            ))
            features.append(feature)
        output_features[rf.name] = features
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"build_retrain_module: table names {dup} clash after sanitising field names")
    return MixedDimEmbeddingBagCollection(
        tables, output_features, plan.embedding_dim, plan.layout, device=device,
        num_embeddings_per_field={f.name: f.num_embeddings for f in renamed.fields},
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


def load_compact_embedding(run_dir_or_plan: str | Path, device: torch.device | str = "cpu", *,
                           feature_names: FeatureNames = None) -> MixedDimEmbeddingBagCollection:
    """The compact embedding module of a finished run, ready to stand in for a DLRM's EBC.

    Builds the module from ``RUN_DIR/plan.json`` (or the given plan file) and loads, in order of
    preference: the retrained weights ``RUN_DIR/retrain/compact_embedding.pt`` (a plain
    ``state_dict`` of this module written by the trainer), else the plan's ``init_checkpoint``
    (e.g. MLET's collapsed tables), else leaves the fresh initialisation (with a warning). Feed it
    KJTs produced by ``IdRemapper(plan)`` (same ``feature_names``).

    On ``device="meta"`` (TorchRec's way to build a model for ``DistributedModelParallel``) nothing
    is loaded: the module records its weights in ``compact_source``. DMP builds fresh sharded
    tables in any case, so call ``embdim.sharding.restore_compact_weights(dmp_model)`` after it.
    """
    plan_path = plan_file(run_dir_or_plan)
    plan = load_plan(plan_path)
    module = build_retrain_module(plan, device=device, feature_names=feature_names)
    weights = plan_path.parent / RETRAIN_WEIGHTS
    init = resolve_init_checkpoint(plan, plan_path)
    source = weights if weights.exists() else init
    attach_source(module, CompactSource(plan=plan_path, weights=source, feature_names=feature_names))
    if source is None:
        logger.warning("%s: no retrained weights (%s) and no init checkpoint; the module is freshly initialised",
                       plan_path, weights)
    elif torch.device(device).type != "meta":
        load_module_weights(module, source)
    return module
