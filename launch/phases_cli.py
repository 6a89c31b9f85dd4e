"""``embdim search`` and ``embdim retrain``: the two phases of learning embedding sizes.

::

    embdim search  --data DIR --method NAME [--budget F] --out RUN_DIR [--config ...] [--set ...]
    embdim retrain --data DIR --plan RUN_DIR/plan.json --out RUN_DIR/retrain [--config ...] [--set ...]

Both run on one rank, or on many under ``embdim launch`` / torchrun, and write ``metrics.json``
like ``embdim train``. One TOML file serves both (method sections such as ``[optembed]`` are
typed by the method; see ``trainer.phases.RunConfig``).
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from embdim.trainer.config import ConfigError, load_config
from embdim.trainer.data.manifest import DatasetError, counts_path, load_manifest, require_dataset
from embdim.io import StorageError, output_lock

# Methods whose search reads the train-split id counts (counts/<field>.npy): AMTL's frequency
# features, PME's unseen-id pruning. Checked before any rank starts training, not at export.
COUNTS_METHODS = ("amtl", "pme")


def check_out(out: str | Path, data: str | Path) -> None:
    """A run folder (``--out``) must not be a file, the dataset folder, inside it, or a dataset."""
    out, data = Path(out), Path(data)
    if out.exists() and not out.is_dir():
        raise StorageError(out, "exists and is a file, not a folder (--out)")
    resolved, data_dir = out.resolve(), data.resolve()
    if resolved == data_dir or data_dir in resolved.parents:
        where = "the dataset folder" if resolved == data_dir else "inside the dataset folder"
        raise ConfigError(f"--out: {out} is {where} --data {data}; give the run a folder of its own")
    if (out / "dataset.json").exists():
        raise ConfigError(f"--out: {out} holds a dataset (dataset.json); give the run a folder of its own")


@contextmanager
def run_output(args: argparse.Namespace) -> Iterator[None]:
    """The ``--out`` of a rank-level command, checked and locked for the block: one job per run
    folder. Only rank 0 (or a process without torchrun) takes the lock, and none does when a parent
    ``embdim`` process holds it for its ranks (``embdim.io.output_lock``)."""
    check_out(args.out, args.data)
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    with output_lock(args.out):
        yield


def require_counts(data: str | Path, method: str) -> None:
    """The id counts a method's search reads, present and readable before training starts."""
    if method not in COUNTS_METHODS:
        return
    from embdim.trainer.data.manifest import load_counts

    for f in load_manifest(data).sparse:
        if not counts_path(data, f.name).exists():
            raise DatasetError(f"{counts_path(data, f.name)}: missing id counts of field {f.name!r}, which {method} "
                               f"reads; `embdim data` writes them (counts/<field>.npy, train-split id counts)")
        load_counts(data, f.name)


def check_plan_method(plan_path: str | Path) -> None:
    """The plan's ``method`` names a known method (a typo would otherwise retrain silently with
    another method's defaults)."""
    from embdim.embedding_methods import METHOD_NAMES
    from embdim.embedding_methods.plan import PlanError, load_plan, plan_file

    path = plan_file(plan_path)
    plan = load_plan(path)
    if plan.method not in METHOD_NAMES:
        raise PlanError(f"{path}: method {plan.method!r} is not one of {', '.join(METHOD_NAMES)}")


def load_run_config(args: argparse.Namespace, extra: list[str] = ()) -> "object":
    from embdim.trainer.phases import RunConfig

    return load_config(args.config, [*args.set, *extra], cls=RunConfig)


def _search(args: argparse.Namespace) -> int:
    from embdim.embedding_methods import get_method
    from embdim.sharding.distributed import destroy, init_distributed
    from embdim.trainer.phases import run_search

    get_method(args.method)  # unknown names fail before any rank starts
    extra = []
    if args.budget is not None:
        if not 0.0 < args.budget <= 1.0:
            raise ConfigError(f"--budget: must be in (0, 1], got {args.budget}")
        extra.append(f"search.budget={args.budget}")
    if args.init_from:
        extra.append(f'search.init_from="{args.init_from}"')
    config = load_run_config(args, extra)
    data = require_dataset(args.data)
    require_counts(data, args.method)
    with run_output(args):
        env = init_distributed()
        try:
            result = run_search(config, data, args.out, args.method, env)
        finally:
            destroy()
    if env.is_main:
        print(f"search: {args.method} plan {result['plan']} at {result['achieved_fraction']:.4f} of the full-width "
              f"embedding parameters")
    return 0


def _retrain(args: argparse.Namespace) -> int:
    from embdim.sharding.distributed import destroy, init_distributed
    from embdim.trainer.phases import run_retrain

    config = load_run_config(args)
    data = require_dataset(args.data)
    plan = Path(args.plan)
    if not plan.exists():
        raise DatasetError(f"{plan}: plan not found (--plan); make one with `embdim search`")
    check_plan_method(plan)
    with run_output(args):
        env = init_distributed()
        try:
            metrics = run_retrain(config, data, plan, args.out, env)
        finally:
            destroy()
    if env.is_main:
        print(f"retrain: test AUC {metrics['test_auc']:.4f}, {metrics['embedding_params']} embedding parameters "
              f"({metrics['compression_ratio']:.2f}x smaller than full width); metrics in {Path(args.out) / 'metrics.json'}")
    return 0


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config`` and ``--set``, the same for every training command."""
    p.add_argument("--config", default=None,
                   help="TOML config (see configs/default.toml and configs/methods.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.epochs=2")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder made by `embdim data`")
    add_config_arguments(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    from embdim.embedding_methods import METHOD_NAMES

    p = subparsers.add_parser("search", help="search embedding sizes with a method; writes RUN_DIR/plan.json")
    _add_common(p)
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHOD_NAMES)}")
    p.add_argument("--budget", type=float, default=None,
                   help="fraction of the full-width embedding parameters, in (0, 1] (default: none)")
    p.add_argument("--init-from", default=None,
                   help="warm start from a trained baseline's run folder or checkpoint (methods that support it)")
    p.add_argument("--out", required=True, help="run folder: plan.json, metrics.json, ckpt/")
    p.set_defaults(func=_search)

    p = subparsers.add_parser("retrain", help="train the compact model of a size plan")
    _add_common(p)
    p.add_argument("--plan", required=True, help="RUN_DIR/plan.json written by `embdim search`")
    p.add_argument("--out", required=True, help="run folder of the retrained model (e.g. RUN_DIR/retrain)")
    p.set_defaults(func=_retrain)
