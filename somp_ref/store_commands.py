"""The ``store`` subcommand: operations on activation stores (``store merge``)."""

from __future__ import annotations

import argparse

from somp_ref.cli_options import add_out, add_overwrite


def _run_merge(args: argparse.Namespace) -> int:
    from somp_ref.files import check_output_dir, check_outside
    from somp_ref.store.merging import merge_stores

    check_output_dir(args.out)
    for shard in args.shards:  # inside an input, the output would become part of it
        check_outside("--out", args.out, shard, f"the input store {shard}")
    store = merge_stores(args.shards, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {store.n_samples} rows from {len(args.shards)} stores")
    return 0


def register(subparsers) -> None:
    """Add ``store`` (with ``store merge``) to the ``somp-ref`` command."""
    parser = subparsers.add_parser(
        "store",
        help="operations on activation stores: merge the shards of an export",
        description="Operations on activation stores. Run 'somp-ref store merge --help'.",
        epilog="example: somp-ref store merge runs/a runs/b --out runs/ab",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    merge = actions.add_parser(
        "merge",
        help="write several stores' rows, in order, as one store",
        description=(
            "Copy the rows of the given stores, in the order given, into one new store "
            "--out, a chunk at a time (memory stays at one chunk). They must be exports of "
            "the same model with the same rule: same shapes, dtype, facts, unembedding and "
            "weights (checked; what differs is named). The shards of a data-parallel export "
            "(OUT.shard-R-of-W) are merged by its first process already; this command "
            "merges them when that process could not, or joins separate exports."
        ),
        epilog="example: somp-ref store merge runs/big.shard-000-of-002 "
        "runs/big.shard-001-of-002 --out runs/big",
    )
    merge.add_argument("shards", nargs="+", metavar="STORE", help="complete stores, in order")
    add_out(merge, "the merged store to create (required)")
    add_overwrite(merge)
    merge.set_defaults(func=_run_merge)
