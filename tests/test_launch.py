"""The ``embdim`` CLI: parsing, user errors (exit code 2, one message line), torchrun argv."""

from __future__ import annotations

import sys

import pytest

from embdim.launch.launcher import torchrun_argv
from embdim.launch.main import COMMANDS, build_parser, cli, main
from tests.tiny_data import write_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "data"
    write_tiny_dataset(out, num_rows={"train": 256, "valid": 64})
    return out


def _launch_argv(argv: list[str]) -> list[str]:
    return torchrun_argv(build_parser().parse_args(["launch", *argv]))


def test_subcommands_registered():
    parser = build_parser()
    actions = [a for a in parser._actions if a.dest == "command_name"]
    assert set(actions[0].choices) >= {"data", "train", "launch", "demo"}
    assert len(COMMANDS) >= 4


def test_train_arguments():
    args = build_parser().parse_args(["train", "--data", "D", "--out", "R", "--config", "c.toml",
                                      "--set", "train.epochs=2", "--set", "model.interaction=dcn"])
    assert (args.data, args.out, args.config) == ("D", "R", "c.toml")
    assert args.set == ["train.epochs=2", "model.interaction=dcn"]


def test_launch_single_node_defaults_to_standalone():
    argv = _launch_argv(["--nproc-per-node", "2", "--", "train", "--data", "D", "--out", "R", "--set", "a.b=1"])
    assert argv == ["--nproc_per_node", "2", "--standalone", "-m", "embdim.launch.main",
                    "train", "--data", "D", "--out", "R", "--set", "a.b=1"]


def test_launch_multi_node_flags():
    argv = _launch_argv(["--nproc-per-node", "8", "--nnodes", "2", "--rdzv-backend", "c10d",
                         "--rdzv-endpoint", "host0:29400", "--rdzv-id", "job7", "--max-restarts", "3",
                         "--", "train", "--data", "D", "--out", "R"])
    assert argv[:argv.index("-m")] == ["--nproc_per_node", "8", "--nnodes", "2", "--rdzv_backend", "c10d",
                                       "--rdzv_endpoint", "host0:29400", "--rdzv_id", "job7", "--max_restarts", "3"]
    assert argv[argv.index("-m"):] == ["-m", "embdim.launch.main", "train", "--data", "D", "--out", "R"]
    assert "--standalone" not in argv


def test_launch_static_rendezvous_flags():
    argv = _launch_argv(["--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                         "--master-port", "29600", "--", "train", "--data", "D", "--out", "R"])
    assert ["--node_rank", "1"] == argv[argv.index("--node_rank"):argv.index("--node_rank") + 2]
    assert "--master_addr" in argv and "29600" in argv and "--standalone" not in argv


def test_launch_errors(capsys):
    assert main(["launch", "--nproc-per-node", "2"]) == 2
    assert "missing the subcommand" in capsys.readouterr().err
    assert main(["launch", "--nproc-per-node", "2", "--", "launch", "--nproc-per-node", "2"]) == 2
    assert "cannot run under the launcher" in capsys.readouterr().err
    assert main(["launch", "--nproc-per-node", "0", "--", "train"]) == 2  # argparse: not positive
    assert "positive" in capsys.readouterr().err


def test_train_missing_data_folder(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("embdim: error:") and str(missing) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_train_folder_without_manifest(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "dataset.json" in capsys.readouterr().err


def test_train_unknown_set_key(tiny, tmp_path, capsys):
    assert main(["train", "--data", str(tiny), "--out", str(tmp_path / "run"), "--set", "train.epochz=2"]) == 2
    err = capsys.readouterr().err
    assert "train.epochz" in err and "--set" in err and len(err.strip().splitlines()) == 1


def test_train_bad_config_file(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nembedding_dim = 6\n")
    assert main(["train", "--data", str(tiny), "--out", str(tmp_path / "run"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "model.embedding_dim" in err
    assert main(["train", "--data", str(tiny), "--out", str(tmp_path / "run"), "--config", str(tmp_path / "x.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_traceback_opt_in(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBDIM_TRACEBACK", "1")
    with pytest.raises(ValueError):
        main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")])


def test_argparse_errors_and_help(capsys):
    assert main(["train", "--out", "R"]) == 2  # --data is required
    assert "--data" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main([]) == 2  # no subcommand: help on stderr


def test_cli_exits_with_main_code(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["embdim", "train", "--data", str(tmp_path / "nope"), "--out", "R"])
    with pytest.raises(SystemExit) as e:
        cli()
    assert e.value.code == 2
