"""The ``export``, ``generate`` and ``experiment`` subcommands, registered through the
entry-point group ``somp_ref.commands``. Nothing here imports torch until a model loads, so
``somp-ref --help`` works without the ``hf`` extra, these commands answer with the install
line, and bad arguments (files, numbers, output paths) are reported before a model loads.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import textwrap
from collections.abc import Callable
from pathlib import Path

from somp_ref.cli import int_at_least, layer_list, non_negative_int, positive_int

INSTALL_LINE = "this command needs the hf extra: pip install torch==2.13.0 'somp-ref[hf]'"


def _needs_torch(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapped(args: argparse.Namespace) -> int:
        # find_spec, not import: importing torch takes seconds, and the checks that come
        # before the model loads should answer at once.
        if not all(importlib.util.find_spec(name) for name in ("torch", "transformers")):
            raise ImportError(INSTALL_LINE)
        return run(args)

    return wrapped


def _check_store_target(out: str, overwrite: bool) -> None:
    """Raise before the model loads if ``export`` could not create its store at ``out``
    (the same rules as :meth:`somp_ref.store.ActivationStore.create`)."""
    from somp_ref.files import check_output_dir
    from somp_ref.store import META_FILE, StoreError

    path = check_output_dir(out)
    if not path.exists():
        return
    if not overwrite:
        raise FileExistsError(errno.EEXIST, "already exists (pass --overwrite to replace it)", out)
    if any(path.iterdir()) and not (path / META_FILE).is_file():
        raise StoreError(f"{out} exists and is not a store: refusing to overwrite it")


def _check_model(name: str) -> None:
    """Raise for a local model path that does not exist, before torch is imported."""
    from somp_ref.adapters.models import DEFAULT_MODEL, local_checkpoint

    if name != DEFAULT_MODEL:
        local_checkpoint(name)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (the embedded SmolLM2-135M-Instruct, offline), a local "
        "checkpoint directory, or a hub id",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16", "bfloat16", "float64"),
        help="model weights dtype (default float32)",
    )


def _run_export(args: argparse.Namespace) -> int:
    from somp_ref.adapters.prompts import read_prompts
    from somp_ref.concepts import load_concept
    from somp_ref.files import check_output_file

    records = read_prompts(args.prompts)
    _check_store_target(args.out, args.overwrite)
    rank_out = None
    if args.rank:
        load_concept(args.rank)
        rank_out = check_output_file(args.rank_out or f"{args.out}-{Path(args.rank).stem}.csv")
    _check_model(args.model)
    from somp_ref.adapters.export import export_activations  # imports torch: after the checks
    from somp_ref.adapters.models import load_model

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    store = export_activations(
        model,
        tokenizer,
        records,
        args.out,
        positions=args.positions,
        batch_size=args.batch_size,
        chat_template=args.chat_template,
        dtype=args.store_dtype,
        overwrite=args.overwrite,
    )
    if args.rank:
        from somp_ref.heads import format_top_heads, rank

        scores = rank(
            store, args.rank, method="somp", n_atoms=args.atoms, engine="torch", device=args.device
        )
        scores.to_csv(rank_out)
        print(format_top_heads(scores))
        print(f"wrote {rank_out}")
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from somp_ref.heads import HeadScores, top_heads

    scores = HeadScores.from_csv(args.heads)
    heads = top_heads(scores, args.top)
    _check_model(args.model)
    from somp_ref.adapters.generation import generate  # imports torch: after the checks
    from somp_ref.adapters.intervene import scale_heads
    from somp_ref.adapters.models import load_model

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    options = {"max_new_tokens": args.max_new_tokens, "chat_template": not args.raw}
    baseline = generate(model, tokenizer, args.prompts, **options)
    with scale_heads(model, {head: args.alpha for head in heads}):
        steered = generate(model, tokenizer, args.prompts, **options)
    print(
        f"heads ({len(heads)}, alpha {args.alpha:g}): "
        + " ".join(f"{layer}.{head}" for layer, head in heads)
    )
    width = 48
    for prompt, before, after in zip(args.prompts, baseline, steered, strict=True):
        print(f"\n> {prompt}")
        print(f"{'baseline':<{width}} | alpha={args.alpha:g}")
        left = textwrap.wrap(before.strip(), width) or [""]
        right = textwrap.wrap(after.strip(), width) or [""]
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            print(f"{a:<{width}} | {b}")
    return 0


def register(subparsers) -> None:
    """Add ``export`` and ``generate`` to the ``somp-ref`` command."""
    export = subparsers.add_parser(
        "export",
        help="run prompts through a model and store what every head writes",
        description=(
            "Forward the prompts in batches with a hook on every attention o_proj, keep "
            "each head's output (hook_z) at the chosen positions, and write an activation "
            "store with the o_proj weights, the unembedding, the final norm and the "
            "vocabulary. Results do not depend on batch size or padding."
        ),
        epilog="example: somp-ref export --model default --prompts builtin:colors "
        "--out runs/colors",
    )
    _add_model_options(export)
    export.add_argument(
        "--prompts",
        required=True,
        help="builtin:colors | builtin:neutral | a .txt file (one prompt a "
        "line) | a .jsonl file (records with a 'prompt' field)",
    )
    export.add_argument(
        "--positions",
        choices=("last", "all", "mean"),
        default="last",
        help="which tokens become rows: the last prompt token (default), all tokens, or their mean",
    )
    export.add_argument("--out", required=True, help="store directory to create")
    export.add_argument(
        "--batch-size", type=positive_int, default=8, help="prompts per forward pass"
    )
    export.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap each prompt as a user turn of the chat template",
    )
    export.add_argument(
        "--store-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="how z is stored (default float32)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing store")
    export.add_argument(
        "--rank",
        metavar="CONCEPT",
        help="also rank the heads for this concept with the torch port of "
        "SOMP on --device (GPU ranking), writing --rank-out",
    )
    export.add_argument("--rank-out", help="CSV for --rank (default STORE-CONCEPT.csv)")
    export.add_argument("--atoms", type=positive_int, default=50, help="SOMP atoms for --rank")
    export.set_defaults(func=_needs_torch(_run_export))

    gen = subparsers.add_parser(
        "generate",
        help="greedy generation with the top-k heads of a ranking scaled by alpha",
        description=(
            "Generate greedily twice, without and with the top --top heads of a ranking "
            "(CSV from 'somp-ref rank') scaled by --alpha, and print both side by side. "
            "alpha=-1 flips the heads (suppresses their concept), 0 ablates them, 5 "
            "amplifies them."
        ),
        epilog="example: somp-ref generate --heads colors.csv --top 8 --alpha -1 "
        "'Describe the color of a ripe banana.'",
    )
    _add_model_options(gen)
    gen.add_argument("prompts", nargs="+", help="one or more prompts")
    gen.add_argument("--heads", required=True, help="ranking CSV from 'somp-ref rank'")
    gen.add_argument("--top", type=positive_int, default=8, help="how many top heads (default 8)")
    gen.add_argument("--alpha", type=float, default=-1.0, help="scale factor (default -1)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=40)
    gen.add_argument(
        "--raw", action="store_true", help="feed prompts as raw text, without the chat template"
    )
    gen.set_defaults(func=_needs_torch(_run_generate))
    register_experiment(subparsers)


def _run_experiment(args: argparse.Namespace) -> int:
    from somp_ref.adapters.tasks import TASK_NAMES
    from somp_ref.files import check_output_dir

    check_output_dir(args.out)
    _check_model(args.model)
    from somp_ref.adapters.experiment import (  # imports torch: after the checks
        Settings,
        run_experiments,
    )
    from somp_ref.adapters.report import write_report

    names = list(TASK_NAMES) if args.names == ["all"] else args.names
    settings = Settings(
        heads=tuple(args.heads),
        alpha=args.alpha,
        seeds=args.seeds,
        rank=args.rank,
        exclude_layers=tuple(args.exclude_layers),
        atoms=args.atoms,
        n_null=args.null,
        n_train=args.train,
        n_test=args.test,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        model=args.model,
    )
    out = Path(args.out)
    text = write_report(run_experiments(names, settings, out), out)
    print(text)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and a plot per experiment")
    return 0


def _head_counts(text: str) -> list[int]:
    """'3,8,16' -> [3, 8, 16]: values of k, each >= 1."""
    parts = text.split(",")
    if not all(part.strip().isdigit() and int(part) >= 1 for part in parts):
        raise argparse.ArgumentTypeError(f"expected integers >= 1 like 3,8,16, got {text!r}")
    return [int(part) for part in parts]


def register_experiment(subparsers) -> None:
    """Add ``experiment`` to the ``somp-ref`` command."""
    from somp_ref.adapters.tasks import TASK_NAMES

    parser = subparsers.add_parser(
        "experiment",
        help="the paper's protocol end to end: export, rank, intervene, evaluate",
        description=(
            "Export the train prompts, rank heads (SOMP specificity or raw explained "
            "variance, and the Logit Lens), then for each k scale the top-k heads by alpha "
            "(and random heads with the same count per layer, over several seeds) and "
            "evaluate on disjoint test prompts: the target effect next to collateral damage "
            "(KL on neutral prompts, degenerate answers). Greedy decoding, fixed seeds."
        ),
        epilog="experiments: " + ", ".join(TASK_NAMES) + ", or all. "
        "example: somp-ref experiment colors --out runs/colors",
    )
    parser.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        choices=[*TASK_NAMES, "all"],
        help="experiment(s) to run",
    )
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (embedded SmolLM2), a local checkpoint, or a hub id",
    )
    parser.add_argument(
        "--heads",
        type=_head_counts,
        default=[3, 8, 16],
        help="values of k, comma-separated (default 3,8,16)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="scale of the selected heads (default: -1; 5 for amplification)",
    )
    parser.add_argument(
        "--seeds", type=non_negative_int, default=5, help="random-head seeds (default 5)"
    )
    parser.add_argument(
        "--rank",
        choices=("specificity", "somp", "ll"),
        default="specificity",
        help="how the main column's heads are ranked: SOMP specificity "
        "(z-score against random token dictionaries, default), raw SOMP "
        "explained variance, or the Logit Lens",
    )
    parser.add_argument(
        "--exclude-layers",
        type=layer_list,
        default=[],
        metavar="LAYERS",
        help="layers never selected, e.g. 0 or 0,1 or 0-2",
    )
    parser.add_argument(
        "--atoms", type=positive_int, default=20, help="SOMP atoms per head (default 20)"
    )
    parser.add_argument(
        "--null",
        type=int_at_least(2),
        default=6,
        help="random dictionaries for the specificity score (default 6)",
    )
    parser.add_argument("--train", type=positive_int, default=64, help="train prompts (default 64)")
    parser.add_argument("--test", type=positive_int, default=24, help="test prompts (default 24)")
    parser.add_argument("--batch-size", type=positive_int, default=24)
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help="tokens generated per answer (default: 24, or 8 for QA)",
    )
    parser.add_argument("--out", default="runs/experiment", help="output directory")
    parser.set_defaults(func=_needs_torch(_run_experiment))
