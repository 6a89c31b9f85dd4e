"""Profile training steps of one or more ``bench.bench_gpu`` variants: where the time goes, how
many ops a step launches, and which ops would stall a GPU.

Builds each variant exactly as ``bench.bench_gpu`` does (``build_variant``, same in-memory
batches, same ``TrainPipelineSparseDist``) in this one process (1 rank: NCCL on a GPU, gloo on
CPU; no torchrun needed), runs ``--warmup`` steps, then ``--steps`` steps under
``torch.profiler`` and prints, per variant:

- the top ops by self time (CUDA self time on a GPU, CPU self time otherwise), optionally split
  by input shape (``--by-shape``);
- ops per step: every ATen op call, and the *leaf* calls that do work (an op with no op inside
  it, view/metadata ops left out): on a GPU roughly one kernel launch each (a step of small
  batches is launch-bound: eager PyTorch spends ~2 us of host time per ATen call). On a GPU the
  CUDA kernels per step are counted too;
- the tensor elements the ATen leaf ops read per step and the heaviest of them (name and input
  shapes): a proxy for the memory traffic that bounds a large-batch step. Approximate: ``cat`` /
  ``stack`` inputs are not recorded (TensorList), in-place and ``out=`` variants count their
  destination, fbgemm (TBE) ops are left out;
- self time per embdim source line (``--stack``): the innermost frame in ``embedding_methods/``,
  ``trainer/``, ``sharding/`` or ``bench/`` of every op, so a hot spot points at our code;
- sync-like ops: ``item`` / ``_local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``),
  ``nonzero``, ``unique``, ``masked_select``, tensor-repeat ``repeat_interleave`` without
  ``output_size``, device-to-host copies, ``cuda*Synchronize`` runtime calls, with the embdim
  source line that issued them. On a GPU, ``--sync-debug`` additionally turns on
  ``torch.cuda.set_sync_debug_mode("warn")`` for the profiled steps and prints every distinct
  synchronising call site PyTorch reports.

A variant ``compact_pme`` needs the plan of a ``search_pme`` earlier in ``--variants`` (exported
after its steps, which must cover ``pme.saliency_batches``: pass e.g. ``--set pme.saliency_batches=4``).

Usage (GPU, the benchmark's setting)::

    python -m bench.profile_step --variants search_amtl --rows-per-table 1000000 --dim 128 \\
        --batch-size 8192 --set optim.sparse_optimizer=rowwise_adagrad --sync-debug --stack

CPU (small tables; op counts, elements read and sync-like ops are what carries over to a GPU)::

    python -m bench.profile_step --variants plain,search_amtl --rows-per-table 20000 --batch-size 2048

CPU caveats: CPU times are not GPU times (no caching allocator: a fresh tensor over glibc's mmap
threshold page-faults on first touch, so large batched tensors look slow; setting
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=100000000000`` helps below 32 MB), the
dense Adam runs per tensor on CPU (``foreach`` on CUDA: fewer ops there), and a CPU binary op on a
``bool`` operand first casts it (an extra ``copy_`` that CUDA does inside the kernel).
``--json FILE`` appends one summary line per variant for before/after comparisons.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

VIEW_OPS = frozenset({
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::t", "aten::transpose",
    "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::permute",
    "aten::alias", "aten::detach", "aten::detach_", "aten::empty", "aten::empty_strided", "aten::resize_",
    "aten::lift_fresh", "aten::_unsafe_view", "aten::unflatten", "aten::flatten", "aten::narrow", "aten::split",
    "aten::split_with_sizes", "aten::chunk", "aten::unbind", "aten::view_as", "aten::expand_as", "aten::numpy_T",
    "aten::contiguous", "aten::result_type", "aten::is_nonzero", "aten::_has_compatible_shallow_copy_type",
    "aten::set_", "aten::empty_like", "aten::to", "aten::type_as", "aten::_local_scalar_dense",
    "aten::item", "aten::record_stream", "aten::size", "aten::stride", "aten::dim", "aten::is_same_size",
    "aten::_nested_tensor_from_mask_left_aligned", "aten::sym_size", "aten::sym_stride", "aten::sym_numel",
    "aten::movedim", "aten::moveaxis", "aten::swapaxes", "aten::matrix_H", "aten::conj", "aten::resolve_conj",
    "aten::resolve_neg", "aten::_neg_view", "aten::_conj", "aten::real", "aten::imag",
})
"""Ops that launch no kernel (views, metadata, allocation); left out of the leaf-op count."""

SYNC_OPS = {
    "aten::_local_scalar_dense": "device -> host scalar (.item(), int(t), float(t), bool(t), t.tolist())",
    "aten::nonzero": "data-dependent output size (nonzero, boolean-mask indexing)",
    "aten::nonzero_static": None,  # fixed size: no sync
    "aten::masked_select": "data-dependent output size",
    "aten::_unique": "data-dependent output size", "aten::_unique2": "data-dependent output size",
    "aten::unique_dim": "data-dependent output size", "aten::unique_consecutive": "data-dependent output size",
    "aten::unique_dim_consecutive": "data-dependent output size",
    "aten::repeat_interleave": "output size from the repeats unless output_size is given",
    "aten::equal": "compares on the host", "aten::allclose": "compares on the host",
    "aten::is_nonzero": "bool(tensor) in a Python conditional",
}
RUNTIME_SYNC = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ")
OUR_DIRS = ("embedding_methods/", "trainer/", "sharding/", "bench/")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="search_amtl", help="comma-separated bench_gpu variants, in order")
    p.add_argument("--rows-per-table", type=int, default=20_000)
    p.add_argument("--cardinalities", default="", help="as bench_gpu --cardinalities")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2048, help="batch per rank")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--timed-steps", type=int, default=0,
                   help="also time this many steps without the profiler (bench_gpu's way) first")
    p.add_argument("--top", type=int, default=25, help="rows of the op table")
    p.add_argument("--by-shape", action="store_true", help="split the op table by input shapes")
    p.add_argument("--stack", action="store_true", help="attribute self time to embdim source lines")
    p.add_argument("--sync-debug", action="store_true", help="CUDA: torch.cuda.set_sync_debug_mode('warn')")
    p.add_argument("--trace", default="", help="write a Chrome trace per variant to this folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--out", default="/tmp/embdim_profile_step", help="dataset and run folders")
    p.add_argument("--json", default="", help="append one summary line per variant to this JSONL file")
    return p.parse_args(argv)


def _bench_args(args: argparse.Namespace) -> argparse.Namespace:
    from bench import bench_gpu

    argv = ["--rows-per-table", str(args.rows_per_table), "--dim", str(args.dim), "--budget", str(args.budget),
            "--batch-sizes", str(args.batch_size), "--out", args.out, "--skeleton-rows", "4000"]
    if args.cardinalities:
        argv += ["--cardinalities", args.cardinalities]
    for s in args.set:
        argv += ["--set", s]
    return bench_gpu._args(argv)


class _Locator:
    """Finds the embdim source line behind a profiler event.

    The profiler's Python tracer records frames as events (``path.py(line): function``) that are
    ancestors of the ops they call; the innermost embdim frame among an op's ancestors is its
    source line. Backward ops run under ``autograd::engine::evaluate_function: XBackward`` with
    the sequence number of the forward op that made the node, so they are charged to that
    forward op's line, prefixed ``bwd``.
    """

    def __init__(self, events: list[Any]) -> None:
        self._forward = {(e.thread, e.sequence_nr): e for e in events
                         if e.sequence_nr >= 0 and _is_op(e.name) and not e.name.startswith("autograd::")}
        self._cache: dict[int, str] = {}

    def __call__(self, event: Any, depth: int = 0) -> str:
        key = id(event)
        if key not in self._cache:
            self._cache[key] = self._find(event, depth)
        return self._cache[key]

    def _find(self, event: Any, depth: int) -> str:
        e = event
        while e is not None:
            name = e.name
            if ".py(" in name and any(d in name for d in OUR_DIRS) and \
                    "profile_step.py" not in name and "bench_gpu.py" not in name:
                return re.sub(r"^.*?((?:embedding_methods|trainer|sharding|bench)/)", r"\1", name)
            if name.startswith("autograd::engine::evaluate_function:") and e.sequence_nr >= 0 and depth < 2:
                forward = self._forward.get((e.fwd_thread, e.sequence_nr)) or \
                    self._forward.get((e.thread, e.sequence_nr))
                if forward is not None:
                    where = self(forward, depth + 1)
                    return where if where.startswith("bwd ") else f"bwd {where}"
            e = e.cpu_parent
        return "(torch / torchrec)"


def _is_op(name: str) -> bool:
    """A dispatcher op (``aten::``, ``fbgemm::``, ``c10d::``...), not a Python frame or a label."""
    return "::" in name and ".py(" not in name and not name.startswith(("<built-in", "## "))


def _is_leaf(event: Any) -> bool:
    """An op that does work itself: no op inside it, and not a view / metadata op."""
    return _is_op(event.name) and event.name not in VIEW_OPS and not any(_is_op(c.name) for c in event.cpu_children)


WRITE_ONLY_FIRST = frozenset({"aten::copy_", "aten::fill_", "aten::zero_", "aten::index_copy_", "aten::normal_",
                              "aten::uniform_", "aten::random_", "aten::bernoulli_"})


def _elements_read(event: Any) -> int:
    """Tensor elements an ATen leaf op reads (its tensor inputs, less the destination of a
    write-only in-place op; scalars and 0-dim tensors count 0): summed over a step, a proxy for
    the step's memory traffic outside the embedding kernels (fbgemm ops are left out: their
    recorded inputs are whole tables, not the rows they touch)."""
    if not event.name.startswith("aten::"):
        return 0
    shapes = [s for s in (event.input_shapes or ()) if isinstance(s, list)]
    if event.name in WRITE_ONLY_FIRST:
        shapes = shapes[1:]
    return sum(math.prod(s) for s in shapes if s and all(isinstance(d, int) for d in s))


def summarise(prof: Any, steps: int, cuda: bool) -> dict[str, Any]:
    """Counts and sync-like ops of a finished profile (per step)."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    aten = [e for e in events if e.name.startswith("aten::")]
    leaves = [e for e in events if _is_leaf(e)]
    where = _Locator(events)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    sync: collections.Counter = collections.Counter()
    for e in events:
        reason = SYNC_OPS.get(e.name)
        if e.name == "aten::repeat_interleave" and e.input_shapes and len(e.input_shapes) > 1 and \
                len(e.input_shapes[1]) == 0:
            reason = None  # integer repeats (no tensor): no sync  # noqa: E501
        if any(e.name.startswith(r) for r in RUNTIME_SYNC):
            reason = "CUDA runtime synchronisation"
        if reason:
            sync[(e.name, reason, where(e))] += 1
    leaf_names = collections.Counter(e.name for e in leaves)
    read = sum(_elements_read(e) for e in leaves)
    heavy: collections.Counter = collections.Counter()
    for e in leaves:
        heavy[f"{e.name.replace('aten::', '')} {e.input_shapes}"[:110]] += _elements_read(e)
    return {
        "aten_ops_per_step": len(aten) / steps,
        "leaf_ops_per_step": len(leaves) / steps,
        "cuda_kernels_per_step": len(kernels) / steps if cuda else None,
        "top_leaf_ops": [(n, c / steps) for n, c in leaf_names.most_common(15)],
        "leaf_input_melems_per_step": read / steps / 1e6,
        "heaviest_reads": [(k, v / steps / 1e6) for k, v in heavy.most_common(8) if v],
        "sync_like": [{"op": op, "why": why, "where": where, "per_step": c / steps}
                      for (op, why, where), c in sync.most_common()],
    }


