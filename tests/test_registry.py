"""One registry: the method names, the method config sections of ``RunConfig`` and the CLI
choices all come from the ``EmbeddingMethod`` classes that ``embedding_methods`` finds in its own
source. Every registered method builds from the registry alone."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection

import embdim.embedding_methods as methods
from embdim.embedding_methods.base import EmbeddingMethod, FieldSpec

D = 16
FIELDS = [FieldSpec("a", 12), FieldSpec("b", 40), FieldSpec("m", 9, multi_hot=True)]


def test_the_registry_lists_the_methods_in_report_order():
    shipped = ["fixed", "mde", "mlet", "optembed", "amtl", "pme"]  # a new method may slot in anywhere
    assert [name for name in methods.METHOD_NAMES if name in shipped] == shipped
    assert tuple(methods.METHODS) == methods.METHOD_NAMES
    for name, cls in methods.METHODS.items():
        assert issubclass(cls, EmbeddingMethod) and cls.name == name and methods.get_method(name) is cls


@pytest.mark.parametrize("name", methods.METHOD_NAMES)
def test_every_registered_method_builds_from_the_registry_alone(name):
    """Config, method on a tiny field list, its search tables and search module (on CPU), and a
    step-count schedule: nothing outside the registry is needed."""
    from embdim.embedding_methods.base import TrainingSchedule

    cls = methods.METHODS[name]
    method = cls(cls.Config(), FIELDS, D)
    tables = method.search_tables()
    assert all(t.embedding_dim % 4 == 0 and t.num_embeddings > 0 for t in tables)
    module = method.build_search_module(EmbeddingBagCollection(tables=tables, device=torch.device("cpu")))
    assert isinstance(module, torch.nn.Module)
    method.check_budget(1.0)
    if method.requires_search_training:
        method.fit_schedule(TrainingSchedule(steps_per_epoch=500, epochs=1, batch_size=8, valid_rows=64))


def test_run_config_sections_and_cli_choices_equal_the_registry():
    from embdim.launch.main import build_parser
    from embdim.trainer.phases import RunConfig

    sections = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    for name, cls in methods.METHODS.items():
        assert sections[name] is cls.Config
        assert isinstance(getattr(RunConfig(), name), cls.Config)
    assert {s for s, t in sections.items() if getattr(t, "__qualname__", "").endswith(".Config")} \
        == set(methods.METHOD_NAMES)

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    listed = ", ".join(methods.METHOD_NAMES)
    for command in ("search", "run"):
        option = next(a for a in commands[command]._actions if "--method" in a.option_strings)
        assert option.help == f"one of {listed}"
    grid = next(a for a in commands["compare"]._actions if "--methods" in a.option_strings)
    assert grid.default == ",".join(methods.METHOD_NAMES)


def test_a_new_method_file_registers_itself(tmp_path):
    """The scan finds a method by its class alone, in any module or sub-folder, orders by
    ``report_order``, and refuses a class whose name is not a literal."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "zeta.py").write_text("class Zeta(EmbeddingMethod):\n    name = 'zeta'\n    report_order = 0\n"
                                      "class Helper:\n    name = 'not a method'\n")
    (tmp_path / "sub" / "alpha.py").write_text("class Alpha(EmbeddingMethod):\n    name: str = 'alpha'\n"
                                               "    report_order = 7\n")
    assert methods._discover(tmp_path, "pkg") == {"zeta": ("pkg.zeta", "Zeta"), "alpha": ("pkg.sub.alpha", "Alpha")}
    (tmp_path / "bad.py").write_text("NAME = 'x'\nclass Bad(EmbeddingMethod):\n    name = NAME\n    report_order = 1\n")
    with pytest.raises(RuntimeError, match="Bad must set name"):
        methods._discover(tmp_path, "pkg")
