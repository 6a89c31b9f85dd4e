"""The import layers (docs/architecture.md): methods and sharding know no trainer or launcher, and
the bottom layer (``embdim/errors.py``, ``embdim/io.py``) imports nothing from embdim's
subpackages. Read from the source with ``ast``, so an import hidden inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("trainer", "sharding", "embedding_methods", "launch")


def _imports(path: Path, package: tuple[str, ...] | None = None) -> list[tuple[int, str]]:
    """``(line, dotted module)`` of every import in the file, relative ones resolved against
    ``package`` (default: the file's folder in the repository)."""
    package = package if package is not None else path.relative_to(REPO).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(("embdim", *package[: len(package) - node.level + 1]))
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # ``from embdim import trainer`` imports a subpackage through its parent.
            out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names] or [(node.lineno, module)]
    return out


def _offending(path: Path, forbidden: tuple[str, ...], package: tuple[str, ...] | None = None) -> list[str]:
    return [f"{path.name}:{line}: imports {module}" for line, module in sorted(_imports(path, package))
            if any(module == f or module.startswith(f + ".") for f in forbidden)]


def test_the_import_scanner_sees_every_form(tmp_path):
    """Guards the checks below against a scanner that finds nothing."""
    fake = tmp_path / "probe.py"
    fake.write_text("import embdim.trainer.loop\nfrom embdim import launch\nimport embdim.trainerx\n"
                    "def f():\n    from embdim.trainer.config import Config\nfrom ..trainer import io\n")
    found = _offending(fake, ("embdim.trainer", "embdim.launch"), package=("sharding",))
    assert [line.split(":")[1] for line in found] == ["1", "2", "5", "6"], found


@pytest.mark.parametrize(("package", "forbidden"), [
    ("embedding_methods", ("embdim.trainer", "embdim.launch", "embdim.sharding")),
    ("sharding", ("embdim.trainer", "embdim.launch")),
])
def test_methods_and_sharding_import_no_trainer_or_launcher(package, forbidden):
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    bad = [hit for path in files for hit in _offending(path, forbidden)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", ["errors.py", "io.py"])
def test_the_bottom_layer_imports_no_subpackage(name):
    path = REPO / "embdim" / name
    bad = _offending(path, tuple(f"embdim.{p}" for p in SUBPACKAGES))
    # The bottom layer may import the other bottom-layer module only.
    bad += [f"{name}:{line}: imports {m}" for line, m in _imports(path)
            if m.startswith("embdim") and m not in ("embdim.errors", "embdim.io")]
    assert not bad, "\n".join(bad)


def test_moved_modules_keep_their_old_names():
    """``trainer/io.py`` and ``trainer/distributed.py`` moved down a layer; their old import paths
    are the same module objects, and ``ConfigError`` is one class under both names."""
    import embdim.errors
    import embdim.io
    import embdim.sharding.distributed
    import embdim.trainer.config
    import embdim.trainer.distributed
    import embdim.trainer.io

    assert embdim.trainer.io is embdim.io
    assert embdim.trainer.distributed is embdim.sharding.distributed
    assert embdim.trainer.config.ConfigError is embdim.errors.ConfigError


def _method_probes(tree: ast.AST) -> list[str]:
    """``hasattr``/``getattr`` calls whose object is the method (``method``, ``method_cls``)."""
    return [f"line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in ("hasattr", "getattr") and node.args
            and isinstance(node.args[0], ast.Name) and node.args[0].id in ("method", "method_cls")]


def test_the_search_phase_calls_only_declared_hooks():
    """``trainer/phases.py`` probes no method with hasattr/getattr, and every attribute it uses on
    ``method`` is declared (with a default) on ``EmbeddingMethod``."""
    from embdim.embedding_methods.base import EmbeddingMethod

    probe = ast.parse("if hasattr(method, 'bind_model'):\n    getattr(method, 'x', 0)\ngetattr(config, method.name)\n")
    assert len(_method_probes(probe)) == 2  # the check below can fail
    tree = ast.parse((REPO / "trainer" / "phases.py").read_text())
    assert not _method_probes(tree), _method_probes(tree)
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "method"}
    assert {"warm_start", "init_search_state", "bind_model", "required_search_steps",
            "needs_initial_checkpoint", "requires_search_training", "supports_warm_start"} <= used
    undeclared = sorted(name for name in used if not hasattr(EmbeddingMethod, name))
    assert not undeclared, f"trainer/phases.py uses undeclared method hooks: {undeclared}"
