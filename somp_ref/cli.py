"""The ``somp-ref`` command: one subcommand per stage.

The core registers its own subcommands here; ``adapters`` and ``verify`` contribute theirs
through the entry-point group ``somp_ref.commands`` (a callable taking the subparsers
object), so the core never imports them. Options more than one subcommand takes are
defined once, in :mod:`somp_ref.cli_options`: a flag name has one meaning everywhere; the
values they take are parsed by the types of :mod:`somp_ref.cli_types`.

Every expected failure is one line on stderr and exit status 2: usage errors (argparse,
with the types of :mod:`somp_ref.cli_types`), and the :data:`EXPECTED_ERRORS` a command
raises (bad or missing files, a bad store, a full disk, a missing extra, a model that
cannot be loaded).
Two resource limits are reported the same way: Ctrl-C is one line, "interrupted", with exit
status 130, and running out of memory (a store larger than RAM) one line, "out of memory".
Output read by a process that stops reading (``| head``) ends the command quietly, with
the shell's status for SIGPIPE, 141.
Anything else is a bug and keeps its traceback. A command's own "no" (``demo``'s planted
heads not found, ``verify``'s failed check) is a result: exit status 1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import NoReturn

from somp_ref import __version__
from somp_ref.cli_options import (
    add_atoms,
    add_out,
    add_rank_engine,
    add_ranking,
    add_seed,
    check_layer_flags,
    check_some_layer_left,
    rank_engine_options,
    ranking_options,
    renamed,
)
from somp_ref.cli_types import (  # noqa: F401  (the types stay importable from here)
    head_spec,
    int_at_least,
    layer_list,
    non_negative_int,
    positive_int,
)
from somp_ref.errors import UserError
from somp_ref.store_commands import register as register_store

ENTRY_POINT_GROUP = "somp_ref.commands"
USAGE_ERROR = 2
#: The shell's status for a command ended by SIGINT (128 + 2): Ctrl-C.
INTERRUPTED = 130
#: ... and by SIGPIPE (128 + 13): the reader of its output went away (``| head``).
OUTPUT_CLOSED = 141

#: What a command may raise for bad input or a broken environment. OSError covers missing
#: files, directories where files belong, permissions and a full disk; ValueError covers
#: malformed user files (their readers name the file) and out-of-range values;
#: ModuleNotFoundError a package that is not installed; UserError subclasses are declared by
#: the modules that raise them (``StoreError``, ``InputTypeError``, ``MissingExtraError``,
#: the adapters' ``ModelLoadError``). Any other ImportError ("cannot import name") is a bug
#: in the installed code and keeps its traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    OSError,
    ValueError,
    ModuleNotFoundError,
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


class _CommandParser(_Parser):
    """A subcommand's parser. Flags are never abbreviated (one spelling, one meaning), and
    an argument it does not know is its own error, naming the subcommand and, for a flag it
    used to take under another name (:func:`somp_ref.cli_options.renamed`), the new one."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            message = f"unrecognized arguments: {' '.join(extras)}"
            moves = getattr(self, "renamed_flags", {})
            hints = [
                f"{flag} is now {moves[flag]}"
                for flag in dict.fromkeys(word.partition("=")[0] for word in extras)
                if flag in moves
            ]
            self.error(message + (f" ({'; '.join(hints)})" if hints else ""))
        return namespace, extras


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
            "40 tokens, run SOMP over the concept's atoms on each, and print the ranking "
            "(writes no file). Exit status 1 if the planted heads are not ranked first."
        ),
        epilog="example: somp-ref demo --atoms 8 --seed 1",
    )
    add_atoms(parser)
    add_seed(parser, "seed drawing the synthetic heads")
    parser.set_defaults(func=_run_demo)


def _run_rank(args: argparse.Namespace) -> int:
    from somp_ref.concepts import load_concept, store_concept_ids
    from somp_ref.files import (
        check_distinct_outputs,
        check_output_file,
        check_outside,
        write_all_atomically,
    )
    from somp_ref.head_scores import format_top_heads
    from somp_ref.ranking import rank_heads
    from somp_ref.store import ActivationStore

    # Everything cheap first: a bad output path must not cost a ranking.
    outputs = {"--out": args.out, "--json-out": args.json_out, "--plot": args.plot}
    for flag, path in outputs.items():
        if path is not None:
            check_outside(flag, path, args.store, f"the store {args.store}")
            check_output_file(path)
    check_distinct_outputs(outputs)
    if args.plot is not None:
        from somp_ref.plots import check_plot_file

        check_plot_file(args.plot)
    check_some_layer_left(args)
    load_concept(args.concept)
    store = ActivationStore.open(args.store)
    check_layer_flags(args, store.n_layers, "the store")
    ranked = set(range(store.n_layers) if args.layers is None else args.layers)
    ranked -= set(args.exclude_layers)
    layer_values = (store.n_samples or 0) * store.n_heads * store.d_head
    engine = rank_engine_options(args, len(ranked), layer_values)
    if args.method != "ll":  # a bad engine, device or extra: before the concept is read
        from somp_ref.engines import load_engine

        load_engine(engine.get("engine", "numpy"), engine.get("device"))
    concept = store_concept_ids(store.vocab(), args.concept)
    print(f"concept {args.concept}: {concept.report()}")
    scores = rank_heads(store, concept.ids, **ranking_options(args), **engine)
    scores = scores.with_source(concept=args.concept)
    # All outputs or none: a failure (a full disk) leaves every previous file as it was.
    writes = [(args.out, scores.to_csv)]
    if args.json_out is not None:
        writes.append((args.json_out, scores.to_json))
    if args.plot is not None:
        from somp_ref.plots import head_heatmap

        title = f"{args.concept}: {args.method} ({args.atoms} atoms)"
        writes.append((args.plot, lambda path: head_heatmap(scores.score, path, title=title)))
    write_all_atomically(writes)
    print(format_top_heads(scores, args.show))
    print("\nwrote " + ", ".join(str(path) for path, _ in writes))
    return 0


