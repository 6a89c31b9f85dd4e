"""``bench/profile_step.py`` profiles real training steps of bench_gpu variants (1 gloo rank, CPU)."""

from __future__ import annotations

import json

import pytest

from bench.profile_step import main

pytestmark = pytest.mark.slow  # starts processes or runs over ~3 s (tests/test_markers.py)


def test_profiles_plain_and_compact_steps(tmp_path, capsys):
    summary = tmp_path / "prof.jsonl"
    code = main(["--variants", "plain,compact_fixed", "--rows-per-table", "500", "--dim", "32", "--batch-size", "64",
                 "--warmup", "1", "--steps", "1", "--out", str(tmp_path / "work"), "--json", str(summary)])
    assert code == 0
    rows = {r["variant"]: r for r in map(json.loads, summary.read_text().splitlines())}
    assert set(rows) == {"plain", "compact_fixed"}
    for row in rows.values():
        assert row["aten_ops_per_step"] > 0 and row["leaf_ops_per_step"] > 0
    assert "compact_fixed" in capsys.readouterr().out
    # The compact model's projections are extra work beside the same dense network.
    assert rows["compact_fixed"]["aten_ops_per_step"] > rows["plain"]["aten_ops_per_step"]
