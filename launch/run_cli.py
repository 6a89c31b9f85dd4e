"""``embdim run`` (search, retrain, report in one command) and ``embdim compare`` (a grid of runs).

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
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from embdim.launch.data_cli import _positive_int
from embdim.launch.launcher import repo_env, torchrun_argv
from embdim.launch.procs import Interrupted, supervised, torchrun_command
from embdim.trainer.config import ConfigError
from embdim.trainer.data.manifest import DatasetError, load_manifest
from embdim.io import atomic_write_json
from embdim.launch.phases_cli import add_config_arguments, check_out, require_counts
from embdim.io import output_lock
from embdim.trainer import report as rep

RUN_PHASES = ("search", "retrain")


class PhaseFailed(RuntimeError):
    """A phase's ranks exited non-zero; ``message`` is the error they printed."""

    def __init__(self, phase: str, code: int, message: str, log: Path) -> None:
        super().__init__(f"{phase} failed with exit code {code}: {message} (log: {log})")
        self.phase, self.code, self.message, self.log = phase, code, message, log


# ---------------------------------------------------------------------------- running a phase
def _launch_namespace(nproc: int, command: list[str]) -> argparse.Namespace:
    return argparse.Namespace(
        nproc_per_node=str(nproc), nnodes=None, node_rank=None, rdzv_backend=None, rdzv_endpoint=None, rdzv_id=None,
        max_restarts=None, master_addr=None, master_port=None, standalone=True, command=command,
    )


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


def run_logged(argv: list[str], log_path: Path, header: str, *, echo: bool, cwd: Path | None = None,
               env: dict[str, str] | None = None, progress: ProgressLines | None = None) -> int:
    """Runs ``argv`` (repository root on its PYTHONPATH, ``env`` added to this process's
    environment) with stdout and stderr appended to ``log_path`` under a ``=== <time> <header>``
    line and, with ``echo``, copied to stdout (else the lines ``progress`` picks are shown);
    returns the exit code. The child runs in its own session; when this call ends in any other way
    than the child's exit (``Interrupted`` by a signal, an error), the child and all its
    descendants are stopped before it returns (``launch.procs.supervised``)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The log is a running record, not an artifact: appended as it comes, never replaced.
    with open(log_path, "ab") as log:
        log.write(f"\n=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} {header}\n".encode())
        log.flush()
        try:
            with supervised(argv, cwd=cwd, env=repo_env({**os.environ, **(env or {})}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) as proc:
                # read1 returns what is there: tqdm's carriage-return updates pass through unbuffered.
                while chunk := proc.stdout.read1(65536):
                    log.write(chunk)
                    log.flush()
                    if echo:
                        sys.stdout.write(chunk.decode(errors="replace"))
                        sys.stdout.flush()
                    elif progress is not None:
                        progress.feed(chunk)
                return proc.wait()
        except Interrupted as e:
            log.write(f"\n=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} {e}: stopped every "
                      f"process of the phase\n".encode())
            raise


def run_phase(name: str, command: list[str], nproc: int, log_path: Path, echo: bool, *,
              env: dict[str, str] | None = None, say=None) -> None:
    """Runs ``embdim COMMAND`` on ``nproc`` ranks through torchrun, copying the ranks' output to
    ``log_path`` (appended: a resumed phase keeps the interrupted attempt's lines above) and, with
    ``echo``, to stdout (else their progress lines go to ``say``). Raises ``PhaseFailed`` with the
    ranks' error on a non-zero exit."""
    argv = torchrun_command(torchrun_argv(_launch_namespace(nproc, command)))
    code = run_logged(argv, log_path, f"embdim {' '.join(command)} (nproc {nproc})", echo=echo, env=env,
                      progress=ProgressLines(say) if say is not None else None)
    if code != 0:
        message = error_message(log_path.read_text(errors="replace").split("\n=== ")[-1]) or f"exit code {code}"
        raise PhaseFailed(name, code, message, log_path)


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
                echo: bool, say) -> None:
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


def _validate(args: argparse.Namespace, methods: list[str], budgets: list[float]) -> None:
    """Flags, dataset and config checked once before any rank starts: a typo fails in a second,
    not after the first phase of a grid."""
    from embdim.embedding_methods import get_method
    from embdim.trainer.config import load_config
    from embdim.trainer.phases import RunConfig

    for method in methods:
        get_method(method)  # ValueError naming the choices
    for budget in budgets:
        if not 0.0 < budget <= 1.0:
            raise ConfigError(f"--budget: must be in (0, 1], got {budget}")
    data = Path(args.data)
    if not data.is_dir():
        raise DatasetError(f"{data}: dataset folder not found (--data); make one with `embdim data synth --out {data}`")
    load_manifest(data)
    check_out(args.out, data)
    for method in methods:
        require_counts(data, method)
    load_config(args.config, [*args.set, f"search.budget={budgets[0]}"], cls=RunConfig)