def _add_rank(subparsers) -> None:
    parser = subparsers.add_parser(
        "rank",
        help="rank a store's heads by how well a concept's tokens explain them",
        description=(
            "Score every head of an activation store for a concept: SOMP over the concept's "
            "unembedding rows (explained variance after --atoms atoms: raw, the paper's; "
            "or compared with null dictionaries, which keeps heads that merely copy any "
            "token out of the top) or the Logit Lens. Writes --out (CSV, one row per head, "
            "best first), --json-out (every score and support) and --plot (a layer x head "
            "heatmap) when given, and prints the --show best heads. --engine, --device and "
            "--workers choose who ranks (numpy in --workers processes, or torch on a "
            "device); the scores do not depend on them beyond float64 rounding."
        ),
        epilog="example: somp-ref rank runs/colors --concept colors --out colors.csv "
        "--plot colors.png",
    )
    parser.add_argument("store", help="activation store directory (from 'somp-ref export')")
    parser.add_argument(
        "--concept",
        required=True,
        help="a shipped concept (colors, countries, capitals, numbers, months, positive, "
        "negative, toxic, animals) or a file with one word a line (required)",
    )
    add_ranking(parser)
    add_rank_engine(parser)
    add_out(parser, "ranking CSV to write, one row per head, best first (required)")
    parser.add_argument(
        "--json-out",
        metavar="PATH",
        help="also write every score and support as JSON (default: no JSON)",
    )
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help="also write a layer x head heatmap, PNG (needs matplotlib) (default: no plot)",
    )
    parser.add_argument(
        "--show", type=positive_int, default=10, metavar="N", help="heads to print (default: 10)"
    )
    renamed(parser, {"--json": "--json-out"})
    parser.set_defaults(func=_run_rank)


def _run_inspect(args: argparse.Namespace) -> int:
    from somp_ref.ranking import head_signature
    from somp_ref.store import ActivationStore

    store = ActivationStore.open(args.store)
    if args.head is None:
        print(store.summary())
        return 0
    layer, head = args.head
    rows = head_signature(store, layer, head, args.atoms)
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
            "explained variance each adds (the paper's head-signature tables). Prints only; "
            "writes no file."
        ),
        epilog="example: somp-ref inspect runs/colors --head 12.3 --atoms 20",
    )
    parser.add_argument("store", help="activation store directory")
    parser.add_argument(
        "--head",
        type=head_spec,
        metavar="L.H",
        help="LAYER.HEAD, 0-based, e.g. 12.3 (default: summarise the store)",
    )
    add_atoms(parser, "tokens in the signature: SOMP atoms over the whole vocabulary")
    renamed(parser, {"--top": "--atoms"})
    parser.set_defaults(func=_run_inspect)


def build_parser() -> argparse.ArgumentParser:
    """The full parser: core subcommands plus those registered by entry points."""
    parser = _Parser(
        prog="somp-ref",
        description=(
            "Head Pursuit: find attention heads that write a concept (SOMP over unembedding "
            "rows) and steer them. Run 'somp-ref COMMAND --help' for each stage."
        ),
        epilog="example: somp-ref experiment colors (the paper's protocol end to end); "
        "somp-ref demo (a synthetic check, seconds)",
    )
    parser.add_argument("--version", action="version", version=f"somp-ref {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_CommandParser
    )
    _add_demo(subparsers)
    _add_rank(subparsers)
    _add_inspect(subparsers)
    register_store(subparsers)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()(subparsers)
    return parser


def _never_fail_on_encoding() -> None:
    """Let stdout and stderr print any text: a character their encoding lacks (a token of
    another script under ``PYTHONIOENCODING=ascii``, a lone surrogate) is written as a
    backslash escape instead of failing the command after its work is done."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a closed or detached stream: nothing to print to
                pass


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):  # no real file behind sys.stdout
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run one subcommand; returns the exit status (2: a usage error or
    an expected failure, reported on one line of stderr; 130: interrupted, Ctrl-C)."""
    _never_fail_on_encoding()
    prog = "somp-ref"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()  # what a user typing the bare command wants to see
            return USAGE_ERROR
        # The words the user typed, as argparse names them in usage errors ("store merge").
        action = getattr(args, "action", None)  # a command's own subcommand
        prog = f"somp-ref {args.command}" + (f" {action}" if action else "")
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # The reader stopped reading (``somp-ref compare A B | head``): nothing is wrong
        # and nothing more can be said, as any Unix tool. Python would fail again flushing
        # stdout at exit: point it at /dev/null first.
        _silence_stdout()
        return OUTPUT_CLOSED
    except MemoryError as err:  # a resource limit (a store larger than memory), not a bug
        detail = describe(err) if str(err) else ""
        print(f"{prog}: error: out of memory" + (f": {detail}" if detail else ""), file=sys.stderr)
        return USAGE_ERROR
    except EXPECTED_ERRORS as err:
        print(f"{prog}: error: {describe(err)}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
