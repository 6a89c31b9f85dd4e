"""The GPU step benchmark's harness, run for real on 2 gloo ranks at toy sizes (CPU)."""

from __future__ import annotations

import json

import pytest

from bench.bench_gpu import main, render

VARIANTS = ["plain", "full", "full_parquet", "search_pme", "compact_pme", "compact_fixed", "search_mlet",
            "plain_d16", "ebc_d16", "ebc_compact_fixed"]


@pytest.mark.slow
def test_every_variant_is_timed_beside_plain_torchrec(tmp_path):
    out = tmp_path / "bench"
    code = main(["--ranks", "2", "--rows-per-table", "600", "--dim", "32", "--batch-sizes", "128",
                 "--shardings", "table_wise,row_wise", "--variants", ",".join(VARIANTS), "--warmup", "1",
                 "--steps", "2", "--skeleton-rows", "3000", "--loader-workers", "0",
                 "--set", "pme.saliency_batches=2", "--set", "mlet.inner_dim=48", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert code == 0, [r for r in rows if "error" in r]
    timed = {(r["sharding"], r["variant"]): r for r in rows if "step_ms" in r}
    assert set(timed) == {(s, v) for s in ("table_wise", "row_wise") for v in VARIANTS}
    for r in timed.values():
        assert r["nproc"] == 2 and r["batch_size"] == 128
        assert r["step_ms"] > 0 and abs(r["samples_per_s"] - 2 * 128 / (r["step_ms"] / 1e3)) < 1e-6 * r["samples_per_s"]
    # The compact PME plan is exported from the search model of the same run, at the budget.
    for sharding in ("table_wise", "row_wise"):
        export = next(r for r in rows if r["variant"] == "export_pme" and r["sharding"] == sharding)
        assert abs(export["fraction"] - 0.25) <= 0.02 * 0.25
        assert timed[(sharding, "compact_pme")]["fraction"] == export["fraction"]
        assert timed[(sharding, "compact_pme")]["remap_ms"] is not None
        assert timed[(sharding, "compact_fixed")]["fraction"] <= 0.25
        # Traffic estimate: the compact tables move fewer bytes per step than the full ones.
        full, fixed = timed[(sharding, "full")], timed[(sharding, "compact_fixed")]
        assert fixed["emb_gbps"] * fixed["step_ms"] < full["emb_gbps"] * full["step_ms"]
        # The narrower plain references run at width 16 of 32: half the parameters, half the bytes.
        for ref in ("plain_d16", "ebc_d16"):
            assert timed[(sharding, ref)]["fraction"] == 0.5 and timed[(sharding, ref)]["dim"] == 16
            narrow, wide = timed[(sharding, ref)], timed[(sharding, "plain")]
            assert abs(narrow["emb_gbps"] * narrow["step_ms"] * 2 - wide["emb_gbps"] * wide["step_ms"]) < 1e-3 * (
                wide["emb_gbps"] * wide["step_ms"])
        # The compact module alone in the EBC's place moves the compact tables' bytes.
        alone = timed[(sharding, "ebc_compact_fixed")]
        assert alone["fraction"] == fixed["fraction"]
        assert abs(alone["emb_gbps"] * alone["step_ms"] - fixed["emb_gbps"] * fixed["step_ms"]) < 1e-3 * (
            fixed["emb_gbps"] * fixed["step_ms"])
    report = (out / "bench_gpu.md").read_text()
    assert "| 2 | row_wise | 128 | compact_pme |" in report and "export_pme" in report


def test_render_compares_with_plain_of_the_same_setting():
    base = {"nproc": 1, "sharding": "table_wise", "batch_size": 8, "peak_gib": 1.0, "samples_per_s": 8.0}
    rows = [dict(base, variant="plain", step_ms=10.0), dict(base, variant="full", step_ms=13.0),
            dict(base, variant="search_amtl", batch_size=16, step_ms=20.0),
            {"nproc": 1, "sharding": "table_wise", "variant": "search_mlet", "error": "OOM: out of memory"}]
    text = render(rows)
    assert "| full |" in text and "| 1.30 |" in text  # 13 ms against plain's 10 ms
    amtl = next(line for line in text.splitlines() if "search_amtl" in line)
    assert amtl.split("|")[9].strip() == ""  # no plain row at batch 16: no ratio rather than a wrong one
    assert "OOM: out of memory" in text


def test_reference_widths_are_checked_before_anything_runs(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--variants", "plain,plain_d30", "--out", "/nonexistent/never_written"])
    err = capsys.readouterr().err
    assert "plain_d30" in err and "multiple of 4" in err


@pytest.mark.slow
def test_capped_plain_layouts_fp16_and_multi_hot(tmp_path):
    import pytest

    """The one-GPU comparisons: plain TorchRec capped to a compact model's table memory (ids
    folded), the same compact plan in both layouts, fp16 tables, and multi-hot bags."""
    out = tmp_path / "bench"
    variants = ["plain", "plain_cap100", "compact_fixed", "compact_fixed_project", "compact_fixed_fp16",
                "plain_cap100_fp16", "ebc_compact_fixed_pad", "ebc_compact_fixed_project"]
    code = main(["--ranks", "1", "--rows-per-table", "600", "--dim", "32", "--batch-sizes", "96",
                 "--variants", ",".join(variants), "--warmup", "1", "--steps", "2", "--skeleton-rows", "3000",
                 "--budget", "0.125", "--multi-hot-fields", "3", "--multi-hot-mean", "4", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert code == 0, [r for r in rows if "error" in r]
    timed = {r["variant"]: r for r in rows if "step_ms" in r}
    assert set(timed) == set(variants)
    plain, capped = timed["plain"], timed["plain_cap100"]
    from embdim.trainer.data.manifest import load_manifest

    cards = [f.num_embeddings for f in load_manifest(out / "data").sparse]
    assert capped["fraction"] == sum(min(c, 100) for c in cards) / sum(cards) < 0.2
    assert capped["table_gib"] / plain["table_gib"] == pytest.approx(capped["fraction"])
    # Ids folded into the capped tables: the same lookups, so the same bytes per step.
    assert abs(capped["emb_gbps"] * capped["step_ms"] - plain["emb_gbps"] * plain["step_ms"]) < 1e-6 * (
        plain["emb_gbps"] * plain["step_ms"])
    pad, project, half = timed["compact_fixed"], timed["compact_fixed_project"], timed["compact_fixed_fp16"]
    # pad (the default) and project are the same tables; project also stores the projections.
    assert pad["table_gib"] == project["table_gib"] and pad["fraction"] == 0.125 < project["fraction"]
    assert half["table_gib"] * 2 == pad["table_gib"] and half["table_dtype"] == "fp16"
    assert timed["plain_cap100_fp16"]["table_gib"] * 2 == capped["table_gib"]
    assert timed["ebc_compact_fixed_pad"]["fraction"] == pad["fraction"]
    # Multi-hot bags: more ids than rows in the batch, so more bytes than single-hot 26 x 96 lookups.
    assert plain["emb_gbps"] * plain["step_ms"] / 1e3 * 1e9 / 3 > 26 * 96 * 32 * 4
