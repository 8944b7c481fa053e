"""The ``somp-ref`` command: one subcommand per stage.

The core registers its own subcommands here; ``adapters`` and ``verify`` contribute theirs
through the entry-point group ``somp_ref.commands`` (a callable taking the subparsers
object), so the core never imports them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from somp_ref import __version__

ENTRY_POINT_GROUP = "somp_ref.commands"


def _run_demo(args: argparse.Namespace) -> int:
    from somp_ref.demo import format_demo, planted_heads_demo

    rows = planted_heads_demo(n_atoms=args.atoms, seed=args.seed)
    print(format_demo(rows))
    top = {row.head for row in rows[: sum(row.planted for row in rows)]}
    found = top == {row.head for row in rows if row.planted}
    print(f"\nplanted heads ranked first: {'yes' if found else 'NO'}")
    return 0 if found else 1


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="synthetic check: SOMP ranks planted concept heads first",
        description=(
            "Build 12 synthetic heads, 3 of which write sparse combinations of a concept's "
            "tokens, run SOMP over the concept's atoms on each, and print the ranking. "
            "Exit status 1 if the planted heads are not ranked first."
        ),
    )
    parser.add_argument("--atoms", type=int, default=8, help="atoms per head (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.set_defaults(func=_run_demo)


def build_parser() -> argparse.ArgumentParser:
    """The full parser: core subcommands plus those registered by entry points."""
    parser = argparse.ArgumentParser(
        prog="somp-ref",
        description=(
            "Head Pursuit: find attention heads that write a concept (SOMP over unembedding "
            "rows) and steer them. Run 'somp-ref COMMAND --help' for each stage."
        ),
    )
    parser.add_argument("--version", action="version", version=f"somp-ref {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(subparsers)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run one subcommand; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
