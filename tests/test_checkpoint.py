"""Checkpoints on 2 gloo ranks: save/restore equality under a different plan (fused optimizer state
included), exact mid-epoch resume after an injected failure, and resume on 1 rank; the sample log
shows every training row trained on exactly once per epoch across the failure and the resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from embdim.launch.main import main
from tests.cli_checks import one_error_line
from tests.multiprocess import run_multiprocess
from tests.tiny_data import write_tiny_dataset
from embdim.trainer.data.manifest import load_manifest
from embdim.trainer.data.reader import list_work_units
from embdim.trainer.sample_log import SampleAccount, reconcile_sample_log

TINY = ["data.batch_size=64", "data.eval_batch_size=128", "model.embedding_dim=8",
        "model.dense_arch_layer_sizes=[16, 8]", "model.over_arch_layer_sizes=[16, 1]",
        "train.log_every=4", "train.progress_bar=false", "optim.dense_lr=0.01"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "data"
    write_tiny_dataset(out)
    return out


def _full(value, like: torch.Tensor | None = None):
    """The whole of a (sharded) tensor as a plain tensor on every rank (collective).

    A key that exists on some ranks only (the fused optimizer's state of table-wise tables lives on
    the owning rank) is passed as ``None`` elsewhere, with ``like`` giving its shape.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from embdim.sharding.state import all_reduce_sum

    if value is not None and not isinstance(value, ShardedTensor):
        return value
    out = torch.zeros(like.shape if value is None else value.size(), dtype=torch.float32)
    for shard in [] if value is None else value.local_shards():
        index = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
        out[index] = shard.tensor
    return all_reduce_sum(out)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key in sorted(tree, key=str):
            out.update(_flatten(tree[key], f"{prefix}{key}/"))
        return out
    return {prefix.rstrip("/"): tree}


def _restore_body(rank: int, world_size: int, data: str, run_dir: str) -> None:
    from embdim.trainer.config import load_config
    from embdim.sharding.distributed import init_distributed
    from embdim.trainer.loop import Trainer

    env = init_distributed()
    common = [*TINY, "optim.sparse_optimizer=rowwise_adagrad", "train.max_steps=5"]
    saved = Trainer(load_config(overrides=[*common, "sharding.sharding_type=table_wise"]), data, run_dir, env=env)
    saved.fit()
    # A fresh model under another plan (row-wise) restores the table-wise checkpoint: DCP reshards.
    torch.manual_seed(123)  # different initial weights, so equality below means "loaded"
    restored = Trainer(load_config(overrides=[*common, "sharding.sharding_type=row_wise"]), data, run_dir, env=env)
    assert restored.resume() == Path(run_dir) / "ckpt" / "step_5"
    assert restored.state.step == 5
    a = _flatten({"model": saved.model.state_dict(), "optim": saved.optimizer.state_dict()})
    b = _flatten({"model": restored.model.state_dict(), "optim": restored.optimizer.state_dict()})
    # Row-wise state has every table on every rank; table-wise fused state only the local tables.
    keys_a = set().union(*_gather_keys(a))
    assert keys_a == set(b), sorted(keys_a ^ set(b))
    momentum = [k for k in sorted(b) if "momentum1" in k]
    assert len(momentum) == 4  # rowwise_adagrad state of every table (fused, sharded)
    assert any(k.endswith("exp_avg_sq") for k in b)  # dense Adam state
    for key in sorted(b):
        y = _full(b[key])
        x = _full(a.get(key), like=y) if isinstance(y, torch.Tensor) else a.get(key, y)
        if isinstance(y, torch.Tensor):
            assert torch.equal(x, y), key
        else:
            assert x == y, key
    assert torch.count_nonzero(_full(b[momentum[0]])) > 0  # state that training actually wrote


def _gather_keys(tree: dict) -> list[set]:
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, set(tree))
    return out


@pytest.mark.slow
def test_save_and_restore_equality_across_plans(tiny, tmp_path):
    run_multiprocess(_restore_body, world_size=2, data=str(tiny), run_dir=str(tmp_path / "run"))


def _train(data: Path, run: Path, *overrides: str, nproc: int = 2) -> int:
    sets = [a for o in (*TINY, *overrides) for a in ("--set", o)]
    return main(["launch", "--nproc-per-node", str(nproc), "--", "train", "--data", str(data), "--out", str(run), *sets])


