"""``embdim data ...``: dataset converters and the synthetic generator.

``register(subparsers)`` adds the ``data`` command and its subcommands to the top-level parser;
every leaf subparser sets ``func=handler`` where ``handler(args) -> int``. Errors are raised
(``trainer.data.manifest.DatasetError`` / ``ValueError`` with file, column or line context) for
launch/main.py to turn into a message.
"""

from __future__ import annotations

import argparse
import sys

from embdim.trainer.data.writer import NEGATIVE_DENSE

DEFAULT_SPLIT = "0.8,0.1,0.1"


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return v


def _int_list(text: str) -> list[int]:
    try:
        values = [int(float(t)) for t in _csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _summary(out: str, manifest) -> str:
    rows = ", ".join(f"{name}={info.num_rows}" for name, info in manifest.splits.items())
    mh = sum(1 for f in manifest.sparse if f.multi_hot)
    fields = f"{len(manifest.dense)} dense, {len(manifest.sparse)} sparse" + (f" ({mh} multi-hot)" if mh else "")
    text = f"wrote {manifest.source or 'dataset'} dataset to {out}: rows {rows}; fields {fields}"
    clipped = manifest.extra.get("negative_dense_clipped") or {}
    if clipped:
        per_column = ", ".join(f"{c}: {n:,}" for c, n in clipped.items())
        text += (f"; clipped {sum(clipped.values()):,} negative dense values to 0 ({per_column}; "
                 f"--negative-dense signed-log keeps them, error refuses them)")
    return text


def _progress(args) -> bool:
    return not getattr(args, "no_progress", False)


def _synth(args) -> int:
    from embdim.trainer.data.synth import generate_synthetic

    m = generate_synthetic(
        args.out, num_rows=args.rows, seed=args.seed, preset=args.preset, num_files=args.num_files,
        workers=args.workers, row_group_size=args.row_group_size, cardinality_cap=args.cardinality_cap,
        multi_hot_fields=args.multi_hot_fields, cardinalities=args.cardinalities, progress=_progress(args),
        overwrite=args.overwrite,
    )
    print(_summary(args.out, m))
    return 0


def _criteo(args) -> int:
    from embdim.trainer.data.convert import convert_criteo

    m = convert_criteo(args.input, args.out, split=args.split, min_count=args.min_count,
                       row_group_size=args.row_group_size, progress=_progress(args), overwrite=args.overwrite,
                       negative_dense=args.negative_dense)
    print(_summary(args.out, m))
    return 0


def _avazu(args) -> int:
    from embdim.trainer.data.convert import convert_avazu

    m = convert_avazu(args.input, args.out, split=args.split, min_count=args.min_count,
                      row_group_size=args.row_group_size, progress=_progress(args), overwrite=args.overwrite)
    print(_summary(args.out, m))
    return 0


def _csv(args) -> int:
    from embdim.trainer.data.convert import convert_csv

    m = convert_csv(
        args.input, args.out, label=args.label, dense=args.dense, sparse=args.sparse,
        multi_hot=args.multi_hot, delimiter=args.delimiter, multi_hot_separator=args.multi_hot_separator,
        split=args.split, min_count=args.min_count, row_group_size=args.row_group_size,
        progress=_progress(args), overwrite=args.overwrite, negative_dense=args.negative_dense,
    )
    print(_summary(args.out, m))
    return 0


def _data_help(parser: argparse.ArgumentParser):
    def handler(args) -> int:
        parser.print_help(sys.stderr)
        return 2
    return handler


def _add_common(p: argparse.ArgumentParser, *, converter: bool, dense: bool = False) -> None:
    p.add_argument("--out", required=True, help="output dataset folder (built beside it, renamed at the end; "
                                                "one build at a time)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset that is already at --out")
    p.add_argument("--row-group-size", type=_positive_int, default=65536, help="rows per Parquet row group")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(interrupt_hint="nothing was written to --out; rerun the same command to build it")
    if dense:
        p.add_argument("--negative-dense", choices=list(NEGATIVE_DENSE), default="clip",
                       help="dense values below 0: clip = log(1 + max(x, 0)), i.e. 0, counted in the summary "
                            "(default, as the DLRM reference); signed-log = sign(x) log(1 + |x|); error = refuse them")
    if converter:
        p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                       help="input file(s), in order; text may be gzip/bz2/zstd-compressed (e.g. Criteo's day_N.gz)")
        p.add_argument("--split", default=DEFAULT_SPLIT,
                       help="train,valid,test fractions of the concatenated inputs (contiguous), "
                            "or 'files' with exactly 3 inputs (train valid test); default %(default)s")
        p.add_argument("--min-count", type=_positive_int, default=2,
                       help="values seen fewer times in the train split map to the OOV id 0 (default %(default)s)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``data {synth,criteo,avazu,csv}`` to the top-level subparsers."""
    data = subparsers.add_parser("data", help="build datasets (synthetic, Criteo, Avazu, generic CSV/Parquet)",
                                 description="Build embdim datasets: Parquet splits + dataset.json + id counts.")
    data.set_defaults(func=_data_help(data))
    sub = data.add_subparsers(dest="data_command", metavar="{synth,criteo,avazu,csv}")

    p = sub.add_parser("synth", help="generate a synthetic Criteo-shaped dataset with a planted model")
    _add_common(p, converter=False)
    p.add_argument("--rows", type=_positive_int, default=100_000, help="total rows (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="criteo", choices=["criteo", "criteo-1tb"],
                   help="cardinality profile of C1..C26: Criteo Kaggle (default) or Criteo 1TB")
    p.add_argument("--num-files", type=_positive_int, default=None, help="Parquet files in all (default: by rows)")
    p.add_argument("--workers", type=_positive_int, default=None, help="processes (default: CPU count)")
    p.add_argument("--cardinality-cap", type=_positive_int, default=None, help="maximum num_embeddings per field")
    p.add_argument("--multi-hot-fields", type=_nonneg_int, default=0, help="the last N sparse fields are multi-hot")
    p.add_argument("--cardinalities", type=_int_list, default=None, metavar="N,...",
                   help="ids per sparse field (overrides --preset and the scaling by --rows; up to 1e8 and more)")
    p.set_defaults(func=_synth)

    p = sub.add_parser("criteo", help="convert Criteo (Kaggle train.txt / 1TB day_N) tab-separated logs")
    _add_common(p, converter=True, dense=True)
    p.set_defaults(func=_criteo)

    p = sub.add_parser("avazu", help="convert Avazu CTR CSV logs (with header)")
    _add_common(p, converter=True)
    p.set_defaults(func=_avazu)

    p = sub.add_parser("csv", help="convert any CSV (with header) or Parquet file with declared columns")
    _add_common(p, converter=True, dense=True)
    p.add_argument("--label", required=True, help="label column (values 0/1)")
    p.add_argument("--dense", type=_csv_list, default=[], metavar="COL,...", help="dense columns, comma-separated")
    p.add_argument("--sparse", type=_csv_list, default=[], metavar="COL,...", help="single-hot categorical columns, comma-separated")
    p.add_argument("--multi-hot", type=_csv_list, default=[], metavar="COL,...", help="multi-hot categorical columns, comma-separated")
    p.add_argument("--delimiter", default=",", help="CSV field delimiter (default ','); '\\t' or 'tab' for a tab")
    p.add_argument("--multi-hot-separator", default="|", help="separator inside a multi-hot cell (default '|')")
    p.set_defaults(func=_csv)
