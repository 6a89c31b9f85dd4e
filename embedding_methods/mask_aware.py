"""A mask-aware stand-in for an ``EmbeddingBagCollection``: per-id masks applied before pooling.

Per-id methods (AMTL, PME) decide something for every looked-up row, and a pooled bag is a sum of
rows, so on a multi-hot field the mask must act on each row before the sum
(docs/torchrec-notes.md#per-id-masks). ``MaskAwareEmbedding`` therefore looks the ids up with a real, unpooled
``EmbeddingCollection`` (child ``ec``, every table of width D; DMP shards it, and the KJT reaches it
unmodified so ``TrainPipelineSparseDist`` pipelines it), applies ``mask_fn`` row by row, sum-pools
each bag and returns a ``KeyedTensor`` of width D per field, like the EBC it replaces.

Children, all looked up with the same KJT (so every table lives wherever the planner puts it,
and a row's side data sits on the shard that owns that row of the side table):

``ebc`` (optional)
    Single-hot fields with ``pooled_single_hot=True``: one id per bag, so the pooled vector *is*
    the row and the per-id mask is exact on it, while the output all-to-all moves one vector per bag
    instead of L (docs/torchrec-notes.md#per-id-masks). Multi-hot fields always go through ``ec``.
``ec`` (optional)
    The unpooled full-width table of every other field.
``side`` / ``side_pooled`` (optional, width 4)
    Frozen per-id side features (``side_table_rows``), e.g. AMTL's frequency input. Not trained:
    its output is detached, so no gradient ever reaches its TBE and its fused optimizer (plain SGD,
    lr 0, attached here so that the sharder finds exactly one) never runs. That is cleaner than
    relying on lr 0 alone: the values cannot drift whatever optimizer the table ends up with.
``acc`` / ``acc_pooled`` (optional, width D)
    A saliency accumulator with the main table's rows
    (docs/torchrec-notes.md#side-tables): zeroed, looked up, and given the gradient ``-|e * dL/de|`` by
    ``SaliencyTap``; its fused optimizer is plain SGD with lr 1, so ``acc -= lr * grad`` adds the
    saliency into the rows, repeated ids summed by the TBE backward. The design note adds
    ``-(acc_out * saliency.detach()).sum()`` to the loss; ``dL/de`` is unknown at forward time,
    so the tap produces the same gradient directly in its backward instead.

``side`` and ``acc`` are ``EmbeddingCollection``s over the unpooled fields; ``side_pooled`` and
``acc_pooled`` are ``EmbeddingBagCollection``s over the pooled single-hot fields (one id per bag:
the pooled vector is the row and its gradient the row's), so that all P pooled fields are tapped
and masked at once on ``[B, P, width]`` views of the three EBC outputs, without per-field loops
or copies (GPU steps are launch-bound at small batches and memory-bound at large ones). Every
table keeps its name (``side_<field>``, ``acc_<field>``) whichever collection holds it.

Pooling is a segment sum over each bag: ``torch.segment_reduce(..., "sum", lengths=...)`` (CPU and
CUDA kernels with autograd), falling back to ``index_add`` over ``repeat_interleave(lengths)``.
``torch.ops.fbgemm.segment_sum_csr`` exists in fbgemm-gpu-cpu 1.8 but registers no autograd
kernel (backward warns and yields no gradient) and sums flat scalars, so it is not used.

The trainer's obligations (see also ``embedding_methods.amtl`` / ``pme``): build the module on any
device (``meta`` included), attach its sparse optimizer only to table parameters that carry no
``_optimizer_classes`` yet (``side`` and ``acc`` already have theirs), shard, then call the method's
``init_search_state(module, context)`` to fill ``side`` and zero ``acc`` shard by shard.

Example::

    module = MaskAwareEmbedding(fields, embedding_dim=16, mask_fn=my_mask, use_side=True)
    kt = module(kjt)                      # KeyedTensor, width 16 per field
    module.fill_side_tables(context, context.counts)
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.fx
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embdim.embedding_methods.base import FieldSpec

logger = logging.getLogger(__name__)

SIDE_WIDTH = 4
"""Width of the side table: FBGEMM TBE needs a multiple of 4 (docs/torchrec-notes.md#table-widths)."""
NUM_SIDE_FEATURES = 3
"""Meaningful columns of a side row; the last column is padding to ``SIDE_WIDTH``."""

ROW_LOCAL_SHARDING_TYPES = ("table_wise", "row_wise", "table_row_wise")
"""Sharding types that keep each row of a table whole on one rank."""

MaskFn = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
"""``mask_fn(field_name, rows [L, D], side [L, 4]) -> mask [L, D]``, multiplied into the rows."""


def main_table_name(field_name: str) -> str:
    """The full-width search table of a field (TorchRec DLRM convention, as the baseline's)."""
    return f"t_{field_name}"


def side_table_name(field_name: str) -> str:
    return f"side_{field_name}"


def acc_table_name(field_name: str) -> str:
    return f"acc_{field_name}"


def side_features(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Side features of ids whose train counts are ``values``, in the field whose counts are ``counts``.

    Columns (float32):

    0. ``log1p(count)``, the paper's occurrence-count input (docs/methods.md#amtl);
    1. count-rank fraction: the share of the field's ids with a strictly larger count, in ``[0, 1)``
       (0 for the most frequent ids; ids with equal counts share a rank);
    2. normalised frequency ``alpha = log1p(count) / log1p(max count of the field)`` in ``[0, 1]``
       (0 when the field has no occurrences). The log keeps alpha informative under the heavy tail of
       CTR ids, where ``count / max_count`` is ~0 for all but a handful of ids;
    3. 0 (padding to width 4).

    Every column is a function of the count alone, so ids with equal counts get equal rows.

    Args:
        values (np.ndarray): counts of the ids to describe.
        counts (np.ndarray): ``[num_embeddings]`` counts of the whole field (``counts/<field>.npy``).

    Returns:
        ``[len(values), 4]`` float32 array.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array, got shape {counts.shape}")
    if np.any(counts < 0):
        raise ValueError("counts must be >= 0")
    values = np.asarray(values).astype(np.int64)
    sorted_counts = np.sort(counts.astype(np.int64))
    greater = counts.size - np.searchsorted(sorted_counts, values, side="right")
    log_count = np.log1p(values.astype(np.float64))
    log_max = np.log1p(float(sorted_counts[-1]))
    rows = np.zeros((values.size, SIDE_WIDTH), dtype=np.float32)
    rows[:, 0] = log_count
    rows[:, 1] = greater / counts.size
    rows[:, 2] = log_count / log_max if log_max > 0 else 0.0
    return rows


def side_table_rows(counts: np.ndarray, *, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows ``[start, stop)`` of a field's side table (see ``side_features`` for the columns).

    Args:
        counts (np.ndarray): ``[num_embeddings]`` train-split id counts of the field.
        start (int): first id of the slice.
        stop (int | None): end of the slice (None = ``num_embeddings``).

    Returns:
        ``[stop - start, 4]`` float32 array.
    """
    num = len(counts)
    stop = num if stop is None else stop
    if not 0 <= start <= stop <= num:
        raise ValueError(f"rows [{start}, {stop}) out of range [0, {num})")
    return side_features(np.asarray(counts[start:stop]), counts)


class SaliencyTap(torch.autograd.Function):
    """Identity on the looked-up rows whose backward also feeds the accumulator rows.

    Forward: returns ``rows``. Backward, given ``g = dL/drows``:

    - accumulator gradient ``-active * |rows * g|`` (SNIP connection sensitivity, Lee et al. 2019,
      per occurrence; SGD with lr 1 on ``acc`` turns it into ``acc += |e * dL/de|``);
    - row gradient ``g * pass_grad`` (``pass_grad = 0`` freezes the main table: every fused
      optimizer the trainer offers moves a row by an amount proportional to its gradient, except
      Adam with momentum left over from earlier steps).

    ``active`` and ``pass_grad`` are 0-dim tensors, so gating needs no host sync; ``pass_grad``
    None passes the gradient through untouched (no multiply by a constant 1). Rows of any shape
    ``[..., D]`` (one field ``[L, D]`` or P single-hot fields ``[B, P, D]`` at once).
    """

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, acc_rows: torch.Tensor, active: torch.Tensor,
                pass_grad: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(rows, active, pass_grad)
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, None, None]:
        rows, active, pass_grad = ctx.saved_tensors
        # -|rows * g| * active, with two in-place passes instead of abs, neg and mul (-x * a == x * -a).
        saliency = (rows.detach() * grad).abs_().mul_(-active.to(grad.dtype))
        if not ctx.needs_input_grad[0]:  # detached rows (tables frozen throughout)
            return None, saliency, None, None
        return grad if pass_grad is None else grad * pass_grad.to(grad.dtype), saliency, None, None


_segment_reduce_ok: dict[tuple[str, torch.dtype], bool] = {}


def segment_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sums consecutive rows of ``values`` [L, D] into ``[len(lengths), D]`` bags (empty bag -> 0)."""
    key = (values.device.type, values.dtype)
    if _segment_reduce_ok.get(key, True):
        try:
            return torch.segment_reduce(values, "sum", lengths=lengths, axis=0, unsafe=True)
        except (RuntimeError, NotImplementedError) as e:
            logger.warning("torch.segment_reduce unavailable for %s (%s); pooling with index_add", key, e)
            _segment_reduce_ok[key] = False
    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths.to(torch.long),
                                  output_size=values.shape[0])
    out = torch.zeros(lengths.numel(), values.shape[1], dtype=values.dtype, device=values.device)
    return out.index_add(0, bag, values)


class MaskAwareEmbedding(nn.Module):
    """Stands in for an ``EmbeddingBagCollection`` (uniform width D) with per-id masks before pooling.

    Args:
        fields (list[FieldSpec]): the dataset's sparse fields (output order).
        embedding_dim (int): D, a multiple of 4.
        mask_fn (MaskFn | None): per-row multiplicative mask (see ``MaskFn``); an ``nn.Module`` is
            registered as child ``mask_net`` (dense, DDP-replicated). None = no mask.
        use_side (bool): look up the frozen side table and pass its rows to ``mask_fn``.
        use_saliency (bool): add the ``acc`` table and the ``SaliencyTap``.
        saliency_start (int): first training step (0-based forward count) that accumulates saliency.
        saliency_steps (int): number of steps that accumulate saliency.
        freeze_tables_from (int): from this training step on, no gradient reaches the main tables
            (-1 = never). PME uses it so saliency is measured at one point of training and the
            tables keep their values for "rewind".
        pooled_single_hot (bool): single-hot fields use the pooled ``ebc`` (see module docstring).
        ebc (EmbeddingBagCollection | None): the pooled collection of the single-hot fields, as the
            trainer builds it from ``search_tables()``; None (or an empty one) builds it here.
        device (torch.device | None): where to create the tables (``meta`` for DMP); default:
            ``ebc.device``, else CPU.
    """

    def __init__(self, fields: list[FieldSpec], embedding_dim: int, *, mask_fn: MaskFn | None = None,
                 use_side: bool = False, use_saliency: bool = False, saliency_start: int = 0,
                 saliency_steps: int = 0, freeze_tables_from: int = -1, pooled_single_hot: bool = True,
                 ebc: EmbeddingBagCollection | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        if not fields:
            raise ValueError("MaskAwareEmbedding: no sparse fields")
        if embedding_dim <= 0 or embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {embedding_dim}")
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate field names in {names}")
        if saliency_start < 0 or saliency_steps < 0:
            raise ValueError(f"saliency_start and saliency_steps must be >= 0, got {saliency_start}, {saliency_steps}")
        self.fields = list(fields)
        self.feature_names = names
        self.embedding_dim = embedding_dim
        self.pooled_names = [f.name for f in fields if pooled_single_hot and not f.multi_hot]
        self.unpooled_names = [n for n in names if n not in self.pooled_names]
        self.saliency_start = saliency_start
        self.saliency_stop = saliency_start + saliency_steps
        self.freeze_tables_from = freeze_tables_from
        # An empty EBC has no parameter to tell its device by; its ``device`` property still does.
        device = device if device is not None else (ebc.device if ebc is not None else torch.device("cpu"))
        by_name = {f.name: f for f in fields}

        self.ebc: EmbeddingBagCollection | None = None
        if self.pooled_names:
            expected = {main_table_name(n): (by_name[n].num_embeddings, [n]) for n in self.pooled_names}
            if ebc is not None and ebc.embedding_bag_configs():
                got = {c.name: (c.num_embeddings, list(c.feature_names)) for c in ebc.embedding_bag_configs()}
                dims = {c.embedding_dim for c in ebc.embedding_bag_configs()}
                if got != expected or dims != {embedding_dim}:
                    raise ValueError(f"ebc tables {sorted(got)} (widths {sorted(dims)}) do not match the pooled "
                                     f"single-hot fields {sorted(expected)} at width {embedding_dim}; build it "
                                     f"from the method's search_tables()")
                self.ebc = ebc
            else:
                self.ebc = EmbeddingBagCollection(self.pooled_bag_configs(), device=device)
        elif ebc is not None and ebc.embedding_bag_configs():
            raise ValueError("ebc holds tables but no field takes the pooled path; pass an empty one or None")

        def ec(width: int, name_fn: Callable[[str], str], field_names: list[str]) -> EmbeddingCollection:
            return EmbeddingCollection(
                [EmbeddingConfig(name=name_fn(n), num_embeddings=by_name[n].num_embeddings, embedding_dim=width,
                                 feature_names=[n]) for n in field_names], device=device)

        def ebc_of(width: int, name_fn: Callable[[str], str], field_names: list[str]) -> EmbeddingBagCollection:
            return EmbeddingBagCollection(
                [EmbeddingBagConfig(name=name_fn(n), num_embeddings=by_name[n].num_embeddings, embedding_dim=width,
                                    feature_names=[n]) for n in field_names], device=device)

        self.use_side, self.use_saliency = use_side, use_saliency
        unpooled, pooled = self.unpooled_names, self.pooled_names
        self.ec = ec(embedding_dim, main_table_name, unpooled) if unpooled else None
        # Side and accumulator tables of the unpooled fields (an EC each) and of the pooled
        # single-hot ones (an EBC each: one id per bag, so its pooled vector is the row, and the
        # outputs come as one [B, P * width] tensor, aligned with the main EBC's without copies).
        self.side = ec(SIDE_WIDTH, side_table_name, unpooled) if use_side and unpooled else None
        self.acc = ec(embedding_dim, acc_table_name, unpooled) if use_saliency and unpooled else None
        self.side_pooled = ebc_of(SIDE_WIDTH, side_table_name, pooled) if use_side and pooled else None
        self.acc_pooled = ebc_of(embedding_dim, acc_table_name, pooled) if use_saliency and pooled else None
        # Exactly one fused optimizer per table parameter (the sharder asserts it). lr 0 on the
        # side table is a second guard on top of the detached output.
        for child, lr in ((self.side, 0.0), (self.side_pooled, 0.0), (self.acc, 1.0), (self.acc_pooled, 1.0)):
            if child is not None:
                apply_optimizer_in_backward(torch.optim.SGD, child.parameters(), {"lr": lr})
        # A module mask is a registered child (its parameters are dense and DDP-replicated); a plain
        # callable is kept outside the module tree. Either way it is reached as ``mask_fn``.
        if isinstance(mask_fn, nn.Module):
            self.mask_net = mask_fn
        else:
            self._mask_callable = mask_fn
        # Buffers: DMP turns meta buffers into zeros on its device, which is the right start.
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.int64, device=device))
        """Training forwards seen so far (schedules the saliency window without host syncs)."""
        self.register_buffer("side_filled", torch.zeros((), dtype=torch.int64, device=device))
        """1 once ``fill_side_tables`` ran (checked once, on the first forward)."""
        self._side_checked = False
        self._order_index: dict[tuple, torch.Tensor] = {}

    @property
    def mask_fn(self) -> MaskFn | None:
        return self.mask_net if "mask_net" in self._modules else self._mask_callable

    # ----------------------------------------------------------------------------------------
    # EmbeddingBagCollection surface

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """One D-wide config per field, as DLRM's constructor reads them (feature order = fields)."""
        return [EmbeddingBagConfig(name=main_table_name(f.name), num_embeddings=f.num_embeddings,
                                   embedding_dim=self.embedding_dim, feature_names=[f.name]) for f in self.fields]

    def pooled_bag_configs(self) -> list[EmbeddingBagConfig]:
        """Configs of the pooled single-hot tables (what ``search_tables()`` returns)."""
        return [c for c in self.embedding_bag_configs() if c.feature_names[0] in self.pooled_names]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        # Every child receives the batch's KJT unchanged (pipelining needs it), and all lookups
        # start before any result is used so their output all-to-alls overlap.
        ebc_out = self.ebc(features) if self.ebc is not None else None
        ec_out = self.ec(features) if self.ec is not None else None
        side_out = self.side(features) if self.side is not None else None
        acc_out = self.acc(features) if self.acc is not None else None
        side_pooled_out = self.side_pooled(features) if self.side_pooled is not None else None
        acc_pooled_out = self.acc_pooled(features) if self.acc_pooled is not None else None
        return _mask_and_pool(self, ebc_out, ec_out, side_out, acc_out, side_pooled_out, acc_pooled_out)

    def mask_and_pool(self, ebc_out: Any, ec_out: Any, side_out: Any, acc_out: Any, side_pooled_out: Any = None,
                      acc_pooled_out: Any = None) -> KeyedTensor:
        """Taps, masks and pools the lookups of one batch (see the module docstring).

        The pooled single-hot fields go together: their rows, side rows and accumulator rows are
        ``[B, P, width]`` views of the EBC outputs (reordered only where a sharded collection
        returned its keys in another order), tapped and masked in one pass each, and the output is
        a view of the result when no unpooled field needs concatenating. Unpooled fields go one by
        one (their bags have any number of ids), as ``[L, 1, width]``.
        """
        if self.use_side and not self._side_checked:
            if int(self.side_filled) != 1:
                raise RuntimeError("MaskAwareEmbedding: the side table was never filled; the trainer must call "
                                   "the method's init_search_state(module, context) after sharding")
            self._side_checked = True
        active = pass_grad = None
        if self.use_saliency:
            steps = self.num_steps
            active = ((steps >= self.saliency_start) & (steps < self.saliency_stop)) & self.training
            # Frozen from step 0: no gate, the path is cut in _tap_and_mask.
            pass_grad = steps < self.freeze_tables_from if self.freeze_tables_from > 0 else None
        dim = self.embedding_dim
        pooled, pooled_keys = None, []
        if ebc_out is not None:
            pooled_keys = list(ebc_out.keys())
            pooled = self._aligned(ebc_out, pooled_keys, dim)
            acc = self._aligned(acc_pooled_out, pooled_keys, dim) if acc_pooled_out is not None else None
            side = self._aligned(side_pooled_out, pooled_keys, SIDE_WIDTH) if side_pooled_out is not None else None
            pooled = self._tap_and_mask(pooled_keys, pooled, acc, side, active, pass_grad)
        outputs = {}
        for name in self.unpooled_names:
            jt = ec_out[name]
            acc = acc_out[name].values().unsqueeze(1) if acc_out is not None else None
            side = side_out[name].values().unsqueeze(1) if side_out is not None else None
            rows = self._tap_and_mask([name], jt.values().unsqueeze(1), acc, side, active, pass_grad)
            outputs[name] = segment_sum(rows.squeeze(1), jt.lengths())
        if self.training:
            with torch.no_grad():
                self.num_steps += 1
        names = list(self.feature_names)
        if pooled is not None and pooled_keys == names:
            values = pooled.reshape(pooled.shape[0], len(names) * dim)  # a view: no copy
        else:
            # unbind, not pooled[:, j]: each such select's backward zero-fills a whole [B, P, D]
            # gradient and autograd sums the P of them (O(P^2 * B * D) traffic: 20 ms of a 54 ms
            # PME step on 2 H200s, where the sharded lookup returns its keys in shard order);
            # unbind's backward is one stack.
            position = {n: j for j, n in enumerate(pooled_keys)}
            columns = pooled.unbind(1) if pooled is not None else ()
            values = torch.cat([columns[position[n]] if n in position else outputs[n] for n in names], dim=1)
        return KeyedTensor(keys=names, length_per_key=[dim] * len(names), values=values)

    def _aligned(self, kt: KeyedTensor, keys: list[str], width: int) -> torch.Tensor:
        """``[B, P, width]`` rows of a pooled collection's output, in the order ``keys``: a view, or
        one gather when the collection returned its keys in another order."""
        own = list(kt.keys())
        values = kt.values()
        if sorted(own) != sorted(keys) or set(kt.length_per_key()) != {width}:
            raise ValueError(f"MaskAwareEmbedding: a pooled lookup returned keys {own} of widths "
                             f"{kt.length_per_key()}, expected {keys} at width {width}")
        rows = values.reshape(values.shape[0], len(own), width)
        if own == keys:
            return rows
        cache_key = (tuple(own), tuple(keys), values.device)
        index = self._order_index.get(cache_key)
        if index is None:  # made once: a host-to-device copy every step would synchronise
            position = {n: j for j, n in enumerate(own)}
            index = torch.tensor([position[n] for n in keys], dtype=torch.long, device=values.device)
            self._order_index[cache_key] = index
        return rows.index_select(1, index)

    def _tap_and_mask(self, names: list[str], rows: torch.Tensor, acc: torch.Tensor | None,
                      side: torch.Tensor | None, active: torch.Tensor | None,
                      pass_grad: torch.Tensor | None) -> torch.Tensor:
        """Saliency tap and mask on ``rows`` ``[N, P, D]`` of the P fields ``names``, with their
        accumulator rows ``[N, P, D]`` and side rows ``[N, P, 4]`` (N = B for pooled single-hot
        fields, the L looked-up ids of one unpooled field otherwise)."""
        if acc is not None:
            if acc.shape != rows.shape:
                raise ValueError(f"MaskAwareEmbedding: fields {names}: {tuple(rows.shape)} looked-up rows but "
                                 f"{tuple(acc.shape)} accumulator rows (a single-hot field needs one id per bag)")
            if self.freeze_tables_from == 0:
                # Frozen from the first step (PME's default): a gate would pass a zero gradient
                # every step, so the path is cut instead. Same updates (a fused optimizer moves no
                # row on a zero gradient), without the main tables' backward: their gradient
                # all-to-all and TBE backward, and the [B, F, D] zero gradient itself.
                rows = rows.detach()
            rows = SaliencyTap.apply(rows, acc, active, pass_grad)
        mask_fn = self.mask_fn
        if mask_fn is not None:
            side = side.detach() if side is not None else rows.new_zeros(rows.shape[0], rows.shape[1], SIDE_WIDTH)
            if hasattr(mask_fn, "mask_rows"):  # all P fields in one call (AMTLMaskNet)
                rows = mask_fn.mask_rows(names, rows, side)
            else:
                masked = [rows[:, j] * mask_fn(n, rows[:, j], side[:, j]) for j, n in enumerate(names)]
                rows = masked[0].unsqueeze(1) if len(masked) == 1 else torch.stack(masked, dim=1)
        return rows

    # ----------------------------------------------------------------------------------------
    # Search-state helpers (rank-local; the context does the collectives)

    def main_table_names(self) -> list[str]:
        return [main_table_name(n) for n in self.feature_names]

    def table_names(self) -> list[str]:
        """Every table of the module (main, side, accumulator): what a gather of the whole search
        state (e.g. an unsharded copy for the retrain's start values) must cover."""
        names = self.main_table_names()
        if self.use_side:
            names += [side_table_name(n) for n in self.feature_names]
        if self.use_saliency:
            names += [acc_table_name(n) for n in self.feature_names]
        return names

    def sharding_constraints(self) -> dict[str, list[str]]:
        """Allowed sharding types of every table, for the planner's ``ParameterConstraints``.

        Whole rows on one rank (no column-wise split): a side row is one TBE-width unit, and the
        exports read per-row state shard-locally. Never ``data_parallel``: a replicated accumulator
        would have its gradients all-reduced by DDP and stepped by the trainer's sparse optimizer
        instead of its own SGD with lr 1.
        """
        return {name: list(ROW_LOCAL_SHARDING_TYPES) for name in self.table_names()}

    def full_table(self, table_name: str) -> torch.Tensor:
        """The whole weight of a table of an *unsharded* module (e.g. the trainer's CPU copy)."""
        key, value = _table_weight(self, table_name)
        if hasattr(value, "local_shards"):
            raise ValueError(f"{key} is sharded; gather it through the SearchContext instead")
        return _plain(value).detach()

    def fill_side_tables(self, context: Any, counts_fn: Callable[[str], np.ndarray]) -> None:
        """Writes ``side_table_rows(counts)`` into this rank's shards of every side table."""
        if not self.use_side:
            raise ValueError("this module has no side table (use_side=False)")
        with torch.no_grad():
            for f in self.fields:
                counts = counts_fn(f.name)
                if len(counts) != f.num_embeddings:
                    raise ValueError(f"counts of field {f.name!r} have {len(counts)} entries, the field has "
                                     f"{f.num_embeddings} ids")
                for first, rows in context.local_rows(side_table_name(f.name)):
                    if rows.shape[1] != SIDE_WIDTH:
                        raise ValueError(f"side table of {f.name!r}: a local shard has {rows.shape[1]} columns; "
                                         f"side tables must not be split column-wise")
                    values = side_table_rows(counts, start=first, stop=first + rows.shape[0])
                    rows.copy_(torch.from_numpy(values).to(rows.device, rows.dtype))
            self.side_filled.fill_(1)

    def zero_accumulators(self, context: Any) -> None:
        """Zeroes this rank's shards of every saliency accumulator."""
        if not self.use_saliency:
            raise ValueError("this module has no accumulator (use_saliency=False)")
        with torch.no_grad():
            for f in self.fields:
                for _, rows in context.local_rows(acc_table_name(f.name)):
                    rows.zero_()

    def saliency_steps_done(self) -> int:
        """Training steps that have accumulated saliency so far."""
        return max(0, min(int(self.num_steps), self.saliency_stop) - self.saliency_start)


def _mask_and_pool(module: MaskAwareEmbedding, ebc_out: Any, ec_out: Any, side_out: Any, acc_out: Any,
                   side_pooled_out: Any, acc_pooled_out: Any) -> KeyedTensor:
    return module.mask_and_pool(ebc_out, ec_out, side_out, acc_out, side_pooled_out, acc_pooled_out)


# One opaque node for the train pipeline's fx trace: it sees the lookups on the KJT, then this
# call, whose dict indexing, autograd Functions and branches symbolic tracing cannot follow.
torch.fx.wrap("_mask_and_pool")


# --------------------------------------------------------------------------------------------
# Shard access without a trainer (single process, tests) and weight copies into live shards


def _table_weight(module: nn.Module, table_name: str) -> tuple[str, Any]:
    """The ``(key, weight)`` of a table of ``module`` (an EC's or an EBC's, sharded or not)."""
    suffixes = (f"embeddings.{table_name}.weight", f"embedding_bags.{table_name}.weight")
    entries = [(k, v) for k, v in module.state_dict(keep_vars=True).items()
               if any(k == s or k.endswith("." + s) for s in suffixes)]
    if len(entries) != 1:
        raise KeyError(f"table {table_name!r}: expected one weight in the module, found {[k for k, _ in entries]}")
    return entries[0]


def _plain(value: Any) -> torch.Tensor:
    return value.data if isinstance(value, nn.Parameter) else value


def iter_local_rows(module: nn.Module, table_name: str, *, owns_replicated: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first_global_row, rows)`` for each local shard of a table of ``module`` (live views).

    Handles plain tensors (unsharded or data-parallel tables, yielded only when
    ``owns_replicated``, so that a replicated table is counted on one rank) and TorchRec's
    ``ShardedTensor``s (row-wise, table-wise and column-wise shards; a column-wise shard yields
    its columns of the rows).
    """
    _, value = _table_weight(module, table_name)
    if hasattr(value, "local_shards"):
        num_rows = int(value.size()[0])
        for shard in value.local_shards():
            first = int(shard.metadata.shard_offsets[0])
            # Row-wise sharding may pad the last shard past the table's end; yield real rows only.
            yield first, shard.tensor[:max(0, min(shard.tensor.shape[0], num_rows - first))]
    elif owns_replicated:
        yield 0, _plain(value)


class LocalSearchContext:
    """A ``SearchContext`` over a module's own shards, for single-process runs and tests.

    Args:
        module (nn.Module): the search module (sharded or not).
        fields (list[FieldSpec]): the sparse fields.
        embedding_dim (int): D.
        counts (Mapping[str, np.ndarray]): train-split id counts per field.
        budget (float): target parameter fraction (1.0 = none).
        all_reduce_sum (Callable | None): sums a tensor over ranks (None = single process).
        owns_replicated (bool): whether this process yields replicated (plain) tables; give it to
            exactly one rank.
    """

    def __init__(self, module: nn.Module, fields: list[FieldSpec], embedding_dim: int,
                 counts: Mapping[str, np.ndarray], *, budget: float = 1.0,
                 all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 owns_replicated: bool = True) -> None:
        self.module = module
        self.fields = list(fields)
        self.embedding_dim = embedding_dim
        self.budget = budget
        self._counts = dict(counts)
        self._all_reduce_sum = all_reduce_sum
        self._owns_replicated = owns_replicated

    def local_rows(self, table_name: str) -> Iterator[tuple[int, torch.Tensor]]:
        return iter_local_rows(self.module, table_name, owns_replicated=self._owns_replicated)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self._all_reduce_sum is None else self._all_reduce_sum(tensor)

    def gather_table_rows(self, table_name: str) -> torch.Tensor:
        _, value = _table_weight(self.module, table_name)
        full = torch.zeros(tuple(value.size()), dtype=torch.float32)
        if hasattr(value, "local_shards"):
            for shard in value.local_shards():
                (r, c), (n, m) = shard.metadata.shard_offsets[:2], shard.metadata.shard_sizes[:2]
                full[r:r + n, c:c + m] = shard.tensor.detach().cpu().float()
        elif self._owns_replicated:
            full.copy_(_plain(value).detach().cpu().float())
        return self.all_reduce_sum(full)

    def evaluate(self, score_fn: Callable[[Any], None]) -> None:
        raise NotImplementedError("LocalSearchContext has no validation data")

    def load_tables(self, path: Any, key_map: dict[str, str]) -> dict[str, str]:
        raise NotImplementedError("LocalSearchContext reads no checkpoints (sharding.state.load_checkpoint_tables does)")

    def counts(self, field_name: str) -> np.ndarray:
        return self._counts[field_name]


def copy_into_table(module: nn.Module, table_name: str, full_weight: torch.Tensor) -> None:
    """Copies a full ``[num_rows, width]`` weight into a table of ``module``, shard by shard.

    Works on unsharded tables and on the live local shards of ``ShardedTensor`` weights (row-,
    table- and column-wise: each shard takes its ``[row, col]`` offsets), so it can run after DMP.
    """
    key, value = _table_weight(module, table_name)
    with torch.no_grad():
        if hasattr(value, "local_shards"):
            if tuple(value.size()) != tuple(full_weight.shape):
                raise ValueError(f"{key}: shape {tuple(value.size())}, source has {tuple(full_weight.shape)}")
            for shard in value.local_shards():
                (r, c), (n, m) = shard.metadata.shard_offsets[:2], shard.metadata.shard_sizes[:2]
                shard.tensor.copy_(full_weight[r:r + n, c:c + m].to(shard.tensor.device, shard.tensor.dtype))
        else:
            if tuple(value.shape) != tuple(full_weight.shape):
                raise ValueError(f"{key}: shape {tuple(value.shape)}, source has {tuple(full_weight.shape)}")
            _plain(value).copy_(full_weight.to(value.device, value.dtype))
