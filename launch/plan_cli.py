"""``embdim plan ...``: inspect size plans.

``register(subparsers)`` adds the ``plan`` command; ``embdim plan show PLAN`` prints the plan's
parameters and bytes (float32, or fp16 tables with ``--table-dtype fp16``) against the full-width
model, the achieved fraction, a histogram of widths weighted by ids, and each field's widths.
Errors are raised (``PlanError``, a ``ValueError`` naming the file and field) for launch/main.py
to turn into a message.
"""

from __future__ import annotations

import argparse
import sys


def _show(args: argparse.Namespace) -> int:
    from embdim.embedding_methods.plan import load_plan, plan_file, summarize_plan

    from embdim.launch.phases_cli import check_plan_method

    path = plan_file(args.plan)
    plan = load_plan(path)
    check_plan_method(path)
    print(f"plan: {path}")
    print(summarize_plan(plan, table_dtype=args.table_dtype))
    return 0


def _plan_help(parser: argparse.ArgumentParser):
    def handler(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2
    return handler


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``plan {show}`` to the top-level subparsers."""
    plan = subparsers.add_parser("plan", help="inspect size plans (plan.json)",
                                 description="Inspect the size plans that searches export.")
    plan.set_defaults(func=_plan_help(plan))
    sub = plan.add_subparsers(dest="plan_command", metavar="{show}")
    p = sub.add_parser("show", help="parameters, bytes, achieved fraction and widths of a plan")
    p.add_argument("plan", metavar="PLAN", help="plan.json, or a run folder holding one")
    p.add_argument("--table-dtype", choices=["fp32", "fp16"], default="fp32",
                   help="count table bytes at this precision (the retrain's model.table_dtype); default fp32")
    p.set_defaults(func=_show)
