"""Per-id widths -> width groups of a ``SizePlan``, shared by the per-id methods (AMTL, PME).

A per-id method ends with one width per raw id of a field (0 = pruned). The retrain module keeps
one compact table per (field, width) group (docs/methods.md#pme, group-wise tables),
so the widths are bucketed into ``GroupPlan``s. Every table of a group is a TBE table, hence the
widths are multiples of 4 (docs/torchrec-notes.md#table-widths).

Example::

    widths = np.array([16, 0, 4, 16, 8])           # id 1 pruned
    field = field_plan_from_widths("C1", widths)  # groups: 4 -> [2], 8 -> [4], 16 -> [0, 3]
    assert (widths_from_field_plan(field) == widths).all()
"""

from __future__ import annotations

import numpy as np
import torch

from embdim.embedding_methods.plan import WIDTH_MULTIPLE, FieldPlan, GroupPlan, SizePlan

SNAP_RULES = ("nearest", "down", "up")


def allowed_widths(embedding_dim: int) -> np.ndarray:
    """``[4, 8, ..., D]``: the TBE-legal widths of a field whose full width is D."""
    if embedding_dim <= 0 or embedding_dim % WIDTH_MULTIPLE:
        raise ValueError(f"embedding_dim must be a positive multiple of {WIDTH_MULTIPLE}, got {embedding_dim}")
    return np.arange(WIDTH_MULTIPLE, embedding_dim + 1, WIDTH_MULTIPLE, dtype=np.int64)


