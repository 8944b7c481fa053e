"""The ``export`` and ``generate`` subcommands, registered through the entry-point group
``somp_ref.commands``. Nothing here imports torch until a command runs, so ``somp-ref
--help`` works without the ``hf`` extra and these commands answer with the install line."""

from __future__ import annotations

import argparse
import sys
import textwrap

INSTALL_LINE = "this command needs the hf extra: pip install torch==2.13.0 'somp-ref[hf]'"


def _needs_torch(run):
    def wrapped(args: argparse.Namespace) -> int:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            print(f"somp-ref {args.command}: {INSTALL_LINE}", file=sys.stderr)
            return 1
        return run(args)

    return wrapped


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
    from adapters.export import export_activations
    from adapters.models import load_model
    from adapters.prompts import read_prompts

    records = read_prompts(args.prompts)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    export_activations(
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
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from adapters.generation import generate
    from adapters.intervene import scale_heads
    from adapters.models import load_model
    from somp_ref.heads import HeadScores, top_heads

    scores = HeadScores.from_csv(args.heads)
    heads = top_heads(scores, args.top)
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
            "Forward the prompts in batches with a pre-hook on every attention o_proj, keep "
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
    export.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
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
    gen.add_argument("--top", type=int, default=8, help="how many top heads (default 8)")
    gen.add_argument("--alpha", type=float, default=-1.0, help="scale factor (default -1)")
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument(
        "--raw", action="store_true", help="feed prompts as raw text, without the chat template"
    )
    gen.set_defaults(func=_needs_torch(_run_generate))
