"""The orchestration behind ``embdim run`` (search, retrain, report in one command) and
``embdim compare`` (a grid of runs).

::

    embdim run     --data DIR --method NAME --budget F --out RUN_DIR [--nproc-per-node N] [--config ...] [--set ...]
    embdim compare --data DIR --methods fixed,mde,... --budgets 0.5,0.25 --out DIR [--nproc-per-node N] [...]

``run`` writes::

    RUN_DIR/plan.json, metrics.json, ckpt/      the search phase (``embdim search``)
    RUN_DIR/retrain/metrics.json, ckpt/, ...    the compact retrain with its test evaluation
    RUN_DIR/run_state.json                      finished phases, their wall times, the last error
    RUN_DIR/logs/{search,retrain}.log           everything the phase's ranks printed
    RUN_DIR/report.md                           a one-row report

Each phase runs through torchrun on N ranks (N = 1 too: a separate process group per phase keeps
a failing phase from taking the caller down and leaves no process-group state behind). Rerunning
the same command resumes: a phase whose completed artifact exists (``plan.json`` for search, a
retrain ``metrics.json`` carrying ``full_embedding_params``, which ``run_retrain`` adds last) is
skipped; an interrupted phase is started again with the same ``--out`` and the trainer continues
from its ``ckpt/latest``.

``compare`` trains the full-width baseline (``embdim train`` into DIR/full) and runs every
(method, budget) pair into DIR/<method>_b<budget>/ with the ``run`` logic; a failing cell is
recorded (its ``run_state.json`` holds the error) and the grid goes on. DIR/report.md and
DIR/pareto.png are rebuilt from the runs' files at the end (``trainer.report``). Rerunning the
same command finishes what is missing and retries failed cells.

This module decides which phases run, records them (``RunState``), scrapes the ranks' logs
(``error_message``, ``ProgressLines``) and builds the reports. Starting a phase's ranks is the
caller's: every function that runs phases takes ``run_phase``, a ``PhaseRunner``
(``launch.launcher.run_phase``, which goes through torchrun), so this package imports nothing
from ``launch/``. The command-line flags are parsed and checked in ``launch/run_cli.py``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from embdim.trainer import report as rep
from embdim.trainer.config import ConfigError
from embdim.io import atomic_write_json

RUN_PHASES = ("search", "retrain")


class PhaseFailed(RuntimeError):
    """A phase's ranks exited non-zero; ``message`` is the error they printed."""

    def __init__(self, phase: str, code: int, message: str, log: Path) -> None:
        super().__init__(f"{phase} failed with exit code {code}: {message} (log: {log})")
        self.phase, self.code, self.message, self.log = phase, code, message, log


PhaseRunner = Callable[..., None]
"""``run_phase(name, command, nproc, log_path, echo, *, env=None, say=None)``: runs ``embdim
COMMAND`` on ``nproc`` ranks, its output appended to ``log_path`` (echoed with ``echo``, else its
progress lines go to ``say``); raises ``PhaseFailed`` with the ranks' error on a non-zero exit.
``launch.launcher.run_phase`` is the one the command line passes."""


# ---------------------------------------------------------------------------- a phase's output
_ERROR_LINE = re.compile(r"([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.+)$")
_RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s*")
# Errors of the ranks that lose a peer, not causes.
_CONSEQUENTIAL = ("Connection closed by peer", "Connection reset by peer", "remote worker", "ProcessGroupNCCL",
                  "Socket Timeout")


def error_message(log_text: str) -> str:
    """The root error a phase's ranks printed, or "" when there is none.

    The CLI's ``embdim: error:`` line (user errors) wins; else the first ``SomethingError: message``
    line of a traceback. The first, because the rank that fails first prints first: its peers then
    die of consequential errors (gloo's "Connection closed by peer", torchrun's ChildFailedError),
    which name no cause and are only taken when nothing else is there.
    """
    lines = [_RANK_PREFIX.sub("", line).strip() for line in log_text.splitlines()]
    for line in lines:
        if line.startswith("embdim: error: "):
            return line[len("embdim: error: "):]
    errors = []
    for line in lines:
        m = _ERROR_LINE.search(line)
        if m and "ChildFailedError" not in m.group(1):
            errors.append(f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}")
    primary = [e for e in errors if not any(s in e for s in _CONSEQUENTIAL)]
    return (primary or errors or [""])[0]