def execute_run(args: argparse.Namespace, method: str, budget: float, run_dir: Path, echo: bool, say) -> rep.ReportRow:
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
        _run_phases(state, phases, args.nproc_per_node, run_dir, echo, say)
    finally:
        # Also after a failure: the report then says which phase failed and why.
        row = rep.run_row(run_dir, method, budget)
        text = rep.render_report(f"embdim run: {method}, budget {budget:g}", [row],
                                 preamble=[f"Data: `{args.data}`; ranks: {args.nproc_per_node}; "
                                           f"settings: {' '.join(args.set) or '(defaults)'}"
                                           + (f"; config `{args.config}`" if args.config else "")])
        rep.write_if_changed(run_dir / rep.REPORT, text)
    return row


# ---------------------------------------------------------------------------- commands
def _parse_list(text: str, flag: str, convert) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{flag}: empty list")
    try:
        return [convert(t) for t in items]
    except ValueError:
        raise ConfigError(f"{flag}: expected a comma-separated list, got {text!r}") from None


def _run(args: argparse.Namespace) -> int:
    _validate(args, [args.method], [args.budget])
    run_dir = Path(args.out)
    say = lambda msg: print(f"run: {msg}", flush=True)  # noqa: E731
    try:
        with output_lock(run_dir):
            row = execute_run(args, args.method, args.budget, run_dir, echo=args.verbose, say=say)
    except PhaseFailed as e:
        print(f"embdim: error: run {args.method} budget {args.budget:g}: {e}", file=sys.stderr)
        print(f"run: rerun the same command to resume; report: {run_dir / rep.REPORT}", file=sys.stderr)
        return 1
    cell = rep.format_cell
    say(f"test AUC {cell('test_auc', row.test_auc)}, logloss {cell('test_logloss', row.test_logloss)}, "
        f"{cell('embedding_params', row.embedding_params)} embedding params "
        f"({cell('compression_ratio', row.compression_ratio)} smaller than full width); report {run_dir / rep.REPORT}")
    return 0


def cell_dir(out: Path, method: str, budget: float) -> Path:
    return out / f"{method}_b{budget:g}"


def _row(build, method: str, budget: float, run_dir: Path) -> rep.ReportRow:
    """A report row; a run folder with an unreadable file becomes a row saying so, not a crash that
    loses the whole grid's report."""
    try:
        return build()
    except rep.ReportError as e:
        return rep.ReportRow(method=method, budget=budget, status=f"unreadable: {e}", run_dir=run_dir)


def _compare(args: argparse.Namespace) -> int:
    methods = _parse_list(args.methods, "--methods", str)
    budgets = _parse_list(args.budgets, "--budgets", float)
    _validate(args, methods, budgets)
    out = Path(args.out)
    with output_lock(out):
        return _compare_grid(args, methods, budgets, out)


def _compare_grid(args: argparse.Namespace, methods: list[str], budgets: list[float], out: Path) -> int:
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
                    args.nproc_per_node, full, echo=args.verbose, say=lambda m: say(f"full width: {m}"))
    except PhaseFailed as e:
        say(f"full width: FAILED: {e}")
    bar.update(1)
    failed = 0
    for method, budget in cells:
        bar.set_postfix_str(f"{method} b{budget:g}")
        try:
            row = execute_run(args, method, budget, cell_dir(out, method, budget), echo=args.verbose,
                              say=lambda m, mb=(method, budget): say(f"{mb[0]} b{mb[1]:g}: {m}"))
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


def add_verbose_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show everything the ranks print (sharding plans, library warnings); by default it goes "
                        "to the phase's log file in logs/ and the screen shows progress and a summary")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder made by `embdim data`")
    p.add_argument("--nproc-per-node", type=_positive_int, default=1, help="ranks per phase, through torchrun (default 1)")
    add_config_arguments(p)  # for every phase
    add_verbose_argument(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    from embdim.embedding_methods import METHOD_NAMES

    p = subparsers.add_parser("run", help="search + retrain + test + report in one command (resumable)")
    _add_common(p)
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHOD_NAMES)}")
    p.add_argument("--budget", required=True, type=float, help="fraction of the full-width embedding parameters")
    p.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    p.set_defaults(func=_run)

    p = subparsers.add_parser("compare", help="full-width baseline + a grid of methods x budgets; report.md, pareto.png")
    _add_common(p)
    p.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated methods (default: all)")
    p.add_argument("--budgets", default="0.5,0.25,0.1", help="comma-separated budgets (default %(default)s)")
    p.add_argument("--out", required=True, help="comparison folder: full/, <method>_b<budget>/, report.md, pareto.png")
    p.set_defaults(func=_compare)
