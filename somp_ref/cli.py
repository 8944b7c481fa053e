"""The ``somp-ref`` command: one subcommand per stage.

The core registers its own subcommands here; ``adapters`` and ``verify`` contribute theirs
through the entry-point group ``somp_ref.commands`` (a callable taking the subparsers
object), so the core never imports them.

Every expected failure is one line on stderr and exit status 2: usage errors (argparse,
with the type functions below), and the :data:`EXPECTED_ERRORS` a command raises (bad or
missing files, a bad store, a full disk, a missing extra, a model that cannot be loaded).
Anything else is a bug and keeps its traceback. A command's own "no" (``demo``'s planted
heads not found, ``verify``'s failed check) is a result: exit status 1.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import NoReturn

from somp_ref import __version__
from somp_ref.errors import UserError

ENTRY_POINT_GROUP = "somp_ref.commands"
USAGE_ERROR = 2

#: What a command may raise for bad input or a broken environment. OSError covers missing
#: files, directories where files belong, permissions and a full disk; ValueError covers
#: malformed user files (their readers name the file) and out-of-range values; ImportError
#: a missing extra (or a --port module); UserError subclasses are declared by the modules
#: that raise them (``StoreError``, ``InputTypeError``, the adapters' ``ModelLoadError``).
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    OSError,
    ValueError,
    ImportError,
)


def one_line(text: str) -> str:
    """``text`` with its line breaks (and the blanks around them) folded into spaces."""
    return re.sub(r"\s*[\r\n]+\s*", " ", text.strip())


def describe(err: BaseException) -> str:
    """The one-line message of an expected error; an OSError names its file first."""
    if isinstance(err, OSError) and err.strerror:
        names = [str(name) for name in (err.filename, err.filename2) if name is not None]
        text = f"{' -> '.join(names)}: {err.strerror}" if names else err.strerror
    else:
        text = str(err) or type(err).__name__
    return one_line(text)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (exit status 2, as argparse's)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {one_line(message)} (see {self.prog} -h)\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


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
    parser.add_argument("--atoms", type=positive_int, default=8, help="atoms per head (default 8)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    parser.set_defaults(func=_run_demo)


def layer_list(text: str) -> list[int]:
    """An argparse type: layers as '0,1,5-7' -> [0, 1, 5, 6, 7] (0-based, ranges inclusive)."""
    layers: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not (first.isdigit() and (last.isdigit() or not dash)):
            raise argparse.ArgumentTypeError(
                f"layers are 0-based numbers or ranges like 0,1,5-7, got {text!r}"
            )
        low, high = int(first), int(last or first)
        if high < low:
            raise argparse.ArgumentTypeError(f"the range {part.strip()!r} is empty")
        layers += range(low, high + 1)
    return layers


def _parse_head(text: str) -> tuple[int, int]:
    layer, sep, head = text.partition(".")
    if not (sep and layer.isdigit() and head.isdigit()):
        raise argparse.ArgumentTypeError(f"a head is LAYER.HEAD, e.g. 12.3, got {text!r}")
    return int(layer), int(head)


def _run_rank(args: argparse.Namespace) -> int:
    from somp_ref.concepts import load_concept, store_concept_ids
    from somp_ref.files import check_output_file
    from somp_ref.heads import format_top_heads, rank_heads
    from somp_ref.store import ActivationStore

    # Everything cheap first: a bad output path must not cost a ranking.
    for path in filter(None, (args.out, args.json)):
        check_output_file(path)
    if args.plot:
        from somp_ref.plots import check_plot_file

        check_plot_file(args.plot)
    load_concept(args.concept)
    store = ActivationStore.open(args.store)
    concept = store_concept_ids(store.vocab(), args.concept)
    print(f"concept {args.concept}: {concept.report()}", file=sys.stderr)
    scores = rank_heads(
        store,
        concept.ids,
        args.atoms,
        args.method,
        criterion=args.criterion,
        exclude_layers=args.exclude_layers,
    )
    scores.to_csv(args.out)
    if args.json:
        scores.to_json(args.json)
    print(format_top_heads(scores, args.show))
    print(f"\nwrote {args.out}" + (f" and {args.json}" if args.json else ""))
    if args.plot:
        from somp_ref.plots import head_heatmap

        head_heatmap(
            scores.score,
            args.plot,
            title=f"{args.concept}: {args.method} ({args.atoms} atoms)",
        )
        print(f"wrote {args.plot}")
    return 0


def _add_rank(subparsers) -> None:
    parser = subparsers.add_parser(
        "rank",
        help="rank a store's heads by how well a concept's tokens explain them",
        description=(
            "Score every head of an activation store: SOMP over the concept's unembedding "
            "rows (explained variance after --atoms atoms) or the Logit Lens head score. "
            "Writes one CSV row per head, best first."
        ),
        epilog="example: somp-ref rank runs/colors --concept colors --out colors.csv",
    )
    parser.add_argument("store", help="activation store directory (from 'somp-ref export')")
    parser.add_argument(
        "--concept",
        required=True,
        help="a shipped concept (colors, countries, capitals, numbers, months, "
        "positive, negative, toxic, animals) or a file with one word a line",
    )
    parser.add_argument(
        "--atoms", type=positive_int, default=50, help="SOMP atoms per head (default 50)"
    )
    parser.add_argument(
        "--method",
        choices=("somp", "ll"),
        default="somp",
        help="somp (default) or ll, the Logit Lens baseline",
    )
    parser.add_argument(
        "--criterion",
        choices=("l1", "l2"),
        default="l1",
        help="norm across samples in SOMP's atom score (default l1)",
    )
    parser.add_argument(
        "--exclude-layers",
        type=layer_list,
        default=[],
        metavar="LAYERS",
        help="layers to skip, e.g. 0 or 0,1 or 0-2",
    )
    parser.add_argument("--out", required=True, help="CSV to write (one row per head)")
    parser.add_argument("--json", help="also write the full scores as JSON")
    parser.add_argument("--plot", help="also write a layer x head heatmap (PNG; needs matplotlib)")
    parser.add_argument("--show", type=positive_int, default=10, help="heads to print (default 10)")
    parser.set_defaults(func=_run_rank)


def _run_inspect(args: argparse.Namespace) -> int:
    from somp_ref.heads import head_signature
    from somp_ref.store import ActivationStore

    store = ActivationStore.open(args.store)
    if args.head is None:
        print(store.summary())
        return 0
    layer, head = args.head
    rows = head_signature(store, layer, head, args.top)
    print(f"head {layer}.{head}: SOMP signature over the whole vocabulary")
    print(f"{'step':>4}  {'token':<20} {'EV added':>9}  {'EV total':>8}")
    total = 0.0
    for step, (_, text, gain) in enumerate(rows, start=1):
        total += gain
        print(f"{step:>4}  {text!r:<20} {gain:>9.4f}  {total:>8.4f}")
    return 0


def _add_inspect(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="summarise a store, or show one head's SOMP signature",
        description=(
            "Without --head: the store's shapes, model and sample count. With --head L.H: "
            "the tokens SOMP selects for that head over the whole vocabulary, with the "
            "explained variance each adds (the paper's head-signature tables)."
        ),
        epilog="example: somp-ref inspect runs/colors --head 12.3 --top 20",
    )
    parser.add_argument("store", help="activation store directory")
    parser.add_argument("--head", type=_parse_head, help="LAYER.HEAD, 0-based, e.g. 12.3")
    parser.add_argument("--top", type=positive_int, default=20, help="atoms to show (default 20)")
    parser.set_defaults(func=_run_inspect)


def build_parser() -> argparse.ArgumentParser:
    """The full parser: core subcommands plus those registered by entry points."""
    parser = _Parser(
        prog="somp-ref",
        description=(
            "Head Pursuit: find attention heads that write a concept (SOMP over unembedding "
            "rows) and steer them. Run 'somp-ref COMMAND --help' for each stage."
        ),
    )
    parser.add_argument("--version", action="version", version=f"somp-ref {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(subparsers)
    _add_rank(subparsers)
    _add_inspect(subparsers)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run one subcommand; returns the exit status (2: a usage error or
    an expected failure, reported on one line of stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USAGE_ERROR
    try:
        return int(args.func(args) or 0)
    except EXPECTED_ERRORS as err:
        print(f"somp-ref {args.command}: error: {describe(err)}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