# A trainer log line (``trainer.logger`` format, ``rankN`` under torchrun).
_LOG_LINE = re.compile(r"^\[embdim\] \S+ \S+ - (?:rank\d+ )?(embdim\.[\w.]+) - (INFO|WARNING|ERROR) - (.*)$")


class ProgressLines:
    """Picks, from a phase's output, what a quiet ``run``/``compare``/``demo`` shows: the trainer's
    progress lines (``train step N epoch E: loss ...``, validation, resume) and embdim's own
    warnings. Everything else (sharding plans, library deprecation warnings, torchrun's banner)
    stays in the phase's log file."""

    _INFO = (re.compile(r"^\w+ step \d+ epoch \d+: loss"), re.compile(r"^\w+ step \d+: valid auc"),
             re.compile(r"^resumed from "), re.compile(r"^skipping damaged"))

    def __init__(self, say) -> None:
        self.say = say
        self._tail = b""
        self._warned: set[str] = set()  # every rank logs its warnings: show each once

    def feed(self, chunk: bytes) -> None:
        *lines, self._tail = (self._tail + chunk).replace(b"\r", b"\n").split(b"\n")
        for raw in lines:
            m = _LOG_LINE.match(raw.decode(errors="replace").strip())
            if m is None:
                continue
            _, level, message = m.groups()
            if level == "INFO":
                if any(p.search(message) for p in self._INFO):
                    self.say(message)
            elif message not in self._warned:
                self._warned.add(message)
                self.say(f"{level.lower()}: {message}")


def phase_say(name: str, say):
    """``say`` for the progress lines of phase ``name``: prefixed with it, unless the trainer's
    line already starts with it ("retrain step 16 ...")."""
    return lambda message: say(message if message.startswith(f"{name} ") else f"{name}: {message}")


# ---------------------------------------------------------------------------- run state
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunState:
    """``RUN_DIR/run_state.json``: what the run is (kind, method, budget) and, per phase, its
    status, attempts and wall seconds summed over attempts (an interrupted attempt's time is part
    of what the phase cost). Written atomically after every phase attempt; never rewritten when
    nothing ran."""

    def __init__(self, run_dir: Path, identity: dict[str, Any]) -> None:
        self.path = run_dir / rep.RUN_STATE
        self.identity = identity
        self.data: dict[str, Any] = rep.read_json(self.path) if self.path.exists() else {}
        for key, value in identity.items():
            if key in self.data and self.data[key] != value:
                raise ConfigError(f"{self.path}: this run folder holds a run with {key}={self.data[key]!r}, not "
                                  f"{value!r}; give another --out (or delete the folder to start over)")
        if not self.data:
            self.data = {**identity, "phases": {}}

    def phase(self, name: str) -> dict[str, Any] | None:
        return self.data["phases"].get(name)

    def record(self, name: str, status: str, seconds: float, error: str | None = None, **extra: Any) -> None:
        info = self.data["phases"].get(name, {"attempts": 0, "seconds": 0.0})
        info = {**info, "status": status, "attempts": info.get("attempts", 0) + 1,
                "seconds": round(info.get("seconds", 0.0) + seconds, 3), "finished_at": _now(), **extra}
        if error is None:
            info.pop("error", None)
        else:
            info["error"] = error
        self.data["phases"][name] = info
        self.data[f"{name}_seconds"] = info["seconds"]
        atomic_write_json(self.path, self.data)

    def adopt(self, name: str, artifact: Path) -> None:
        """A phase finished outside this command (e.g. ``embdim search`` run by hand): marked done,
        its wall time unknown."""
        self.data["phases"][name] = {"status": "done", "attempts": 0, "seconds": None, "finished_at": _now(),
                                     "note": f"found finished ({artifact}); wall time unknown"}
        self.data[f"{name}_seconds"] = None
        atomic_write_json(self.path, self.data)


