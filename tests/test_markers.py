"""The unit/integration split of tests/: every test that starts processes is marked ``slow``.

``pytest -m "not slow"`` is the fast loop (docs/architecture.md#tests). It stays fast only if no
unmarked test starts processes, so this module reads the test files' source (``ast``, nothing is
imported or run) and fails on any test that reaches, directly or through module-level helpers and
fixtures, one of:

- ``run_multiprocess(...)`` (gloo ranks, tests/multiprocess.py);
- a ``subprocess`` call in a function that names ``sys.executable`` (a Python child process; a quick
  ``git ls-files`` does not count);
- a command-line run that starts ranks: ``main([...])`` or ``<module>.main([...])`` whose argument
  list (list displays, also through a local or module-level variable or ``*name``) starts with
  ``run``, ``compare`` or ``demo``, or holds ``--nproc-per-node`` or ``--ranks`` (``embdim
  launch``, the benchmark drivers' torchrun) without ``--no-run``.

A test counts as marked through ``@pytest.mark.slow`` or a module-level ``pytestmark`` holding it.
``REFUSED_BEFORE_START`` lists the tests that match a rule yet never start a process (every
command line they pass is refused first); each entry must keep matching, so the list cannot go stale.
"""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

SPAWNING_COMMANDS = {"run", "compare", "demo"}
"""First words of an ``embdim`` command line that run phases through torchrun."""
RANK_FLAGS = {"--nproc-per-node", "--ranks"}
"""Flags that give a rank count: ``embdim launch`` and the benchmark drivers start torchrun."""
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}

REFUSED_BEFORE_START = {
    "test_launch.py::test_launch_errors": "every launch command line is refused before torchrun starts",
    "test_run_compare.py::test_run_rejects_another_method_in_the_same_folder":
        "the run folder belongs to another method: refused before the first phase starts",
}
"""Tests that match a rule above but start no process, with the reason."""


def _is_slow_mark(node: ast.AST) -> bool:
    """``pytest.mark.slow`` (also called, ``pytest.mark.slow(...)``)."""
    if isinstance(node, ast.Call):
        node = node.func
    return isinstance(node, ast.Attribute) and node.attr == "slow" and isinstance(node.value, ast.Attribute) \
        and node.value.attr == "mark"


