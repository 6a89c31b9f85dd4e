"""Reports of ``embdim run`` / ``embdim compare``: a Markdown table and a Pareto plot.

Every number in a report is read from the files the phases wrote, never recomputed:

* quality, size and throughput from ``RUN_DIR/retrain/metrics.json`` (the full-width baseline:
  ``DIR/full/metrics.json`` written by ``embdim train``),
* wall times of the phases and the failure message of a failed run from ``RUN_DIR/run_state.json``
  (written by ``trainer.orchestrator``),
* the notes column from the plan's ``extra`` (``RUN_DIR/plan.json``): what the search could not
  meet (``fallbacks``) and the settings it adapted to the data (``adaptations``).

A finished run whose compact model exceeds its budget (``embedding_fraction`` above ``budget``)
is never ``done``: its status is ``over budget (fraction F > B)``.

So a report can be rebuilt at any time from the run folders, and a reader can trace each cell
of the table back to one key of one file. ``parse_table`` reads a rendered table back (tests and
scripts that post-process a report).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from embdim.io import atomic_path, atomic_write_text

RUN_STATE = "run_state.json"
REPORT = "report.md"
PARETO = "pareto.png"
BASELINE_METHOD = "full"

# (header, ReportRow attribute, formatter). The headers are the contract of ``parse_table``.
COLUMNS: list[tuple[str, str]] = [
    ("method", "method"),
    ("budget", "budget"),
    ("test AUC", "test_auc"),
    ("test logloss", "test_logloss"),
    ("embedding params", "embedding_params"),
    ("embedding bytes", "embedding_bytes"),
    ("fraction", "embedding_fraction"),
    ("compression", "compression_ratio"),
    ("search s", "search_seconds"),
    ("retrain s", "retrain_seconds"),
    ("samples/s", "samples_per_s"),
    ("status", "status"),
    ("notes", "notes"),
]
MISSING = "—"
OVER_BUDGET_TOLERANCE = 1e-6
"""Relative slack of ``over_budget`` (float rounding only: every method's plan binds from below)."""


class ReportError(ValueError):
    """A run folder's metrics or state file is unreadable or lacks a key; the message names it."""


@dataclass
class ReportRow:
    method: str
    budget: float | None
    status: str  # "done", "over budget (fraction F > B)", "failed (phase): message", "not run", ...
    run_dir: Path
    test_auc: float | None = None
    test_logloss: float | None = None
    embedding_params: int | None = None
    embedding_bytes: int | None = None
    compression_ratio: float | None = None
    search_seconds: float | None = None
    retrain_seconds: float | None = None
    samples_per_s: float | None = None
    embedding_fraction: float | None = None
    notes: str | None = None

    @property
    def done(self) -> bool:
        return self.status == "done"


def over_budget(fraction: float | None, budget: float | None) -> bool:
    """Whether a compact model's fraction of the full-width parameters exceeds its budget."""
    return budget is not None and budget < 1.0 and fraction is not None and \
        fraction > budget * (1 + OVER_BUDGET_TOLERANCE)


def plan_notes(run_dir: Path) -> str | None:
    """The fallbacks and adaptations a search recorded in ``RUN_DIR/plan.json`` (None without any)."""
    path = Path(run_dir) / "plan.json"
    if not path.exists():
        return None
    extra = read_json(path).get("extra") or {}
    notes = []
    for key in ("fallbacks", "adaptations"):
        value = extra.get(key) or []
        if not isinstance(value, list):
            raise ReportError(f"{path}: extra.{key} must be a list, got {type(value).__name__}")
        notes += [str(v) for v in value]
    return "; ".join(notes) or None


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: invalid JSON: {e}") from None


def _require(metrics: dict[str, Any], key: str, path: Path) -> Any:
    if key not in metrics:
        raise ReportError(f"{path}: missing key {key!r}")
    return metrics[key]


def read_run_state(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_STATE
    return read_json(path) if path.exists() else None


def _status(state: dict[str, Any] | None, phases: Iterable[str]) -> str:
    """``done`` when every phase finished, else the first unfinished phase's state."""
    if state is None:
        return "not run"
    recorded = state.get("phases", {})
    for phase in phases:
        info = recorded.get(phase)
        if info is None:
            return f"not run ({phase})"
        if info.get("status") == "failed":
            return f"failed ({phase}): {info.get('error') or 'unknown error'}"
        if info.get("status") != "done":
            return f"{info.get('status', 'unknown')} ({phase})"
    return "done"


def run_row(run_dir: str | Path, method: str, budget: float) -> ReportRow:
    """The row of one ``embdim run`` folder (search + retrain)."""
    run_dir = Path(run_dir)
    state = read_run_state(run_dir)
    row = ReportRow(method=method, budget=budget, status=_status(state, ("search", "retrain")), run_dir=run_dir)
    if state is not None:
        row.search_seconds = state.get("search_seconds")
        row.retrain_seconds = state.get("retrain_seconds")
    if row.done:
        path = run_dir / "retrain" / "metrics.json"
        metrics = read_json(path)
        row.test_auc = _require(metrics, "test_auc", path)
        row.test_logloss = _require(metrics, "test_logloss", path)
        row.embedding_params = _require(metrics, "embedding_params", path)
        row.embedding_bytes = _require(metrics, "embedding_bytes", path)
        row.compression_ratio = _require(metrics, "compression_ratio", path)
        row.samples_per_s = _require(metrics, "samples_per_s", path)
        row.embedding_fraction = row.embedding_params / _require(metrics, "full_embedding_params", path)
        if over_budget(row.embedding_fraction, budget):
            row.status = f"over budget (fraction {row.embedding_fraction:.4f} > {budget:g})"
    row.notes = plan_notes(run_dir)
    return row


def baseline_row(run_dir: str | Path) -> ReportRow:
    """The full-width ``embdim train`` run: no search, its training wall time in the retrain column,
    compression 1 by definition (it is the reference the other rows are compared with)."""
    run_dir = Path(run_dir)
    state = read_run_state(run_dir)
    row = ReportRow(method=BASELINE_METHOD, budget=1.0, status=_status(state, ("train",)), run_dir=run_dir)
    if state is not None:
        row.retrain_seconds = state.get("train_seconds")
    if row.done:
        path = run_dir / "metrics.json"
        metrics = read_json(path)
        row.test_auc = _require(metrics, "test_auc", path)
        row.test_logloss = _require(metrics, "test_logloss", path)
        row.embedding_params = _require(metrics, "embedding_params", path)
        row.embedding_bytes = _require(metrics, "embedding_bytes", path)
        row.compression_ratio = 1.0
        row.embedding_fraction = 1.0
        row.samples_per_s = _require(metrics, "samples_per_s", path)
    return row


# ---------------------------------------------------------------------------- Markdown
def format_cell(attr: str, value: Any) -> str:
    """One value as the report shows it (``—`` when missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if attr in ("test_auc", "test_logloss"):
        return f"{value:.4f}"
    if attr in ("embedding_params", "embedding_bytes"):
        return f"{int(value):,}"
    if attr == "compression_ratio":
        return f"{value:.2f}x"
    if attr == "embedding_fraction":
        return f"{value:.4f}"
    if attr in ("search_seconds", "retrain_seconds"):
        return f"{value:.1f}"
    if attr == "samples_per_s":
        return f"{value:,.0f}"
    if attr == "budget":
        return f"{value:g}"
    # Free text (status, error messages): one line, no column separators.
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= 300 else text[:297] + "..."


def render_table(rows: Iterable[ReportRow]) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(attr, getattr(row, attr)) for _, attr in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def render_report(title: str, rows: list[ReportRow], preamble: list[str] = (), notes: list[str] = ()) -> str:
    parts = [f"# {title}", ""]
    if preamble:
        parts += [*preamble, ""]
    parts += [render_table(rows)]
    parts += [
        "Columns: test AUC / logloss, embedding params / bytes, fraction (of the full-width embedding params) and "
        "samples/s (retrain training throughput) come from each run's `retrain/metrics.json` (the baseline's "
        "`full/metrics.json`); compression = full-width embedding params / the run's (`compression_ratio`); search "
        "s / retrain s are the phases' wall times from `run_state.json` (the baseline's training wall time is in the "
        "retrain column); a run whose fraction exceeds its budget is `over budget`, never `done`; notes are what the "
        "search could not meet or adapted to the data (`plan.json` extra: fallbacks, adaptations).",
        "",
    ]
    for row in rows:
        parts.append(f"- `{row.method}` budget {format_cell('budget', row.budget)}: `{row.run_dir}`")
    if notes:
        parts += ["", *notes]
    return "\n".join(parts) + "\n"


def parse_table(text: str) -> list[dict[str, str]]:
    """The first Markdown table of a report as a list of {header: cell text}."""
    lines = [line.strip() for line in text.splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("| ") and "method" in line), None)
    if start is None:
        raise ReportError("no report table found")
    headers = [h.strip() for h in lines[start].strip("|").split(" | ")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        # Split on unescaped " | " only: error messages keep their escaped pipes.
        cells = [c.strip().replace("\\|", "|") for c in _split_row(line)]
        rows.append(dict(zip(headers, cells)))
    return rows


def _split_row(line: str) -> list[str]:
    body = line.strip()[1:-1]
    cells, current, i = [], [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body) and body[i + 1] == "|":
            current.append("\\|")
            i += 2
            continue
        if body[i] == "|":
            cells.append("".join(current))
            current = []
        else:
            current.append(body[i])
        i += 1
    cells.append("".join(current))
    return cells


def parse_number(cell: str) -> float | None:
    """A rendered number back as a float (``1,234`` -> 1234.0, ``2.50x`` -> 2.5, ``—`` -> None)."""
    cell = cell.strip()
    if cell == MISSING:
        return None
    return float(cell.replace(",", "").rstrip("x"))


def write_if_changed(path: Path, text: str) -> bool:
    """Atomic write, skipped when the file already holds ``text`` (a rerun that redid nothing
    leaves its report untouched). Returns whether it wrote."""
    if path.exists() and path.read_text() == text:
        return False
    atomic_write_text(path, text)
    return True


# ---------------------------------------------------------------------------- Pareto plot
def plot_pareto(rows: list[ReportRow], path: str | Path, title: str = "test AUC vs embedding parameters") -> None:
    """Test AUC against embedding parameters (log x), one line per method ordered by size, the
    full-width baseline as a star. Failed runs have no point. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training hosts; must precede pyplot's import
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    try:
        methods: dict[str, list[ReportRow]] = {}
        for row in rows:
            if row.done and row.test_auc is not None and row.embedding_params:
                methods.setdefault(row.method, []).append(row)
        baseline = methods.pop(BASELINE_METHOD, [])
        for method, points in methods.items():
            points.sort(key=lambda r: r.embedding_params)
            xs = [r.embedding_params for r in points]
            ys = [r.test_auc for r in points]
            (line,) = ax.plot(xs, ys, marker="o", label=method)
            # Budgets that landed on the same point (e.g. a soft budget the search did not meet)
            # share one label instead of overprinting each other.
            labels: dict[tuple[int, float], list[str]] = {}
            for r in points:
                labels.setdefault((r.embedding_params, r.test_auc), []).append(f"{r.budget:g}")
            for (x, y), budgets in labels.items():
                ax.annotate(", ".join(budgets), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=line.get_color())
        for r in baseline:
            ax.plot([r.embedding_params], [r.test_auc], marker="*", markersize=14, color="black", linestyle="none",
                    label="full width (baseline)")
        if not methods and not baseline:
            ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.set_xscale("log")
            ax.legend(fontsize=8)
        ax.set_xlabel("embedding parameters (log scale)")
        ax.set_ylabel("test AUC")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            # The temporary name ends in .tmp: name the format explicitly.
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