def _retrain_finished(run_dir: Path) -> bool:
    path = run_dir / "retrain" / "metrics.json"
    if not path.exists():
        return False
    try:
        return "full_embedding_params" in json.loads(path.read_text())
    except json.JSONDecodeError:
        return False


def _train_finished(run_dir: Path) -> bool:
    path = run_dir / "metrics.json"
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("phase") == "train"
    except json.JSONDecodeError:
        return False


def _note_settings(state: RunState, args: argparse.Namespace, say) -> None:
    """Records the --config/--set of the run's first command; a later command with other settings
    gets a warning, not an error: changing resume-free keys (train.fail_at_step to resume after an
    injected fault, log_every, ...) is legitimate, but finished phases are kept as they are."""
    settings = {"config": args.config, "set": list(args.set)}
    recorded = state.data.get("settings")
    if recorded is None:
        state.data["settings"] = settings  # written with the first phase record
    elif recorded != settings:
        say(f"warning: {state.path} records settings {recorded}, this command has {settings}; finished phases "
            f"are kept as they are (delete the folder to redo them), unfinished ones resume with the new settings")


def _run_phases(state: RunState, phases: list[tuple[str, list[str], Any]], nproc: int, run_dir: Path,
                echo: bool, say, run_phase: PhaseRunner) -> None:
    """Runs each (name, command, finished()) phase that is not finished, recording it in ``state``."""
    for name, command, finished in phases:
        if finished():
            info = state.phase(name)
            if info is None or info.get("status") != "done":
                state.adopt(name, run_dir)
            say(f"{name}: already done, skipped")
            continue
        say(f"{name}: running on {nproc} rank(s) (log: {run_dir / 'logs' / f'{name}.log'})")
        start = time.perf_counter()
        try:
            run_phase(name, command, nproc, run_dir / "logs" / f"{name}.log", echo, say=phase_say(name, say))
        except PhaseFailed as e:
            state.record(name, "failed", time.perf_counter() - start, error=e.message)
            raise
        except BaseException:
            state.record(name, "interrupted", time.perf_counter() - start, error="interrupted")
            raise
        if not finished():  # the ranks exited 0 but the artifact is missing: do not call it done
            message = f"{name} exited 0 but its completed artifact is missing in {run_dir}"
            state.record(name, "failed", time.perf_counter() - start, error=message)
            raise PhaseFailed(name, 0, message, run_dir / "logs" / f"{name}.log")
        state.record(name, "done", time.perf_counter() - start)
        say(f"{name}: done in {time.perf_counter() - start:.0f} s")


def _settings(args: argparse.Namespace) -> list[str]:
    out = ["--data", str(args.data)]
    if args.config:
        out += ["--config", str(args.config)]
    for s in args.set:
        out += ["--set", s]
    return out


def execute_run(args: argparse.Namespace, method: str, budget: float, run_dir: Path, echo: bool, say,
                run_phase: PhaseRunner) -> rep.ReportRow:
    """Search + retrain (each skipped when finished) + the run's report.md. Raises PhaseFailed."""
    from embdim.embedding_methods import load_plan

    identity = {"kind": "run", "method": method, "budget": budget}
    state = RunState(run_dir, identity)
    _note_settings(state, args, say)
    plan_path = run_dir / "plan.json"
    if plan_path.exists():
        plan = load_plan(plan_path)
        if plan.method != method:
            raise ConfigError(f"{plan_path}: plan of method {plan.method!r}, not {method!r}; give another --out")
    common = _settings(args)
    phases = [
        ("search", ["search", *common, "--method", method, "--budget", repr(budget), "--out", str(run_dir)],
         plan_path.exists),
        ("retrain", ["retrain", *common, "--plan", str(plan_path), "--out", str(run_dir / "retrain")],
         lambda: _retrain_finished(run_dir)),
    ]
    try:
        _run_phases(state, phases, args.nproc_per_node, run_dir, echo, say, run_phase)
    finally:
        # Also after a failure: the report then says which phase failed and why.
        row = rep.run_row(run_dir, method, budget)
        text = rep.render_report(f"embdim run: {method}, budget {budget:g}", [row],
                                 preamble=[f"Data: `{args.data}`; ranks: {args.nproc_per_node}; "
                                           f"settings: {' '.join(args.set) or '(defaults)'}"
                                           + (f"; config `{args.config}`" if args.config else "")])
        rep.write_if_changed(run_dir / rep.REPORT, text)
    return row