def _module_marked_slow(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            values = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            if any(_is_slow_mark(v) for v in values):
                return True
    return False


def _list_assignments(nodes: list[ast.AST]) -> dict[str, ast.List]:
    """``name = [...]`` assignments among ``nodes`` (a module's body, or every node of a function)."""
    out = {}
    for node in nodes:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value
    return out


def _argv_strings(node: ast.AST, lists: dict[str, ast.List], depth: int = 0) -> list[str | None]:
    """The elements of a command-line list: string constants, None for anything computed."""
    if isinstance(node, ast.Name) and node.id in lists and depth < 4:
        node = lists[node.id]
    if not isinstance(node, ast.List):
        return [None]
    out: list[str | None] = []
    for element in node.elts:
        if isinstance(element, ast.Starred):
            out += _argv_strings(element.value, lists, depth + 1)
        elif isinstance(element, ast.Constant) and isinstance(element.value, str):
            out.append(element.value)
        else:
            out.append(None)
    return out


def _starts_ranks(argv: list[str | None]) -> bool:
    if argv and argv[0] in SPAWNING_COMMANDS:
        return True
    return bool(RANK_FLAGS & set(argv)) and "--no-run" not in argv


def _direct_reasons(function: ast.FunctionDef | ast.AsyncFunctionDef, module_lists: dict[str, ast.List]) -> set[str]:
    """What ``function``'s own body does that starts processes."""
    lists = {**module_lists, **_list_assignments(list(ast.walk(function)))}
    names_executable = any(isinstance(n, ast.Attribute) and n.attr == "executable"
                           and isinstance(n.value, ast.Name) and n.value.id == "sys" for n in ast.walk(function))
    reasons = set()
    for node in ast.walk(function):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name == "run_multiprocess":
            reasons.add("run_multiprocess")
        elif names_executable and name in SUBPROCESS_CALLS and (
                name == "Popen" or isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                and func.value.id == "subprocess"):
            reasons.add("a python subprocess")
        elif name == "main" and node.args and _starts_ranks(_argv_strings(node.args[0], lists)):
            reasons.add("a command line that starts ranks")
    return reasons


def unmarked_process_tests(source: str, filename: str = "<test>") -> dict[str, set[str]]:
    """``{test name: reasons}`` of the tests in ``source`` that start processes without the ``slow``
    marker. Follows calls to module-level functions and fixtures (by parameter name)."""
    tree = ast.parse(source, filename)
    if _module_marked_slow(tree):
        return {}
    functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    module_lists = _list_assignments(list(tree.body))
    direct = {name: _direct_reasons(f, module_lists) for name, f in functions.items()}
    uses: dict[str, set[str]] = {}
    for name, f in functions.items():
        called = {n.func.id for n in ast.walk(f) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        params = {a.arg for a in f.args.args + f.args.kwonlyargs}
        uses[name] = (called | params) & set(functions) - {name}

    def reasons(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        out = set(direct[name])
        for other in uses[name] - seen:
            out |= {f"{r} (via {other})" if "via" not in r else r for r in reasons(other, seen | {name})}
        return out

    found = {}
    for name, f in functions.items():
        if name.startswith("test") and not any(_is_slow_mark(d) for d in f.decorator_list):
            why = reasons(name)
            if why:
                found[name] = why
    return found


def test_tests_that_start_processes_are_marked_slow() -> None:
    problems, matched = [], set()
    for path in sorted(TESTS.glob("test_*.py")):
        for name, why in unmarked_process_tests(path.read_text(), str(path)).items():
            key = f"{path.name}::{name}"
            if key in REFUSED_BEFORE_START:
                matched.add(key)
                continue
            problems.append(f"tests/{key} starts processes ({', '.join(sorted(why))}) but is not marked "
                            f"@pytest.mark.slow")
    stale = sorted(set(REFUSED_BEFORE_START) - matched)
    assert not stale, f"REFUSED_BEFORE_START lists tests that no rule matches any more: {stale}"
    assert not problems, "\n".join(problems)


def test_the_slow_marker_is_registered_and_strict() -> None:
    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    assert "slow:" in ini["pytest"]["markers"]
    # A misspelt marker (@pytest.mark.slwo) would otherwise silently leave a test in the fast loop.
    assert "--strict-markers" in ini["pytest"]["addopts"].split()


def test_the_checker_catches_each_rule() -> None:
    unmarked = unmarked_process_tests('''
import subprocess, sys
import pytest
from embdim.launch.main import main
from tests.multiprocess import run_multiprocess

LAUNCH = ["launch", "--nproc-per-node", "2", "--"]

def _body(rank, world_size):
    pass

@pytest.fixture
def trained(tmp_path):
    assert main([*LAUNCH, "train", "--out", str(tmp_path)]) == 0

def _python(code):
    return subprocess.run([sys.executable, "-c", code])

def test_ranks():
    run_multiprocess(_body, world_size=2)

def test_uses_fixture(trained):
    pass

def test_python_child():
    _python("print(1)")

def test_compare(tmp_path):
    argv = ["compare", "--out", str(tmp_path)]
    main(argv)

def test_bench_driver():
    bench.main(["--ranks", "2", "--out", "x"])

@pytest.mark.slow
def test_marked():
    run_multiprocess(_body)

def test_git_is_fine():
    subprocess.run(["git", "ls-files"])

def test_in_process_cli_is_fine(tmp_path):
    main(["train", "--data", "d", "--out", str(tmp_path)])
    main(["--data", "d", "--nproc-per-node", "1", "--no-run"])
''')
    assert set(unmarked) == {"test_ranks", "test_uses_fixture", "test_python_child", "test_compare",
                             "test_bench_driver"}
    assert unmarked["test_uses_fixture"] == {"a command line that starts ranks (via trained)"}
    assert unmarked["test_python_child"] == {"a python subprocess (via _python)"}
    # A module-level pytestmark marks every test of the file.
    assert unmarked_process_tests("import pytest\npytestmark = [pytest.mark.slow]\n"
                                  "def test_x():\n    run_multiprocess(f)\n") == {}