def snap_widths(sizes: np.ndarray, embedding_dim: int, rule: str = "nearest") -> np.ndarray:
    """Rounds per-id sizes in ``[0, D]`` to multiples of 4 (0 stays 0 = pruned).

    Args:
        sizes (np.ndarray): integer sizes per id, each in ``[0, D]``.
        embedding_dim (int): D, a multiple of 4.
        rule (str): "nearest" (half up: 1 -> 0, 2 -> 4, 6 -> 8), "down" (floor: 1..3 -> 0) or
            "up" (ceil: any kept entry gives at least width 4).
    """
    if rule not in SNAP_RULES:
        raise ValueError(f"rule must be one of {list(SNAP_RULES)}, got {rule!r}")
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size and (sizes.min() < 0 or sizes.max() > embedding_dim):
        raise ValueError(f"sizes must lie in [0, {embedding_dim}], got [{sizes.min()}, {sizes.max()}]")
    step = WIDTH_MULTIPLE
    if rule == "nearest":
        snapped = (sizes + step // 2) // step * step
    elif rule == "down":
        snapped = sizes // step * step
    else:
        snapped = (sizes + step - 1) // step * step
    return np.minimum(snapped, embedding_dim)


def _merge_small_groups(widths: np.ndarray, max_groups: int) -> np.ndarray:
    """Moves the ids of the smallest groups up to the next wider width until at most ``max_groups``
    widths remain. Merging up never shrinks an id (no capacity is taken away); the widest group has
    no wider neighbour, so it is never the one merged. Ties go to the narrower group."""
    widths = widths.copy()
    while True:
        present, sizes = np.unique(widths[widths > 0], return_counts=True)
        if len(present) <= max_groups:
            return widths
        # Candidates: every group but the widest; smallest id count first, then narrower width.
        order = np.lexsort((present[:-1], sizes[:-1]))
        source = present[order[0]]
        widths[widths == source] = present[order[0] + 1]


def field_plan_from_widths(name: str, widths: np.ndarray, *, max_groups: int = 0) -> FieldPlan:
    """Groups the ids of a field by width.

    Args:
        name (str): the field name.
        widths (np.ndarray): ``[num_embeddings]`` integer width of every raw id: 0 = pruned,
            otherwise a multiple of 4.
        max_groups (int): at most this many groups (0 = no cap); see ``_merge_small_groups``.

    Returns:
        A ``FieldPlan`` with groups in increasing width; one group of every id is written with
        ``ids=None`` (the plan's "all ids" form).
    """
    widths = np.asarray(widths, dtype=np.int64)
    if widths.ndim != 1 or widths.size == 0:
        raise ValueError(f"field {name!r}: widths must be a non-empty 1-D array, got shape {widths.shape}")
    if widths.min() < 0 or np.any(widths % WIDTH_MULTIPLE):
        bad = widths[(widths < 0) | (widths % WIDTH_MULTIPLE != 0)][0]
        raise ValueError(f"field {name!r}: widths must be 0 (pruned) or multiples of {WIDTH_MULTIPLE}, got {bad}")
    if max_groups < 0:
        raise ValueError(f"max_groups must be >= 0, got {max_groups}")
    if max_groups:
        widths = _merge_small_groups(widths, max_groups)
    present = np.unique(widths[widths > 0])
    if len(present) == 1 and np.all(widths > 0):
        groups = [GroupPlan(width=int(present[0]), ids=None)]
    else:
        # One stable argsort gives every group's ids already sorted (np.flatnonzero per width
        # would be W passes over the field).
        order = np.argsort(widths, kind="stable")
        sorted_widths = widths[order]
        starts = np.searchsorted(sorted_widths, present, side="left")
        stops = np.searchsorted(sorted_widths, present, side="right")
        groups = [GroupPlan(width=int(w), ids=order[a:b].astype(np.int64))
                  for w, a, b in zip(present, starts, stops)]
    return FieldPlan(name=name, num_embeddings=int(widths.size), groups=groups)


def widths_from_field_plan(field: FieldPlan) -> np.ndarray:
    """The inverse of ``field_plan_from_widths``: ``[num_embeddings]`` width per id (0 = pruned)."""
    widths = np.zeros(field.num_embeddings, dtype=np.int64)
    for g in field.groups:
        if g.ids is None:
            widths[:] = g.width
        else:
            widths[g.ids] = g.width
    return widths


def size_plan_from_widths(method: str, embedding_dim: int, names: list[str], widths: list[np.ndarray], *,
                          layout: str, max_groups: int = 0, budget: float | None = None,
                          extra: dict | None = None) -> SizePlan:
    """A validated ``SizePlan`` from per-id widths of every field (in ``names`` order)."""
    plan = SizePlan(
        method=method, embedding_dim=embedding_dim, budget=budget, extra=dict(extra or {}), layout=layout,
        fields=[field_plan_from_widths(n, w, max_groups=max_groups) for n, w in zip(names, widths, strict=True)],
    )
    plan.validate(f"{method} plan")
    return plan


def compact_group_weights(full_weight: torch.Tensor, group: GroupPlan, embedding_dim: int,
                          column_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Start values of one retrain group taken from a full-width search table.

    Each id of the group keeps ``w = group.width`` of its D entries, packed left in column order,
    and the group's ``w -> D`` projection starts as ``[I_w | 0]`` (zero padding): the packed row is
    then the kept entries placed in the first w slots, the "zero-padding" rendering of a pruned row
    (docs/methods.md#pme).

    Args:
        full_weight (torch.Tensor): ``[num_embeddings, D]`` search table (e.g. gathered).
        group (GroupPlan): the group in the plan.
        embedding_dim (int): D.
        column_scores (torch.Tensor | None): ``[num_embeddings, D]`` per-entry scores; each row keeps
            its w highest-scoring entries (ties to the lower column). None keeps the first w columns
            (AMTL's masks zero trailing dims, so its first w columns are exactly the kept ones).

    Returns:
        ``(table [rows, w], projection [w, D] or None when w == D)``, the layout of
        ``mixed_dim.GroupedProjection.slot_weight``.
    """
    index = None if group.ids is None else torch.as_tensor(group.ids, device=full_weight.device)
    rows = full_weight if index is None else full_weight[index]
    width = group.width
    if column_scores is None:
        table = rows[:, :width].clone()
    else:
        scores = column_scores if index is None else column_scores[index.to(column_scores.device)]
        scores = scores.to(device=rows.device, dtype=torch.float64)
        # Stable descending sort: equal scores keep column order, so ties go to the lower column.
        top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :width]
        table = torch.gather(rows, 1, torch.sort(top, dim=1).values)
    if width == embedding_dim:
        return table, None
    return table, torch.eye(width, embedding_dim, dtype=full_weight.dtype, device=full_weight.device)


def retrain_init_state_from_tables(plan: SizePlan, full_weights: dict[str, torch.Tensor],
                                   column_scores: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A ``state_dict`` of ``mixed_dim.build_retrain_module(plan)`` started from full search tables.

    Every group's table and ``[I_w | 0]`` projection come from ``compact_group_weights``.

    Args:
        plan (SizePlan): the exported plan.
        full_weights (dict[str, torch.Tensor]): ``{field: [num_embeddings, D]}`` search tables.
        column_scores (dict[str, torch.Tensor] | None): ``{field: [num_embeddings, D]}`` per-entry
            scores choosing each id's kept entries (PME's saliency); None keeps the first w columns.
    """
    from embdim.embedding_methods.mixed_dim import build_retrain_module, table_name_for_feature
    from embdim.embedding_methods.plan import group_feature_name

    module = build_retrain_module(plan, device="cpu")
    slots = [c.name for c in module.inner_configs()]
    with torch.no_grad():
        for field_plan in plan.fields:
            full = full_weights[field_plan.name].detach().cpu().float()
            scores = None if column_scores is None else column_scores[field_plan.name].detach().cpu()
            for k, group in enumerate(field_plan.groups):
                name = table_name_for_feature(group_feature_name(field_plan.name, k, len(field_plan.groups)))
                table, projection = compact_group_weights(full, group, plan.embedding_dim, column_scores=scores)
                module.ebc.embedding_bags[name].weight.copy_(table)
                if projection is not None and module.projection is not None:
                    module.projection.slot_weight(slots.index(name)).copy_(projection)
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}