def per_source_line(prof: Any, steps: int, cuda: bool, top: int) -> list[tuple[str, float, float]]:
    """``(embdim source line, self ms per step, leaf ops per step)`` of the heaviest lines."""
    time_by: collections.Counter = collections.Counter()
    ops_by: collections.Counter = collections.Counter()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    locate = _Locator(events)
    for e in events:
        if not _is_op(e.name):
            continue
        where = locate(e)
        time_by[where] += (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps
        if _is_leaf(e):
            ops_by[where] += 1 / steps
    return [(w, t, ops_by[w]) for w, t in time_by.most_common(top)]


def profile_variant(variant: str, args: argparse.Namespace, bargs: argparse.Namespace, env: Any,
                    state: dict, manifest: Any, data: Path) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from bench.bench_gpu import (_config, build_variant, export_plan, host_batches, make_features, needs_plan,
                                 run_steps, start_pipeline)

    config = _config(bargs, bargs.shardings.split(",")[0], variant)
    t0 = time.perf_counter()
    built = build_variant(variant, config, data, Path(args.out) / "runs" / variant, env, state)
    build_s = time.perf_counter() - t0
    feats = [make_features(manifest, args.batch_size, seed=i) for i in range(4)]
    batches, _ = host_batches(built, feats, args.batch_size)
    cuda = env.device.type == "cuda"
    pipeline = start_pipeline(built, env)
    stream = itertools.cycle(batches)
    run_steps(pipeline, stream, args.warmup, env)
    step_ms = None
    if args.timed_steps:
        step_ms = run_steps(pipeline, stream, args.timed_steps, env) / args.timed_steps * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync_warnings: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda and args.sync_debug:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with profile(activities=activities, record_shapes=True, with_stack=args.stack) as prof:
                run_steps(pipeline, stream, args.steps, env)
        finally:
            if cuda and args.sync_debug:
                torch.cuda.set_sync_debug_mode(0)
    for w in caught:  # sync-debug warnings point at the Python line that ran the synchronising op
        if "synchroniz" in str(w.message).lower():
            sync_warnings[(str(w.message).splitlines()[0][:100], f"{w.filename}:{w.lineno}")] += 1
    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(args.trace) / f"{variant}.json"))

    sparse = built.model.module.sparse_module if hasattr(built.model.module, "sparse_module") else None
    layout = ""
    if sparse is not None and hasattr(sparse, "inner_configs") and hasattr(sparse, "projection"):
        widths = collections.Counter(c.embedding_dim for c in sparse.inner_configs())
        groups = [] if sparse.projection is None else [(name, len(slots)) for name, slots in sparse.projection.groups()]
        layout = (f"; {len(sparse.inner_configs())} inner tables, widths {dict(sorted(widths.items()))}, "
                  f"layout {sparse.layout}, projection groups {groups}")
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"\n=== {variant}: batch {args.batch_size}, D {args.dim}, device {env.device}, {args.steps} profiled steps"
          + (f", {step_ms:.2f} ms/step unprofiled" if step_ms is not None else "") + layout + " ===", flush=True)
    from torch.autograd.profiler_util import EventList

    every = prof.key_averages(group_by_input_shape=args.by_shape)
    averages = EventList([e for e in every if _is_op(e.key)], use_device=getattr(every, "_use_device", None),
                         profile_memory=getattr(every, "_profile_memory", False))
    print(averages.table(sort_by=sort, row_limit=args.top, max_name_column_width=48,
                         max_shapes_column_width=60), flush=True)
    summary = summarise(prof, args.steps, cuda)
    total_ms = sum((e.self_device_time_total if cuda else e.self_cpu_time_total)
                   for e in averages) / 1e3 / args.steps
    kernels = f", {summary['cuda_kernels_per_step']:.0f} CUDA kernels" if cuda else ""
    print(f"ops per step: {summary['aten_ops_per_step']:.0f} ATen calls, {summary['leaf_ops_per_step']:.0f} leaf "
          f"(kernel-like) op calls, the ATen ones reading {summary['leaf_input_melems_per_step']:.1f} M tensor "
          f"elements{kernels}; profiled self time {total_ms:.1f} ms/step")
    print("most frequent leaf ops per step: " + ", ".join(f"{n.replace('aten::', '')} {c:.0f}"
                                                          for n, c in summary["top_leaf_ops"]))
    print("heaviest ATen leaf ops by elements read (M per step): " + "; ".join(
        f"{k} {v:.1f}" for k, v in summary["heaviest_reads"]))
    if summary["sync_like"]:
        print("sync-like ops (per step; the source line is the innermost embdim frame, with --stack):")
        for s in summary["sync_like"]:
            print(f"  {s['per_step']:6.1f} x {s['op']:<28} {s['where']}  [{s['why']}]")
    else:
        print("sync-like ops: none")
    if sync_warnings:
        print("torch.cuda sync-debug warnings:")
        for (msg, where), c in sync_warnings.most_common():
            print(f"  {c:5d} x {where}: {msg}")
    if args.stack:
        print("self time by embdim source line (ms/step, leaf ops/step):")
        for where, t, n in per_source_line(prof, args.steps, cuda, args.top):
            print(f"  {t:8.2f} ms {n:7.0f} ops  {where}")
    summary.update(variant=variant, batch_size=args.batch_size, dim=args.dim, device=str(env.device),
                   build_s=build_s, step_ms_unprofiled=step_ms, profiled_self_ms_per_step=total_ms)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(summary) + "\n")
    if needs_plan(variant, args.variants):
        state["plans"][variant[7:]] = export_plan(built, env)
    del pipeline, built
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    from bench.bench_gpu import ensure_dataset
    from embdim.trainer.data.manifest import load_manifest
    from embdim.sharding.distributed import destroy, init_distributed

    bargs = _bench_args(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    data = ensure_dataset(bargs)
    env = init_distributed()
    manifest = load_manifest(data)
    state: dict[str, Any] = {"plans": {}}
    try:
        for variant in args.variants.split(","):
            profile_variant(variant, args, bargs, env, state, manifest, data)
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
