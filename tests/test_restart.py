"""Fault tolerance end to end: torchrun's own ``--max-restarts`` restarts the worker group after an
injected fault, the restarted group resumes from the last checkpoint and finishes, and the result is
the uninterrupted run's, bitwise; the sample log shows every training row trained on (or skipped)
exactly once per epoch across the fault and the restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from embdim.launch.main import main
from tests.test_checkpoint import SCORES, TINY, _load_dcp, assert_every_row_once
from tests.tiny_data import write_tiny_dataset


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    # 2000 train rows = 15 row groups of 128 and one of 80; 2 ranks x 64 rows per step give 15 steps
    # per epoch and skip 80 rows, other ones every epoch.
    out = tmp_path_factory.mktemp("uneven") / "data"
    write_tiny_dataset(out, num_rows={"train": 2000, "valid": 256, "test": 256})
    return out


def _launch(data: Path, run: Path, *overrides: str, launch_flags: tuple[str, ...] = ()) -> int:
    sets = [a for o in (*TINY, *overrides) for a in ("--set", o)]
    return main(["launch", "--nproc-per-node", "2", *launch_flags, "--", "train", "--data", str(data),
                 "--out", str(run), *sets])


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_and_matches_uninterrupted_run(uneven, tmp_path, capfd):
    common = ["train.epochs=2", "train.checkpoint_every=5", "train.keep_checkpoints=0",
              "sharding.sharding_type=row_wise", "train.sample_log=true"]
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    assert _launch(uneven, straight, *common) == 0
    capfd.readouterr()

    # One command: rank 1 raises after step 13 of the first attempt; torchrun restarts the group
    # (TORCHELASTIC_RESTART_COUNT=1), which resumes from ckpt/step_10, runs past step 13 and finishes.
    assert _launch(uneven, restarted, *common, "train.fail_at_step=13", "train.fail_rank=1",
                   launch_flags=("--max-restarts", "1")) == 0
    out = capfd.readouterr()
    # The fault fired in the first attempt; had it fired again, the one allowed restart would have
    # been spent and the command would have failed.
    assert "injected failure at step 13 on rank 1" in out.err
    assert "resumed from" in out.out + out.err

    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((restarted / "metrics.json").read_text())
    assert a["resumed_from_step"] is None and b["resumed_from_step"] == 10
    assert {k: a[k] for k in SCORES} == {k: b[k] for k in SCORES}
    assert a["steps"] == 30 and a["valid_auc"] > 0.6
    final_a = _load_dcp(straight / "ckpt" / "step_30", tmp_path)
    final_b = _load_dcp(restarted / "ckpt" / "step_30", tmp_path)
    assert final_a.keys() == final_b.keys()
    assert sum("embedding_bags" in k and k.startswith("model/") for k in final_a) == 4
    for key, value in final_a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, final_b[key]), key  # weights and optimizer state, bitwise
        else:
            assert value == final_b[key], key

    # The sample logs: the straight run is one attempt; the restarted one two attempts of the same
    # torchrun job, the first one's steps 11-13 discarded (replayed from the step-10 checkpoint).
    assert [x["counted"] for x in assert_every_row_once(straight, uneven, epochs=2, steps=30).attempts] == [[1, 30]]
    account = assert_every_row_once(restarted, uneven, epochs=2, steps=30)
    assert [(x["restart_count"], x["world_size"], x["start_step"], x["counted"]) for x in account.attempts] == [
        (0, 2, 0, [1, 10]), (1, 2, 10, [11, 30])]
    for epoch in (0, 1):
        assert account.num_rows(epoch) == 2 * 15 * 64 and account.num_rows(epoch, "dropped") == 80
    # The skipped rows differ between the epochs (a reshuffled tail), yet each epoch covers all rows.
    assert {k: sorted(v.tolist()) for k, v in account.dropped[0].items()} != \
        {k: sorted(v.tolist()) for k, v in account.dropped[1].items()}


def test_restarts_get_a_fresh_rendezvous_store_per_attempt():
    """torchrun's default shares one TCPStore across restarts, whose stale keys can hang the restarted
    group's init (pytorch/pytorch#135712): launch turns the sharing off when restarts are allowed."""
    from embdim.launch.launcher import torchrun_env
    from embdim.launch.main import build_parser

    def env(*flags: str, **environ: str) -> dict[str, str]:
        args = build_parser().parse_args(["launch", "--nproc-per-node", "2", *flags, "--", "train"])
        return torchrun_env(args, environ)

    assert env("--max-restarts", "2")["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env()
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env("--max-restarts", "0")
    # An explicit setting is the user's.
    assert env("--max-restarts", "2", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="0")["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "0"
