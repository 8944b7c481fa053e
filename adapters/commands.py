"""The ``export``, ``generate`` and ``experiment`` subcommands, registered through the
entry-point group ``somp_ref.commands``. Nothing here imports torch until a model loads, so
``somp-ref --help`` works without the ``hf`` extra, these commands answer with the install
line, and bad arguments (files, numbers, output paths) are reported before a model loads.
Their shared flags come from :mod:`somp_ref.cli_options`, as the core commands' do.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import textwrap
from collections.abc import Callable
from pathlib import Path

from somp_ref.cli_options import (
    add_alpha,
    add_atoms,
    add_batch_size,
    add_exclude_layers,
    add_heads_selection,
    add_max_new_tokens,
    add_method,
    add_model_loading,
    add_null,
    add_out,
    add_ranking,
    check_layer_flags,
    k_list,
    non_negative_int,
    positive_int,
    ranking_options,
    renamed,
)

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


def _check_model(args: argparse.Namespace) -> None:
    """Raise for a local model path that does not exist, or a revision of anything but a
    hub id, before torch is imported."""
    from somp_ref.adapters.models import check_model_name

    check_model_name(args.model, args.revision)


def _load(args: argparse.Namespace):
    """The model and tokenizer the model flags name (imports torch)."""
    from somp_ref.adapters.models import load_model

    return load_model(
        args.model,
        revision=args.revision,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
    )


def _check_layers(model, args: argparse.Namespace) -> None:
    """Raise, right after the model loads and before any forward pass, for layer numbers
    the model does not have."""
    from somp_ref.adapters.model_heads import model_heads

    check_layer_flags(args, model_heads(model).n_layers, "the model")


def _read_ranking(path: str):
    """The ranking in ``path``: the JSON or the CSV that ``somp-ref rank`` writes."""
    from somp_ref.head_scores import HeadScores

    if Path(path).suffix.lower() == ".json":
        return HeadScores.from_json(path)
    return HeadScores.from_csv(path)


def _run_export(args: argparse.Namespace) -> int:
    from somp_ref.adapters.prompts import read_prompts
    from somp_ref.concepts import load_concept
    from somp_ref.files import check_output_file

    records = read_prompts(args.prompts)
    _check_store_target(args.out, args.overwrite)
    rank_out = None
    if args.rank_concept:
        load_concept(args.rank_concept)
        stem = Path(args.rank_concept).stem
        rank_out = check_output_file(args.rank_out or f"{args.out}-{stem}.csv")
    _check_model(args)
    from somp_ref.adapters.export import export_activations  # imports torch: after the checks

    model, tokenizer = _load(args)
    if args.rank_concept:
        _check_layers(model, args)
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
    print(f"wrote {args.out}")
    if args.rank_concept:
        from somp_ref.head_scores import format_top_heads
        from somp_ref.ranking import rank

        scores = rank(
            store, args.rank_concept, engine="torch", device=args.device, **ranking_options(args)
        )
        scores.to_csv(rank_out)
        print(format_top_heads(scores))
        print(f"wrote {rank_out}")
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from somp_ref.selection import top_heads

    heads = top_heads(_read_ranking(args.heads), args.top)
    _check_model(args)
    from somp_ref.adapters.generation import generate  # imports torch: after the checks
    from somp_ref.adapters.intervene import scale_heads

    model, tokenizer = _load(args)
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
    """Add ``export``, ``generate`` and ``experiment`` to the ``somp-ref`` command."""
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
            "are rank's), writing the ranking CSV --rank-out."
        ),
        epilog="example: somp-ref export --model default --prompts builtin:colors "
        "--chat-template --out runs/colors --rank-concept colors --device cuda",
    )
    add_model_loading(export)
    export.add_argument(
        "--prompts",
        required=True,
        help="builtin:colors | builtin:neutral | a .txt file (one prompt a line) | a .jsonl "
        "file (records with a 'prompt' field) (required)",
    )
    export.add_argument(
        "--positions",
        choices=("last", "all", "mean"),
        default="last",
        help="which tokens become rows: the last prompt token, all tokens, or their mean "
        "(default: last)",
    )
    add_out(export, "store directory to create (required)")
    add_batch_size(export, 8)
    export.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap each prompt as a user turn of the chat template (default: raw text)",
    )
    export.add_argument(
        "--store-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="how the heads' outputs are stored (default: float32)",
    )
    export.add_argument(
        "--overwrite", action="store_true", help="replace an existing store (default: refuse)"
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
    add_ranking(export)
    renamed(export, {"--rank": "--rank-concept"})
    export.set_defaults(func=_needs_torch(_run_export))

    gen = subparsers.add_parser(
        "generate",
        help="greedy generation with the top-k heads of a ranking scaled by alpha",
        description=(
            "Generate greedily twice, without and with the --top best heads of a ranking "
            "(--heads, from 'somp-ref rank') scaled by --alpha, and print both side by side "
            "(writes no file). alpha=-1 flips the heads (suppresses their concept), 0 "
            "ablates them, 5 amplifies them."
        ),
        epilog="example: somp-ref generate --heads colors.csv --top 8 --alpha -1 "
        "'Describe the color of a ripe banana.'",
    )
    add_model_loading(gen)
    gen.add_argument("prompts", nargs="+", help="one or more prompts")
    add_heads_selection(gen)
    add_alpha(gen, -1.0, "factor the selected heads are scaled by (default: -1)")
    add_max_new_tokens(gen, 40, "tokens generated per prompt (default: 40)")
    gen.add_argument(
        "--raw",
        action="store_true",
        help="feed prompts as raw text, without the chat template (default: chat template)",
    )
    gen.set_defaults(func=_needs_torch(_run_generate))
    register_experiment(subparsers)


def _run_experiment(args: argparse.Namespace) -> int:
    from somp_ref.adapters.tasks import TASK_NAMES
    from somp_ref.files import check_output_dir

    check_output_dir(args.out)
    _check_model(args)
    from somp_ref.adapters.experiment import Settings, run_task  # imports torch: after the checks
    from somp_ref.adapters.report import write_report
    from somp_ref.adapters.tasks import build_task

    names = list(TASK_NAMES) if args.names == ["all"] else args.names
    settings = Settings(
        heads=tuple(args.k),
        alpha=args.alpha,
        seeds=args.seeds,
        rank=args.method,
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
    # As run_experiments, but loading the model as the model flags say (device, dtype).
    out.mkdir(parents=True, exist_ok=True)
    tasks = [
        build_task(name, n_train=settings.n_train, n_test=settings.n_test, seed=settings.data_seed)
        for name in names
    ]
    model, tokenizer = _load(args)
    _check_layers(model, args)
    results = [run_task(model, tokenizer, task, settings, out) for task in tasks]
    print(write_report(results, out))
    print(
        f"\nwrote {out / 'results.json'}, {out / 'results.md'}, and per experiment "
        f"{out / 'NAME'}/ (its results, rankings, plot and train store)"
    )
    return 0


def register_experiment(subparsers) -> None:
    """Add ``experiment`` to the ``somp-ref`` command."""
    from somp_ref.adapters.tasks import TASK_NAMES

    parser = subparsers.add_parser(
        "experiment",
        help="the paper's protocol end to end: export, rank, intervene, evaluate",
        description=(
            "Export the train prompts, rank heads (--method, and the Logit Lens), then for "
            "each k scale the top-k heads by alpha (and random heads with the same count per "
            "layer, over several seeds) and evaluate on disjoint test prompts: the target "
            "effect next to collateral damage (KL on neutral prompts, degenerate answers). "
            "Greedy decoding, fixed seeds. Writes --out/results.json (everything, every "
            "generation), --out/results.md (the tables) and, per experiment, --out/NAME/ "
            "(its results.json, the rankings as scores_METHOD.json, plot.png and the "
            "train_store)."
        ),
        epilog="experiments: " + ", ".join(TASK_NAMES) + ", or all. "
        "example: somp-ref experiment colors --k 3,8,16 --method specificity --out runs/colors",
    )
    parser.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        choices=[*TASK_NAMES, "all"],
        help="experiment(s) to run",
    )
    add_model_loading(parser)
    parser.add_argument(
        "--k",
        type=k_list,
        default=[3, 8, 16],
        metavar="K,K,...",
        help="how many top heads to scale, comma-separated values of k (default: 3,8,16)",
    )
    add_alpha(
        parser,
        None,
        "factor the selected heads are scaled by (default: -1; 5 for amplification)",
    )
    parser.add_argument(
        "--seeds",
        type=non_negative_int,
        default=5,
        metavar="N",
        help="random-head draws per k, the control (default: 5)",
    )
    add_method(parser)
    add_atoms(parser)
    add_null(parser)
    add_exclude_layers(parser)
    parser.add_argument(
        "--train", type=positive_int, default=64, metavar="N", help="train prompts (default: 64)"
    )
    parser.add_argument(
        "--test", type=positive_int, default=24, metavar="N", help="test prompts (default: 24)"
    )
    add_batch_size(parser, 24)
    add_max_new_tokens(
        parser, None, "tokens generated per answer (default: 24, or 8 for question answering)"
    )
    add_out(parser, "output directory (default: runs/experiment)", default="runs/experiment")
    renamed(parser, {"--heads": "--k", "--rank": "--method"})
    parser.set_defaults(func=_needs_torch(_run_experiment))
