"""Shared by the fault tests: a tiny one-rank model's ``--set`` flags and the check that a command
failed with exactly one ``embdim: error:`` line."""

from __future__ import annotations

SMALL = ["data.batch_size=64", "data.eval_batch_size=128", "model.embedding_dim=8",
         "model.dense_arch_layer_sizes=[8]", "model.over_arch_layer_sizes=[8, 1]",
         "train.progress_bar=false", "train.log_every=0"]


def set_flags(*settings: str) -> list[str]:
    """``--set`` flags for SMALL plus ``settings``."""
    return [a for s in (*SMALL, *settings) for a in ("--set", s)]


def one_error_line(capsys) -> str:
    """The captured stderr, asserted to be one ``embdim: error: ...`` line without a traceback."""
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("embdim: error: ") and "Traceback" not in err, err
    return lines[0]
