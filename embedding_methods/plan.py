"""The size plan: what every method exports after search and what retrain builds from.

A plan gives each sparse field a list of width groups. A group is a set of raw ids of the field
that share one width (a multiple of 4, the FBGEMM TBE requirement); ids in no group are pruned
(their embedding is the zero vector). Per-field methods (fixed, MDE, MLET, OptEmbed's dims) use one
group holding every id (``ids=None``); per-id methods (OptEmbed's row pruning, PME, AMTL) split a
field into several groups. Retrain turns each group into one compact table (see
``embedding_methods.mixed_dim.build_retrain_module``); the plan's ``layout`` says how a group
narrower than the common width D reaches D:

``pad``
    its w values followed by D - w zeros. Nothing is stored beyond the tables. This is the model
    OptEmbed, AMTL, PME and MLET define (trailing dims masked / a narrower table), and the default
    of every method but MDE.
``project``
    a learned bias-free ``w -> D`` projection per group (MDE's ``E = V P``), counted in the
    parameters and the budget.

On disk a plan is ``plan.json`` plus one ``.npy`` file per explicit id group::

    RUN_DIR/plan.json
    RUN_DIR/plan_ids/C1__g0.npy     # sorted unique int64 raw ids of group 0 of field C1
    RUN_DIR/plan_ids/C1__g1.npy

``plan.json`` also records derived numbers (row counts, parameter counts, achieved fraction) for
people and tools reading it; ``load_plan`` checks the row counts against the side files and
recomputes the rest.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embdim.io import atomic_save_npy, atomic_write_json

SCHEMA_VERSION = 1
PLAN_FILE = "plan.json"
BYTES_PER_PARAM = 4  # float32 tables and projections
TABLE_DTYPE_BYTES = {"fp32": 4, "fp16": 2}  # model.table_dtype -> bytes per table entry (projections stay fp32)
LAYOUTS = ("pad", "project")
"""How a group narrower than D reaches D: zero padding (no parameters) or a learned projection."""
DEFAULT_LAYOUT = "pad"
LEGACY_LAYOUT = "project"  # plans written before layouts existed were all projected
WIDTH_MULTIPLE = 4  # FBGEMM TBE: every sharded table's (local) width must be a multiple of 4


class PlanError(ValueError):
    """A size plan is invalid; the message names the file (or object) and the field/key."""


@dataclass
class GroupPlan:
    """One width group of a field.

    Args:
        width (int): embedding width of the group's table; a positive multiple of 4, at most D.
        ids (np.ndarray | None): sorted unique int64 raw ids of the field in this group; ``None``
            means every id of the field (allowed only when it is the field's single group).
    """

    width: int
    ids: np.ndarray | None = None

    def num_rows(self, num_embeddings: int) -> int:
        """Rows of the group's compact table."""
        return num_embeddings if self.ids is None else int(len(self.ids))


@dataclass
class FieldPlan:
    """The plan of one sparse field.

    Args:
        name (str): the field (KJT feature) name.
        num_embeddings (int): raw cardinality of the field (ids in ``[0, num_embeddings)``).
        groups (list[GroupPlan]): disjoint id groups; ids in no group are pruned; ``[]`` prunes
            the whole field (its output is the zero vector).
    """

    name: str
    num_embeddings: int
    groups: list[GroupPlan] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        """Kept (not pruned) ids of the field."""
        return sum(g.num_rows(self.num_embeddings) for g in self.groups)

    @property
    def widths(self) -> list[int]:
        return [g.width for g in self.groups]

    def num_table_params(self) -> int:
        return sum(g.num_rows(self.num_embeddings) * g.width for g in self.groups)

    def num_projection_params(self, embedding_dim: int, layout: str) -> int:
        # project: one bias-free width -> D projection per group narrower than D (MDE, Ginart et
        # al. 2021, Sec. 3: E_t = V_t P_t with P_t in R^{d_t x D}); a group already at D needs
        # none. pad: zero padding stores nothing.
        return layout_projection_params(self.widths, embedding_dim, layout)

    def num_params(self, embedding_dim: int, layout: str) -> int:
        """Parameters this field stores under ``layout``: tables plus projections."""
        return self.num_table_params() + self.num_projection_params(embedding_dim, layout)


@dataclass
class SizePlan:
    """Widths (and kept ids) of every field, produced by a method's search.

    Args:
        method (str): name of the method that produced the plan.
        embedding_dim (int): the common output width D of every field.
        fields (list[FieldPlan]): one entry per sparse field, in dataset order.
        budget (float | None): requested fraction of the full-width parameters, if any.
        extra (dict): method-specific JSON-serialisable data (MDE's alpha, evolution log, ...).
        init_checkpoint (str | None): path, relative to the plan file, of retrain-table weights to
            start from (MLET's collapsed tables, OptEmbed's inherited rows); ``None`` = fresh init.
        layout (str): ``"pad"`` or ``"project"`` (see the module docstring); the parameter counts
            and the budget count exactly what the layout stores.
    """

    method: str
    embedding_dim: int
    fields: list[FieldPlan]
    budget: float | None = None
    extra: dict = field(default_factory=dict)
    init_checkpoint: str | None = None
    layout: str = DEFAULT_LAYOUT

    def field(self, name: str) -> FieldPlan:
        for f in self.fields:
            if f.name == name:
                return f
        raise PlanError(f"plan: no field {name!r}; fields are {[f.name for f in self.fields]}")

    def num_table_params(self) -> int:
        return sum(f.num_table_params() for f in self.fields)

    def num_projection_params(self) -> int:
        return sum(f.num_projection_params(self.embedding_dim, self.layout) for f in self.fields)

    def num_params(self) -> int:
        """Parameters of the compact embedding: tables plus projections."""
        return self.num_table_params() + self.num_projection_params()

    def full_params(self) -> int:
        """Parameters of the full-width embedding: every id of every field at width D."""
        return sum(f.num_embeddings for f in self.fields) * self.embedding_dim

    def achieved_fraction(self) -> float:
        return self.num_params() / max(self.full_params(), 1)

    def projection_share(self) -> float:
        """Share of the plan's parameters held by projections (0 for ``pad``)."""
        return self.num_projection_params() / max(self.num_params(), 1)

    def validate(self, source: str = "plan") -> None:
        """Raises ``PlanError`` (prefixed with ``source``) unless the plan is well formed."""
        validate_plan(self, source)


def layout_projection_params(widths: list[int], embedding_dim: int, layout: str) -> int:
    """Projection parameters of groups of the given widths under ``layout`` (0 for ``pad``)."""
    if layout not in LAYOUTS:
        raise PlanError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if layout == "pad":
        return 0
    return sum(int(w) * embedding_dim for w in widths if w != embedding_dim)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def group_feature_name(field_name: str, group_index: int, num_groups: int) -> str:
    """KJT feature of one group in the retrain model: the field name when it is the only group."""
    return field_name if num_groups == 1 else f"{field_name}@g{group_index}"


def validate_plan(plan: SizePlan, source: str = "plan") -> None:
    """Checks types, widths, id groups (sorted, unique, in range, disjoint) and name clashes."""
    def fail(message: str) -> None:
        raise PlanError(f"{source}: {message}")

    if not isinstance(plan.method, str) or not plan.method:
        fail(f"method must be a non-empty string, got {plan.method!r}")
    D = plan.embedding_dim
    if not _is_int(D) or D <= 0 or D % WIDTH_MULTIPLE:
        fail(f"embedding_dim must be a positive multiple of {WIDTH_MULTIPLE}, got {D!r}")
    if plan.budget is not None and (isinstance(plan.budget, bool) or not isinstance(plan.budget, (int, float))
                                    or not math.isfinite(plan.budget) or not 0 < plan.budget <= 1):
        fail(f"budget must be a fraction in (0, 1] of the full-width parameters, or null; got {plan.budget!r}")
    if plan.layout not in LAYOUTS:
        fail(f"layout must be one of {list(LAYOUTS)}, got {plan.layout!r}")
    if not isinstance(plan.extra, dict):
        fail(f"extra must be an object, got {type(plan.extra).__name__}")
    if plan.init_checkpoint is not None and (not isinstance(plan.init_checkpoint, str) or not plan.init_checkpoint):
        fail(f"init_checkpoint must be a non-empty path string or null, got {plan.init_checkpoint!r}")
    if not isinstance(plan.fields, list) or not plan.fields:
        fail("fields must be a non-empty list")
    seen_features: dict[str, str] = {}
    for i, f in enumerate(plan.fields):
        if not isinstance(f, FieldPlan):
            fail(f"fields[{i}] must be a FieldPlan, got {type(f).__name__}")
        if not isinstance(f.name, str) or not f.name:
            fail(f"fields[{i}]: name must be a non-empty string, got {f.name!r}")
        where = f"field {f.name!r}"
        n = f.num_embeddings
        if not _is_int(n) or n < 1:
            fail(f"{where}: num_embeddings must be a positive integer, got {n!r}")
        if not isinstance(f.groups, list):
            fail(f"{where}: groups must be a list, got {type(f.groups).__name__}")
        explicit = []
        for k, g in enumerate(f.groups):
            gwhere = f"{where}: group {k}"
            if not isinstance(g, GroupPlan):
                fail(f"{gwhere}: must be a GroupPlan, got {type(g).__name__}")
            if not _is_int(g.width) or g.width <= 0 or g.width % WIDTH_MULTIPLE:
                fail(f"{gwhere}: width must be a positive multiple of {WIDTH_MULTIPLE} (FBGEMM TBE), got {g.width!r}")
            if g.width > D:
                fail(f"{gwhere}: width {g.width} exceeds embedding_dim {D}")
            if g.ids is None:
                if len(f.groups) != 1:
                    fail(f"{gwhere}: ids=None (all ids) is only allowed for a field's single group; "
                         f"the field has {len(f.groups)} groups")
                continue
            ids = g.ids
            if not isinstance(ids, np.ndarray) or ids.dtype != np.int64 or ids.ndim != 1:
                desc = f"{ids.dtype} array of shape {ids.shape}" if isinstance(ids, np.ndarray) else type(ids).__name__
                fail(f"{gwhere}: ids must be a 1-D int64 array, got {desc}")
            if len(ids) == 0:
                fail(f"{gwhere}: ids is empty (an empty group has no table; drop the group instead)")
            if len(ids) > 1:
                steps = np.diff(ids)
                if not np.all(steps > 0):
                    bad = int(np.argmax(steps <= 0))
                    kind = "duplicate" if steps[bad] == 0 else "unsorted"
                    fail(f"{gwhere}: ids must be sorted and unique; {kind} at position {bad + 1} "
                         f"({int(ids[bad])} then {int(ids[bad + 1])})")
            if ids[0] < 0 or ids[-1] >= n:
                bad_id = int(ids[0]) if ids[0] < 0 else int(ids[-1])
                fail(f"{gwhere}: id {bad_id} is out of range [0, {n})")
            explicit.append(ids)
        if len(explicit) > 1:
            # Owner per id: linear time, unlike sorting the union of the groups of a 1e8-id field.
            owner = np.full(n, -1, dtype=np.int16 if len(explicit) < 2**15 else np.int32)
            for k, ids in enumerate(explicit):
                taken = owner[ids] >= 0
                if taken.any():
                    dup = int(ids[np.argmax(taken)])
                    fail(f"{where}: groups overlap: id {dup} is in groups {[int(owner[dup]), k]}")
                owner[ids] = k
        for k in range(len(f.groups)):
            feature = group_feature_name(f.name, k, len(f.groups))
            if feature in seen_features:
                fail(f"{where}: retrain feature name {feature!r} clashes with field {seen_features[feature]!r}")
            seen_features[feature] = f.name


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def field_file_stems(plan: SizePlan) -> list[str]:
    """Per-field file-name stems, unique even when two field names sanitise to the same string."""
    stems = [_safe_stem(f.name) for f in plan.fields]
    if len(set(stems)) != len(stems):
        stems = [f"{s}.{i}" for i, s in enumerate(stems)]
    return stems


def plan_file(path: str | Path) -> Path:
    """A plan file path: ``path`` itself when it names a ``.json`` file, else ``path/plan.json``."""
    path = Path(path)
    return path / PLAN_FILE if path.is_dir() or path.suffix != ".json" else path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_plan(plan: SizePlan, path: str | Path) -> Path:
    """Writes ``plan.json`` and its id side files atomically; returns the plan file's path.

    Side files go first, ``plan.json`` last, so a crash never leaves a plan that references a
    half-written file (a stale side file from an older plan is caught by the row-count check).
    ``path`` is the plan file or a folder (then ``folder/plan.json``).
    """
    path = plan_file(path)
    validate_plan(plan, str(path))
    try:
        extra_json = json.loads(json.dumps(plan.extra, default=_json_default))
    except (TypeError, ValueError) as e:
        raise PlanError(f"{path}: extra is not JSON serialisable: {e}") from None
    ids_dir_name = f"{path.stem}_ids"
    ids_dir = path.parent / ids_dir_name
    written: set[str] = set()
    fields_json = []
    for f, stem in zip(plan.fields, field_file_stems(plan)):
        groups_json = []
        for k, g in enumerate(f.groups):
            rel = None
            if g.ids is not None:
                file_name = f"{stem}__g{k}.npy"
                atomic_save_npy(ids_dir / file_name, g.ids)
                written.add(file_name)
                rel = f"{ids_dir_name}/{file_name}"
            groups_json.append({"width": int(g.width), "num_rows": g.num_rows(f.num_embeddings), "ids": rel})
        fields_json.append({
            "name": f.name,
            "num_embeddings": int(f.num_embeddings),
            "num_rows": f.num_rows,
            "widths": [int(w) for w in f.widths],
            "num_params": f.num_params(plan.embedding_dim, plan.layout),
            "groups": groups_json,
        })
    doc = {
        "schema_version": SCHEMA_VERSION,
        "method": plan.method,
        "budget": None if plan.budget is None else float(plan.budget),
        "embedding_dim": int(plan.embedding_dim),
        "layout": plan.layout,
        "num_table_params": plan.num_table_params(),
        "num_projection_params": plan.num_projection_params(),
        "num_params": plan.num_params(),
        "full_params": plan.full_params(),
        "achieved_fraction": plan.achieved_fraction(),
        "projection_share": plan.projection_share(),
        "init_checkpoint": plan.init_checkpoint,
        "fields": fields_json,
        "extra": extra_json,
    }
    atomic_write_json(path, doc)
    # Side files of an older plan saved under the same name are no longer referenced.
    if ids_dir.is_dir():
        for stale in ids_dir.glob("*__g*.npy"):
            if stale.name not in written:
                stale.unlink()
    return path


_TOP_KEYS = {"schema_version", "method", "budget", "embedding_dim", "fields", "extra", "init_checkpoint", "layout",
             "num_table_params", "num_projection_params", "num_params", "full_params", "achieved_fraction",
             "projection_share"}
_FIELD_KEYS = {"name", "num_embeddings", "groups", "num_rows", "widths", "num_params"}
_GROUP_KEYS = {"width", "ids", "num_rows"}


def load_plan(path: str | Path) -> SizePlan:
    """Reads and validates a plan (``plan.json`` or a folder holding one); errors name file and field."""
    path = plan_file(path)
    if not path.exists():
        raise PlanError(f"{path}: plan file not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: invalid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise PlanError(f"{path}: not a text file: {e}") from None

    def fail(message: str) -> None:
        raise PlanError(f"{path}: {message}")

    if not isinstance(raw, dict):
        fail("expected a JSON object")
    if "schema_version" not in raw:
        fail("missing key 'schema_version'")
    if raw["schema_version"] != SCHEMA_VERSION:
        fail(f"schema_version {raw['schema_version']!r}; this embdim reads {SCHEMA_VERSION}")
    missing = sorted({"method", "embedding_dim", "fields"} - set(raw))
    if missing:
        fail(f"missing key(s) {missing}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        fail(f"unknown key(s) {unknown}")
    if not isinstance(raw["fields"], list):
        fail("'fields' must be a list")
    fields = []
    for i, fr in enumerate(raw["fields"]):
        if not isinstance(fr, dict) or not isinstance(fr.get("name"), str):
            fail(f"fields[{i}] must be an object with a string 'name'")
        where = f"field {fr['name']!r}"
        missing = sorted({"num_embeddings", "groups"} - set(fr))
        if missing:
            fail(f"{where}: missing key(s) {missing}")
        unknown = sorted(set(fr) - _FIELD_KEYS)
        if unknown:
            fail(f"{where}: unknown key(s) {unknown}")
        n = fr["num_embeddings"]
        if not _is_int(n) or n < 1:
            fail(f"{where}: num_embeddings must be a positive integer, got {n!r}")
        if not isinstance(fr["groups"], list):
            fail(f"{where}: 'groups' must be a list")
        groups = []
        for k, gr in enumerate(fr["groups"]):
            gwhere = f"{where}: group {k}"
            if not isinstance(gr, dict) or "width" not in gr:
                fail(f"{gwhere}: must be an object with a 'width'")
            unknown = sorted(set(gr) - _GROUP_KEYS)
            if unknown:
                fail(f"{gwhere}: unknown key(s) {unknown}")
            rel = gr.get("ids")
            ids = None
            if rel is not None:
                if not isinstance(rel, str) or Path(rel).is_absolute():
                    fail(f"{gwhere}: 'ids' must be a path relative to the plan file, got {rel!r}")
                ids_path = path.parent / rel
                if not ids_path.exists():
                    fail(f"{gwhere}: ids side file {ids_path} not found")
                try:
                    ids = np.load(ids_path, allow_pickle=False)
                except (ValueError, OSError, EOFError) as e:
                    fail(f"{gwhere}: cannot read ids side file {ids_path}: {e}")
                if ids.ndim != 1:
                    fail(f"{gwhere}: ids side file {ids_path} must hold a 1-D array, got shape {ids.shape}")
                recorded = gr.get("num_rows")
                if recorded is not None and (not _is_int(recorded) or recorded != ids.shape[0]):
                    fail(f"{gwhere}: ids side file {ids_path} holds {ids.shape[0]} rows but plan.json "
                         f"records num_rows={recorded!r} (stale or foreign side file?)")
            elif "num_rows" in gr and gr["num_rows"] != n:
                fail(f"{gwhere}: ids=null (all ids) but num_rows={gr['num_rows']!r} != num_embeddings={n}")
            groups.append(GroupPlan(width=gr["width"], ids=ids))
        fields.append(FieldPlan(name=fr["name"], num_embeddings=n, groups=groups))
    extra = raw.get("extra", {})
    plan = SizePlan(
        method=raw["method"], embedding_dim=raw["embedding_dim"], fields=fields,
        budget=raw.get("budget"), extra=extra if extra is not None else {},
        init_checkpoint=raw.get("init_checkpoint"), layout=raw.get("layout", LEGACY_LAYOUT),
    )
    validate_plan(plan, str(path))
    return plan


def resolve_init_checkpoint(plan: SizePlan, plan_path: str | Path) -> Path | None:
    """Absolute path of ``plan.init_checkpoint`` (which is relative to the plan file), or None."""
    if plan.init_checkpoint is None:
        return None
    return plan_file(plan_path).parent / plan.init_checkpoint


def _fmt_bytes(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def summarize_plan(plan: SizePlan, *, bar_width: int = 40, table_dtype: str = "fp32") -> str:
    """Human-readable summary: parameters and bytes vs full width, widths histogram, fields.

    Bytes count the tables at ``table_dtype`` (``model.table_dtype`` of the retrain: "fp32" or
    "fp16") and projections at float32; the budget and the fraction stay in parameters."""
    if table_dtype not in TABLE_DTYPE_BYTES:
        raise ValueError(f"table_dtype: unknown {table_dtype!r}; choose from {list(TABLE_DTYPE_BYTES)}")
    D = plan.embedding_dim
    full = plan.full_params()
    tables, proj = plan.num_table_params(), plan.num_projection_params()
    total = tables + proj
    entry = TABLE_DTYPE_BYTES[table_dtype]
    if table_dtype == "fp32":
        size = f"{_fmt_bytes(total * BYTES_PER_PARAM)} float32"
        full_size = f"{_fmt_bytes(full * BYTES_PER_PARAM)} float32"
    else:
        size = f"{_fmt_bytes(tables * entry + proj * BYTES_PER_PARAM)}: {table_dtype} tables, float32 projections"
        full_size = f"{_fmt_bytes(full * entry)} {table_dtype}"
    num_ids = sum(f.num_embeddings for f in plan.fields)
    kept = sum(f.num_rows for f in plan.fields)
    lines = [
        f"method: {plan.method}    embedding_dim D={D}    fields: {len(plan.fields)}    layout: {plan.layout}",
        f"ids kept: {kept:,} of {num_ids:,} ({kept / max(num_ids, 1):.1%}); pruned: {num_ids - kept:,}",
        f"parameters: {total:,} = tables {tables:,} + projections {proj:,} ({plan.projection_share():.1%} in "
        f"projections)   ({size})",
        f"full width: {full:,} ({full_size})",
        "achieved fraction: {:.4f}{}".format(
            plan.achieved_fraction(), "" if plan.budget is None else f"    budget: {plan.budget:.4f}"),
    ]
    if plan.init_checkpoint:
        lines.append(f"init checkpoint: {plan.init_checkpoint}")

    # Histogram of widths weighted by rows (ids): where the parameters of each id go.
    rows_by_width: dict[int, int] = {}
    for f in plan.fields:
        for g in f.groups:
            rows_by_width[g.width] = rows_by_width.get(g.width, 0) + g.num_rows(f.num_embeddings)
    buckets = [(str(w), r) for w, r in sorted(rows_by_width.items())]
    if num_ids > kept:
        buckets.append(("pruned", num_ids - kept))
    lines.append("")
    lines.append("widths (share of ids):")
    label_width = max(len(b) for b, _ in buckets) if buckets else 6
    for label, rows in buckets:
        share = rows / max(num_ids, 1)
        bar = "#" * max(1 if rows else 0, round(share * bar_width))
        lines.append(f"  {label:>{label_width}} | {bar:<{bar_width}} {rows:>14,} ({share:6.1%})")

    lines.append("")
    name_width = max(5, *(len(f.name) for f in plan.fields))
    lines.append(f"  {'field':<{name_width}} {'ids':>14} {'kept':>14} {'params':>14}  widths (width:rows)")
    for f in plan.fields:
        groups = " ".join(f"{g.width}:{g.num_rows(f.num_embeddings):,}" for g in f.groups) or "(pruned)"
        params = f.num_params(D, plan.layout)
        lines.append(f"  {f.name:<{name_width}} {f.num_embeddings:>14,} {f.num_rows:>14,} {params:>14,}  {groups}")
    return "\n".join(lines)


def uniform_plan(method: str, fields: list[tuple[str, int]], embedding_dim: int, widths: list[int],
                 *, layout: str, budget: float | None = None, extra: dict | None = None) -> SizePlan:
    """A plan keeping every id, with one width per field (fixed, MDE, MLET)."""
    plan = SizePlan(
        method=method, embedding_dim=embedding_dim, budget=budget, extra=dict(extra or {}), layout=layout,
        fields=[FieldPlan(name=name, num_embeddings=int(n), groups=[GroupPlan(width=int(w))])
                for (name, n), w in zip(fields, widths, strict=True)],
    )
    validate_plan(plan, f"{method} plan")
    return plan
