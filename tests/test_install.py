"""What a fresh install meets outside the project: a user's own packages, other Python versions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, *, path_first: Path | None = None, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Runs ``python -c code`` (or ``python args``) with ``path_first`` ahead of the checkout on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (path_first, REPO) if p is not None)
    command = [sys.executable, *(args or ("-c", code))]
    return subprocess.run(command, env=env, cwd=path_first or REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_users_trainer_launch_and_sharding_packages_do_not_collide(tmp_path):
    """A user's top-level ``trainer``, ``launch`` and ``sharding`` packages (first on the path, and
    the working directory) neither shadow embdim's nor get shadowed by them."""
    for name in ("trainer", "launch", "sharding"):
        package = tmp_path / name
        package.mkdir()
        (package / "__init__.py").write_text(f"USER_PACKAGE = {name!r}\n")
        (package / "io.py").write_text("def user_io():\n    return 'mine'\n")
    code = """
import trainer, launch, sharding
from trainer.io import user_io
import embdim.embedding_methods
from embdim.embedding_methods import IdRemapper, load_compact_embedding, remap_dataset
from embdim.trainer.io import atomic_save_npy
from embdim.sharding import restore_compact_weights
import trainer as again
assert (trainer.USER_PACKAGE, launch.USER_PACKAGE, sharding.USER_PACKAGE) == ("trainer", "launch", "sharding")
assert again is trainer and user_io() == "mine"
print("ok", embdim.embedding_methods.__name__)
"""
    done = _python(code, path_first=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ok embdim.embedding_methods" in done.stdout
    cli = _python("", path_first=tmp_path, args=("-m", "embdim.launch.main", "--help"))
    assert cli.returncode == 0, cli.stderr
    assert "search" in cli.stdout and "retrain" in cli.stdout


@pytest.mark.slow
def test_the_numpy_side_imports_without_torch(tmp_path):
    """Data-loader processes unpickle an ``IdRemapper``: the plan, the remapper and the package
    root must import (and remap) with torch unavailable."""
    code = """
import pickle, sys
import numpy as np
sys.modules["torch"] = None  # any import of torch now fails
import embdim
from embdim.embedding_methods import IdRemapper, rename_plan
from embdim.embedding_methods.plan import FieldPlan, GroupPlan, SizePlan
plan = SizePlan("x", 8, [FieldPlan("a", 10, [GroupPlan(4, np.arange(2, 6, dtype=np.int64))])])
remap = pickle.loads(pickle.dumps(IdRemapper(plan, feature_names={"a": "cat_a"})))
out = remap({"cat_a": (np.array([1, 3, 5]), np.ones(3, dtype=np.int32))}, 3)
assert out["cat_a"][0].tolist() == [1, 3] and out["cat_a"][1].tolist() == [0, 1, 1], out
print("ok")
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def _readme_python_floor() -> tuple[int, int]:
    found = re.findall(r"`python3` \((3\.\d+)\+\)", (REPO / "README.md").read_text())
    assert len(found) == 1, f"README.md should state the Python floor once as `python3` (3.X+), found {found}"
    major, minor = found[0].split(".")
    return int(major), int(minor)


def test_python_floor_is_the_same_in_setup_and_readme():
    setup = (REPO / "setup.py").read_text()
    found = re.findall(r'python_requires=">=(3\.\d+)"', setup)
    assert len(found) == 1, found
    assert tuple(int(x) for x in found[0].split(".")) == _readme_python_floor()


def test_python_3_10_gets_tomli_from_every_install_path():
    """3.10 has no ``tomllib``: setup.py and both requirement files must bring ``tomli`` there."""
    assert _readme_python_floor() <= (3, 10), "the floor moved: drop tomli and this test"
    marker = re.compile(r"""tomli\s*;\s*python_version\s*<\s*["']3\.11["']""")
    for name in ("setup.py", "requirements-cpu.txt", "requirements-gpu.txt"):
        assert marker.search((REPO / name).read_text()), f"{name} does not install tomli on Python < 3.11"


@pytest.mark.slow
def test_config_loads_through_tomli_without_tomllib():
    """The Python 3.10 path of ``trainer.config``: no ``tomllib``, ``tomli`` instead (here the
    same parser under its 3.10 name)."""
    code = f"""
import sys, tomllib
sys.modules["tomli"] = tomllib  # tomli is what 3.11 vendored as tomllib
sys.modules["tomllib"] = None
sys.version_info = (3, 10, 13, "final", 0)
from embdim.trainer.config import Config, load_config, tomllib as parser
assert parser is sys.modules["tomli"]
assert load_config({str(REPO / "configs" / "default.toml")!r}) == Config()
print("ok")
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_missing_shared_data_skips_with_a_reason_and_fails_under_ci(tmp_path):
    import pytest

    from tests.conftest import require_shared_data

    assert require_shared_data(tmp_path, {"CI": "true"}) == tmp_path
    gone = tmp_path / "shared" / "data"
    with pytest.raises(pytest.skip.Exception, match=r"real data not found at .*shared/data"):
        require_shared_data(gone, {})
    with pytest.raises(pytest.fail.Exception, match="CI=true needs it"):
        require_shared_data(gone, {"CI": "true"})
    assert "-rs" in (REPO / "scripts" / "test.sh").read_text()  # skip reasons show in the summary


@pytest.mark.slow
def test_every_public_name_imports_from_embdim_and_is_in_the_readme():
    """``embdim`` re-exports the pipeline API lazily: importing it loads no torch, and every name
    it lists resolves and is documented in the README's pipeline section."""
    code = """
import sys, embdim
assert "torch" not in sys.modules
for name in embdim._API:
    assert getattr(embdim, name) is not None, name
assert "torch" in sys.modules
print(" ".join(embdim._API))
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Using the compact model"):readme.index("## Benchmarks")]
    undocumented = [name for name in done.stdout.split() if f"`{name}`" not in section]
    assert not undocumented, f"public names missing from the README's pipeline section: {undocumented}"
