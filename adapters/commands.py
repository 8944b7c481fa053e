"""The ``export`` and ``generate`` subcommands, registered through the entry-point group
``somp_ref.commands`` (``experiment`` and ``compare`` are in
:mod:`somp_ref.adapters.experiment_commands`). Nothing here imports torch until a model
loads, so ``somp-ref --help`` works without the ``hf`` extra, these commands answer with the
install line, and bad arguments (files, numbers, output paths) are reported before a model
loads.
Their shared flags come from :mod:`somp_ref.cli_options`, as the core commands' do.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from somp_ref.adapters.preflight import (
    check_device,
    check_device_map,
    check_layers,
    check_model,
    check_store_target,
    load,
    needs_torch,
    read_ranking,
)
from somp_ref.cli_options import (
    add_alpha,
    add_batch_size,
    add_chat_template,
    add_heads_selection,
    add_intervene_positions,
    add_max_new_tokens,
    add_model_loading,
    add_out,
    add_overwrite,
    add_positions,
    add_ranking,
    check_some_layer_left,
    ranking_options,
    renamed,
)


def _run_export(args: argparse.Namespace) -> int:
    from somp_ref.adapters.prompts import read_prompts
    from somp_ref.concepts import load_concept
    from somp_ref.files import check_output_file, check_outside, write_all_atomically

    records = read_prompts(args.prompts)
    if args.resume and args.overwrite:
        raise ValueError("give --resume or --overwrite, not both")
    if not args.resume:
        check_store_target(args.out, args.overwrite)
    rank_out = None
    if args.rank_concept:
        load_concept(args.rank_concept)
        stem = Path(args.rank_concept).stem
        rank_out = args.rank_out if args.rank_out is not None else f"{Path(args.out)}-{stem}.csv"
        check_outside("--rank-out", rank_out, args.out, f"the store --out {args.out}")
        check_output_file(rank_out)
        check_some_layer_left(args)
    check_model(args)
    check_device_map(args)
    check_device(args.device)
    from somp_ref.adapters.head_export import export_activations  # imports torch: late
    from somp_ref.adapters.parallel_export import process_rank

    model, tokenizer = load(args)
    if args.rank_concept:
        check_layers(model, args)
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
        resume=args.resume,
    )
    if process_rank()[0] != 0:  # one process of a data-parallel launch reports and ranks
        return 0
    if store is None:  # the shards are on other machines: said how to merge them
        return 0
    print(f"wrote {args.out}")
    if args.rank_concept:
        from somp_ref.head_scores import format_top_heads
        from somp_ref.ranking import rank

        scores = rank(
            store, args.rank_concept, engine="torch", device=args.device, **ranking_options(args)
        )  # rank() records the concept's name
        write_all_atomically([(rank_out, scores.to_csv)])
        print(format_top_heads(scores))
        print(f"wrote {rank_out}")
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from somp_ref.selection import top_heads

    ranking = read_ranking(args.heads)
    heads = top_heads(ranking, args.top)
    if len(heads) < args.top:
        scored = {0: "no head has", 1: "only 1 head has"}.get(
            len(heads), f"only {len(heads)} heads have"
        )
        raise ValueError(
            f"{args.heads}: {scored} a score (the others are NaN or missing), fewer than "
            f"--top {args.top}"
        )
    check_model(args)
    check_device_map(args)
    check_device(args.device)
    from somp_ref.adapters.generation import generate  # imports torch: after the checks
    from somp_ref.adapters.intervene import scale_heads
    from somp_ref.adapters.provenance import model_fingerprint
    from somp_ref.adapters.tokenization import resolve_chat_template
    from somp_ref.provenance import ModelMismatchError, check_same_model

    model, tokenizer = load(args)
    source = ranking.source
    if not source.get("model_id"):
        print(f"warning: {args.heads} does not say which model it was made on", file=sys.stderr)
    try:
        check_same_model(source, model.somp_ref_model_id, model_fingerprint(model))
    except ModelMismatchError as err:
        if not args.force:
            raise ModelMismatchError(
                f"{args.heads}: {err}; pass --force to apply it anyway"
            ) from None
        print(f"warning: {args.heads}: {err} (applied anyway: --force)", file=sys.stderr)
    options = {
        "max_new_tokens": args.max_new_tokens,
        "chat_template": resolve_chat_template(tokenizer, args.chat_template),
    }
    baseline = generate(model, tokenizer, args.prompts, **options)
    alphas = {head: args.alpha for head in heads}
    with scale_heads(model, alphas, positions=args.intervene_positions):
        steered = generate(model, tokenizer, args.prompts, **options)
    print(
        f"heads ({len(heads)}, alpha {args.alpha:g} at {args.intervene_positions} positions): "
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
            "store to the directory --out: the heads' outputs and o_proj weights, the "
            "unembedding, the final norm and the vocabulary. Results do not depend on batch "
            "size or padding. With --rank-concept, also rank the store's heads for that "
            "concept right away with the torch port of SOMP on --device (the ranking options "
            "are rank's), writing the ranking CSV --rank-out. Rows go to disk batch by batch: "
            "memory holds one batch, and --resume finishes an interrupted export. Launched "
            "with torchrun or accelerate launch, each process exports its block of the "
            "prompts to a shard OUT.shard-R-of-W and the first merges them into --out."
        ),
        epilog="examples: somp-ref export --model default --prompts builtin:colors "
        "--out runs/colors --rank-concept colors --device cuda; "
        "torchrun --nproc-per-node 8 -m somp_ref export --model meta-llama/Llama-3.1-8B "
        "--prompts prompts.jsonl --out runs/big --device cuda (each process on "
        "cuda:LOCAL_RANK)",
    )
    add_model_loading(export)
    export.add_argument(
        "--prompts",
        required=True,
        help="builtin:colors | builtin:neutral | a .txt (or suffix-less) file, one prompt a "
        "line | a .jsonl file, records with a 'prompt' field | a .json file, an array of "
        "prompts or of such records; the suffix in any case (required)",
    )
    add_positions(export)
    add_out(export, "store directory to create (required)")
    add_batch_size(export, 8)
    add_chat_template(export)
    export.add_argument(
        "--store-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="how the heads' outputs are stored (default: float32)",
    )
    add_overwrite(export)
    export.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted export to --out from its last finished batch: rows go to "
        "disk batch by batch, and every finished batch is kept (an interrupted --overwrite "
        "too: the old store stays until the new one is finished); give the same model, "
        "prompts and options as the first time (checked) (default: refuse an existing --out)",
    )
    export.add_argument(
        "--rank-concept",
        metavar="CONCEPT",
        help="also rank the heads for this concept (as rank's --concept) with the torch port "
        "on --device, writing --rank-out (default: no ranking)",
    )
    export.add_argument(
        "--rank-out",
        metavar="PATH",
        help="ranking CSV for --rank-concept (default: STORE-CONCEPT.csv beside the store)",
    )
    add_ranking(
        export,
        "only with --rank-concept: how its ranking is made, as rank's flags (the store "
        "keeps every layer; --layers and --exclude-layers choose the layers ranked)",
    )
    renamed(export, {"--rank": "--rank-concept"})
    export.set_defaults(func=needs_torch(_run_export))

    gen = subparsers.add_parser(
        "generate",
        help="greedy generation with the top-k heads of a ranking scaled by alpha",
        description=(
            "Generate greedily twice, without and with the --top best heads of a ranking "
            "(--heads, from 'somp-ref rank') scaled by --alpha at the positions "
            "--intervene-positions selects, and print both side by side (writes no file). "
            "alpha=-1 flips the heads (suppresses their concept), 0 ablates them, 5 "
            "amplifies them."
        ),
        epilog="example: somp-ref generate --heads colors.csv --top 8 --alpha -1 "
        "'Describe the color of a ripe banana.' (add --intervene-positions generated to "
        "leave the prompt's positions alone)",
    )
    add_model_loading(gen)
    gen.add_argument("prompts", nargs="+", help="one or more prompts")
    add_heads_selection(gen)
    add_alpha(gen, -1.0, "factor the selected heads are scaled by (default: -1)")
    add_intervene_positions(gen)
    add_max_new_tokens(gen, 40, "tokens generated per prompt (default: 40)")
    gen.add_argument(
        "--force",
        action="store_true",
        help="apply a ranking made on another model (its file records the model id and a "
        "fingerprint of the weights) (default: refuse)",
    )
    add_chat_template(gen)
    renamed(gen, {"--raw": "--no-chat-template"})
    gen.set_defaults(func=needs_torch(_run_generate))
