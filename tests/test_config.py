"""trainer.config: TOML loading, --set overrides, error messages naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from embdim.trainer.config import Config, ConfigError, config_to_dict, load_config, merge_overrides

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    config = load_config()
    assert config == Config()
    assert config.model.embedding_dim % 4 == 0


def test_default_toml_matches_dataclass_defaults():
    # configs/default.toml documents the defaults: it must load and equal them exactly.
    assert load_config(REPO / "configs" / "default.toml") == Config()


def test_methods_toml_matches_dataclass_defaults(tmp_path):
    # configs/methods.toml lists the search/retrain/method sections at their defaults; together
    # with default.toml it is a complete run config.
    from embdim.trainer.config import tomllib  # tomli on Python 3.10
    from embdim.trainer.phases import RunConfig

    methods = (REPO / "configs" / "methods.toml").read_text()
    from embdim.embedding_methods import METHOD_NAMES

    # One section per registered method (the registry is the only list; tests/test_registry.py).
    assert set(tomllib.loads(methods)) == {"search", "retrain", *METHOD_NAMES}
    both = tmp_path / "run.toml"
    both.write_text((REPO / "configs" / "default.toml").read_text() + "\n" + methods)
    assert load_config(both, cls=RunConfig) == RunConfig()
    # Complete, not only equal: every field of every section is listed (a missing key would
    # silently take its default and the file would no longer document it).
    import dataclasses

    listed = tomllib.loads(both.read_text())
    for section, values in listed.items():
        fields = {f.name for f in dataclasses.fields(getattr(RunConfig(), section))}
        assert set(values) == fields, (section, sorted(fields - set(values)))
    assert set(listed) == {f.name for f in dataclasses.fields(RunConfig)}


def test_toml_values(tmp_path):
    path = write(tmp_path, """
[data]
batch_size = 64
shuffle = false

[model]
embedding_dim = 8
dense_arch_layer_sizes = [32, 8]
interaction = "dcn"

[optim]
dense_lr = 1
""")
    config = load_config(path)
    assert config.data.batch_size == 64 and config.data.shuffle is False
    assert config.model.embedding_dim == 8 and config.model.dense_arch_layer_sizes == [32, 8]
    assert config.model.interaction == "dcn"
    assert config.optim.dense_lr == 1.0 and isinstance(config.optim.dense_lr, float)  # int accepted for float
    assert config.data.eval_batch_size == Config().data.eval_batch_size  # untouched keys keep defaults


def test_overrides_types(tmp_path):
    path = write(tmp_path, "[train]\nepochs = 3\n")
    config = load_config(path, [
        "train.epochs=5",                       # int, overrides the file
        "optim.sparse_lr=0.5",                  # float
        "train.tensorboard=true",               # bool
        "model.embedding_dim=8",
        "model.dense_arch_layer_sizes=[16, 8]",  # list
        "optim.dense_optimizer=sgd",            # bare word -> string
        'sharding.sharding_type="row_wise"',    # quoted string
    ])
    assert config.train.epochs == 5
    assert config.optim.sparse_lr == 0.5
    assert config.train.tensorboard is True
    assert config.model.dense_arch_layer_sizes == [16, 8]
    assert config.optim.dense_optimizer == "sgd"
    assert config.sharding.sharding_type == "row_wise"


def test_table_dtype():
    assert load_config().model.table_dtype == "fp32"
    assert load_config(overrides=["model.table_dtype=fp16"]).model.table_dtype == "fp16"
    with pytest.raises(ConfigError, match=r"model.table_dtype: unknown 'half'; choose from \['fp32', 'fp16'\]"):
        load_config(overrides=["model.table_dtype=half"])
    with pytest.raises(ConfigError, match="model.table_dtype must be a string"):
        load_config(overrides=["model.table_dtype=16"])


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "[train]\nepochz = 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "train.epochz" in str(e.value)


def test_unknown_section_names_file_and_section(tmp_path):
    path = write(tmp_path, "[trainer]\nepochs = 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "trainer" in str(e.value)


def test_unknown_override_key():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["train.nope=1"])
    assert "train.nope" in str(e.value) and "--set" in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("train.epochs=1.5", "train.epochs"),        # float for int
    ("train.epochs=true", "train.epochs"),       # bool is not an int
    ("train.tensorboard=1", "train.tensorboard"),  # int for bool
    ("model.dense_arch_layer_sizes=16", "model.dense_arch_layer_sizes"),  # scalar for list
    ("model.dense_arch_layer_sizes=[16, 'a']", "model.dense_arch_layer_sizes[1]"),
    ("optim.sparse_lr=fast", "optim.sparse_lr"),  # bare word for float
])
def test_wrong_types(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert key in str(e.value)


def test_wrong_type_in_file_names_file(tmp_path):
    path = write(tmp_path, '[data]\nbatch_size = "big"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "data.batch_size" in str(e.value)


@pytest.mark.parametrize("overrides, key", [
    (["model.embedding_dim=6", "model.dense_arch_layer_sizes=[6]"], "model.embedding_dim"),  # not % 4
    (["model.dense_arch_layer_sizes=[64, 8]"], "model.dense_arch_layer_sizes"),  # last != embedding_dim
    (["model.over_arch_layer_sizes=[8, 2]"], "model.over_arch_layer_sizes"),     # last != 1
    (["model.interaction=attention"], "model.interaction"),
    (["model.table_dtype=bf16"], "model.table_dtype"),
    (["model.table_dtype=float16"], "model.table_dtype"),
    (["optim.sparse_optimizer=lamb"], "optim.sparse_optimizer"),
    (["optim.dense_lr=0"], "optim.sparse_lr"),
    (["data.batch_size=0"], "data.batch_size"),
    (["train.epochs=0"], "train.epochs"),
    (["train.checkpoint_every=-1"], "train.checkpoint_every"),
    (["train.keep_checkpoints=-2"], "train.keep_checkpoints"),
    (["train.fail_at_step=0"], "train.fail_at_step"),
    (["sharding.sharding_type=diagonal"], "sharding.sharding_type"),
    (["sharding.compute_kernel=dense"], "sharding.compute_kernel"),
])
def test_validation_errors(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert key in str(e.value)


def test_validation_error_names_file(tmp_path):
    path = write(tmp_path, "[model]\nembedding_dim = 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "model.embedding_dim" in str(e.value)


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[data\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("text", ["train.epochs", "epochs=3", ".epochs=3", "train.=3"])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=[text])


def test_override_of_non_section():
    with pytest.raises(ConfigError, match="not a section"):
        merge_overrides({"train": 3}, ["train.epochs=2"])


def test_config_to_dict_round_trip():
    config = load_config(overrides=["train.epochs=4", "model.interaction=dcn"])
    as_dict = config_to_dict(config)
    assert as_dict["train"]["epochs"] == 4 and as_dict["model"]["interaction"] == "dcn"
    assert load_config(overrides=[f"{s}.{k}={v!r}".replace("'", '"').replace("True", "true").replace("False", "false")
                                  for s, section in as_dict.items() for k, v in section.items()]) == config