def _load_dcp(path: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{path.parent.parent.name}_{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    return _flatten(torch.load(out, weights_only=False))


SCORES = ("valid_auc", "valid_logloss", "test_auc", "test_logloss", "steps", "epochs", "samples", "history")


def assert_every_row_once(run: Path, data: Path, *, epochs: int, steps: int) -> SampleAccount:
    """Reconciles RUN/sample_log (train.sample_log=true) and checks that the counted steps are 1..steps
    and that each of the epochs trained on, or skipped, every training row exactly once."""
    account = reconcile_sample_log(run / "sample_log")
    assert account.steps == list(range(1, steps + 1))
    units = list_work_units(data, load_manifest(data), "train")
    assert sum(u.num_rows for u in units) == load_manifest(data).splits["train"].num_rows
    assert account.exactly_once_errors(units, epochs=epochs) == []
    return account


@pytest.mark.slow
def test_exact_resume_after_failure_and_on_one_rank(tiny, tmp_path, capfd):
    # 2 epochs of 16 steps per rank; checkpoints every 5 steps; validation every 4 steps, so the
    # pipeline is detached and re-attached mid-epoch too.
    common = ["train.epochs=2", "train.checkpoint_every=5", "train.eval_every=4", "train.keep_checkpoints=0",
              "sharding.sharding_type=row_wise", "train.sample_log=true"]
    straight, failed = tmp_path / "straight", tmp_path / "failed"
    assert _train(tiny, straight, *common) == 0
    assert_every_row_once(straight, tiny, epochs=2, steps=32)

    # Rank 1 raises after step 13: the job fails, the last checkpoint is step 10 (mid-epoch 0).
    assert _train(tiny, failed, *common, "train.fail_at_step=13", "train.fail_rank=1") != 0
    assert "injected failure at step 13 on rank 1" in capfd.readouterr().err
    assert (failed / "ckpt" / "latest").read_text().strip() == "step_10"
    assert not (failed / "metrics.json").exists()
    one_rank = tmp_path / "one_rank"
    shutil.copytree(failed, one_rank)

    # The rerun resumes from step 10, replays steps 11-13 and finishes: bitwise the same run.
    assert _train(tiny, failed, *common) == 0
    assert "resumed from" in capfd.readouterr().out
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((failed / "metrics.json").read_text())
    assert b["resumed_from_step"] == 10 and a["resumed_from_step"] is None
    # The failed attempt's steps 11-13 were replayed: only its steps 1-10 count, then the rerun's.
    account = assert_every_row_once(failed, tiny, epochs=2, steps=32)
    assert [(x["start_step"], x["counted"]) for x in account.attempts] == [(0, [1, 10]), (10, [11, 32])]
    assert [account.num_rows(e) for e in (0, 1)] == [2048, 2048]  # 2 ranks x 16 x 64: no tail skipped
    assert {k: a[k] for k in SCORES} == {k: b[k] for k in SCORES}
    assert a["valid_auc"] > 0.65
    final_a = _load_dcp(straight / "ckpt" / "step_32", tmp_path)
    final_b = _load_dcp(failed / "ckpt" / "step_32", tmp_path)
    assert final_a.keys() == final_b.keys()
    tables = [k for k in final_a if "embedding_bags" in k and k.startswith("model/")]
    assert len(tables) == 4
    for key, value in final_a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, final_b[key]), key  # weights and optimizer state, bitwise
        else:
            assert value == final_b[key], key

    # One rank resumes the 2-rank checkpoint of step 10: DCP reshards the model, the reader
    # re-deals the 2048 - 10*2*64 = 768 unread rows of epoch 0 as 12 batches of 64.
    assert _train(tiny, one_rank, *common, "train.epochs=1", nproc=1) == 0
    c = json.loads((one_rank / "metrics.json").read_text())
    assert c["world_size"] == 1 and c["resumed_from_step"] == 10 and c["steps"] == 22
    account = assert_every_row_once(one_rank, tiny, epochs=1, steps=22)
    assert [(x["world_size"], x["counted"]) for x in account.attempts] == [(2, [1, 10]), (1, [11, 22])]
    assert c["valid_auc"] > 0.6

    # One rank loads the final 2-rank model: with nothing left to train it scores what the two
    # ranks scored (same rows, other batch boundaries: equal up to float rounding).
    last = tmp_path / "last_one_rank"
    shutil.copytree(straight, last)
    (last / "metrics.json").unlink()
    assert _train(tiny, last, *common, nproc=1) == 0
    d = json.loads((last / "metrics.json").read_text())
    assert d["world_size"] == 1 and d["resumed_from_step"] == 32 and d["steps"] == 32
    # (valid scores at step 32 come from the checkpoint; the test split is scored afresh)
    assert d["test_auc"] == pytest.approx(a["test_auc"], abs=1e-6)
    assert d["test_logloss"] == pytest.approx(a["test_logloss"], abs=1e-6)


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os

    from embdim.io import atomic_write_json

    umask = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(umask)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------------ faults
FAULT_SETS = [a for s in [*TINY, "train.log_every=0", "train.checkpoint_every=4", "train.max_steps=8"]
              for a in ("--set", s)]


def _train_1rank(data: Path, run: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--out", str(run), *FAULT_SETS, *extra])


@pytest.mark.parametrize("damage", ["truncated shard", "truncated metadata", "truncated sidecar", "missing folder"])
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(damage, tiny, tmp_path, caplog):
    from embdim.trainer.checkpoint import Checkpointer

    run = tmp_path / "run"
    assert _train_1rank(tiny, run) == 0
    ckpt = run / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step_8" and (ckpt / "step_4").is_dir()
    newest = ckpt / "step_8"
    if damage == "truncated shard":
        shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "truncated metadata":
        meta = newest / ".metadata"
        meta.write_bytes(meta.read_bytes()[:40])
    elif damage == "truncated sidecar":
        side = newest / "trainer_state.json"
        side.write_text(side.read_text()[:100])
    else:
        shutil.rmtree(newest)
    reason = Checkpointer(ckpt, env=None).damage(newest)
    assert reason is not None
    assert Checkpointer(ckpt, env=None).damage(ckpt / "step_4") is None
    (run / "metrics.json").unlink()
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert _train_1rank(tiny, run, "--set", "train.max_steps=12") == 0
    warned = " ".join(r.getMessage() for r in caplog.records if "damaged checkpoint" in r.getMessage())
    assert str(newest) in warned and f"resuming from {ckpt / 'step_4'}" in warned, warned
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 12


def test_no_intact_checkpoint_is_an_error_naming_each(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train_1rank(tiny, run) == 0
    for step in ("step_4", "step_8"):
        (run / "ckpt" / step / ".metadata").write_bytes(b"\x80\x04garbage")
    capsys.readouterr()
    assert _train_1rank(tiny, run, "--set", "train.max_steps=12") == 2
    err = one_error_line(capsys)
    assert "no intact checkpoint" in err and "step_4" in err and "step_8" in err and "unreadable DCP metadata" in err


def test_run_folder_of_another_width_or_dataset_is_refused(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train_1rank(tiny, run) == 0
    (run / "metrics.json").unlink()
    before = sorted(p.name for p in (run / "ckpt").iterdir())
    capsys.readouterr()
    narrower = ["--set", "model.embedding_dim=4", "--set", "model.dense_arch_layer_sizes=[16, 4]"]
    assert _train_1rank(tiny, run, *narrower) == 2
    err = one_error_line(capsys)
    assert str(run / "ckpt" / "step_8") in err and "another model" in err
    assert "model.embedding_dim=8 there, 4 here" in err
    other = tmp_path / "other"  # the same fields, one dense column less
    write_tiny_dataset(other, num_rows={"train": 512, "valid": 64})
    raw = json.loads((other / "dataset.json").read_text())
    raw["dense"] = raw["dense"][:2]
    (other / "dataset.json").write_text(json.dumps(raw))
    import pyarrow.parquet as pq

    for split in ("train", "valid"):
        part = other / split / "part-00000.parquet"
        pq.write_table(pq.read_table(part).drop_columns(["i2"]), part)
    assert _train_1rank(other, run) == 2
    err = one_error_line(capsys)
    assert "another dataset" in err and "dense columns ['i0', 'i1', 'i2'] there, ['i0', 'i1'] here" in err
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == before  # nothing changed


def test_damaged_plan_init_weights_are_named(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    sets = [a for s in TINY for a in ("--set", s)]
    assert main(["search", "--data", str(tiny), "--method", "fixed", "--budget", "0.8", "--out", str(run), *sets]) == 0
    plan = json.loads((run / "plan.json").read_text())
    plan["init_checkpoint"] = "plan_init.pt"
    (run / "plan.json").write_text(json.dumps(plan))
    torch.save({"w": torch.zeros(64, 8)}, run / "plan_init.pt")
    data = (run / "plan_init.pt").read_bytes()
    (run / "plan_init.pt").write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    capsys.readouterr()
    assert main(["retrain", "--data", str(tiny), "--plan", str(run / "plan.json"), "--out", str(run / "retrain"),
                 *sets]) == 2
    err = one_error_line(capsys)
    assert str(run / "plan_init.pt") in err and "damaged" in err and "retrain.init" in err