def cell_dir(out: Path, method: str, budget: float) -> Path:
    return out / f"{method}_b{budget:g}"


def _row(build, method: str, budget: float, run_dir: Path) -> rep.ReportRow:
    """A report row; a run folder with an unreadable file becomes a row saying so, not a crash that
    loses the whole grid's report."""
    try:
        return build()
    except rep.ReportError as e:
        return rep.ReportRow(method=method, budget=budget, status=f"unreadable: {e}", run_dir=run_dir)


def compare_grid(args: argparse.Namespace, methods: list[str], budgets: list[float], out: Path,
                 run_phase: PhaseRunner) -> int:
    """The full-width baseline, then every (method, budget) cell; report.md and pareto.png at the end.
    Returns the exit code of ``embdim compare`` (1 when the baseline is missing)."""
    from tqdm import tqdm

    cells = [(m, b) for m in methods for b in budgets]
    bar = tqdm(total=1 + len(cells), desc="compare", unit="run", dynamic_ncols=True)
    say = lambda msg: tqdm.write(f"compare: {msg}")  # noqa: E731 (keeps the bar at the bottom)

    # The full-width baseline: the reference of the compression column and the Pareto star.
    full = out / "full"
    bar.set_postfix_str("full width")
    try:
        state = RunState(full, {"kind": "train"})
        _note_settings(state, args, lambda m: say(f"full width: {m}"))
        _run_phases(state, [("train", ["train", *_settings(args), "--out", str(full)],
                             lambda: _train_finished(full))],
                    args.nproc_per_node, full, echo=args.verbose, say=lambda m: say(f"full width: {m}"),
                    run_phase=run_phase)
    except PhaseFailed as e:
        say(f"full width: FAILED: {e}")
    bar.update(1)
    failed = 0
    for method, budget in cells:
        bar.set_postfix_str(f"{method} b{budget:g}")
        try:
            row = execute_run(args, method, budget, cell_dir(out, method, budget), echo=args.verbose,
                              say=lambda m, mb=(method, budget): say(f"{mb[0]} b{mb[1]:g}: {m}"),
                              run_phase=run_phase)
            say(f"{method} b{budget:g}: {row.status}: test AUC {rep.format_cell('test_auc', row.test_auc)}, "
                f"{rep.format_cell('embedding_params', row.embedding_params)} embedding params")
        except (PhaseFailed, ConfigError) as e:
            failed += 1
            say(f"{method} b{budget:g}: FAILED: {e}")
        bar.update(1)
    bar.close()

    rows = [_row(lambda: rep.baseline_row(full), rep.BASELINE_METHOD, 1.0, full),
            *(_row(lambda m=m, b=b: rep.run_row(cell_dir(out, m, b), m, b), m, b, cell_dir(out, m, b))
              for m, b in cells)]
    preamble = [f"Data: `{args.data}`; ranks per phase: {args.nproc_per_node}; methods: {', '.join(methods)}; "
                f"budgets: {', '.join(f'{b:g}' for b in budgets)}; settings: {' '.join(args.set) or '(defaults)'}"
                + (f"; config `{args.config}`" if args.config else ""),
                "", f"![Pareto: test AUC vs embedding parameters]({rep.PARETO})"]
    rep.write_if_changed(out / rep.REPORT, rep.render_report("embdim compare", rows, preamble))
    rep.plot_pareto(rows, out / rep.PARETO)
    done = sum(r.done for r in rows)
    print(f"compare: {done} of {len(rows)} runs done, {len(rows) - done} failed, missing or over budget; "
          f"report {out / rep.REPORT}, plot {out / rep.PARETO}", flush=True)
    # Failed cells are results (e.g. a budget a method cannot reach), not a failure of the grid;
    # a missing baseline is: the table has no reference then.
    return 0 if rows[0].done else 1
