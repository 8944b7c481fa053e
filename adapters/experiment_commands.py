"""The ``experiment`` and ``compare`` subcommands, registered through the entry-point group
``somp_ref.commands``: run the paper's protocol, and compare two of its runs prompt by
prompt. ``compare`` reads results files only (no torch); ``experiment`` imports torch only
once its arguments are checked.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from somp_ref.adapters.preflight import (
    check_device,
    check_device_map,
    check_layers,
    check_model,
    load,
    needs_torch,
)
from somp_ref.cli_options import (
    add_alpha,
    add_atoms,
    add_batch_size,
    add_exclude_layers,
    add_intervene_positions,
    add_json,
    add_method,
    add_model_loading,
    add_null,
    add_out,
    add_positions,
    add_seed,
    renamed,
)
from somp_ref.cli_types import k_list, positive_int
from somp_ref.ranking import DEFAULT_METHOD


def register(subparsers) -> None:
    """Add ``experiment`` and ``compare`` to the ``somp-ref`` command."""
    register_experiment(subparsers)
    register_compare(subparsers)


def _run_experiment(args: argparse.Namespace) -> int:
    from somp_ref.adapters.tasks import TASK_NAMES
    from somp_ref.files import check_output_dir, make_directories

    names = list(TASK_NAMES) if args.names == ["all"] else list(dict.fromkeys(args.names))
    study = args.names == ["all"] or "study" in names
    if study and args.intervene_positions != "all":
        raise ValueError(
            "--intervene-positions applies to the experiments, not to the selection study "
            "(it chooses the default ranking with heads scaled at every position); run "
            "'study' on its own"
        )
    check_output_dir(args.out)
    check_model(args)
    check_device_map(args)
    check_device(args.device)
    from somp_ref.adapters.experiment import Settings, run_task  # imports torch: after the checks
    from somp_ref.adapters.report import ranking_line, write_report
    from somp_ref.adapters.tasks import build_task

    # --method wins when given; else the selection study's verdict where this run makes one.
    settings = Settings(
        ks=tuple(args.k),
        method=args.method or DEFAULT_METHOD,
        method_chosen_by="flag" if args.method else "default",
        alpha=args.alpha,
        n_random=args.random,
        atoms=args.atoms,
        n_null=args.null,
        positions=args.positions,
        exclude_layers=tuple(args.exclude_layers),
        n_generate=args.generate,
        n_neutral=args.neutral,
        batch_size=args.batch_size,
        seed=args.seed,
        model=args.model,
        intervene_positions=args.intervene_positions,
    )
    out = Path(args.out)
    make_directories(out)
    tasks = [build_task(name, seed=settings.seed) for name in names if name != "study"]
    model, tokenizer = load(args)
    check_layers(model, args)
    if study:
        from somp_ref.adapters.report import write_study
        from somp_ref.adapters.selection_study import run_study, study_verdict

        studies = run_study(model, tokenizer, settings, out / "study")
        verdict = study_verdict(studies)
        print(write_study(studies, verdict, out) + "\n")
        if args.method is None and verdict["qualified"]:
            settings = replace(settings, method=verdict["best"], method_chosen_by="study")
        elif args.method is None and tasks:
            print(
                f"warning: the selection study qualified no ranking; the experiments use the "
                f"default ranking {settings.method} (--method to choose another)\n"
            )
    if tasks:
        print(ranking_line(asdict(settings)) + "\n")
        results = [run_task(model, tokenizer, task, settings, out) for task in tasks]
        print(write_report(results, out))
    print(f"\nwrote {out}: results.json (everything, per prompt), results.md, study.*")
    return 0


def register_experiment(subparsers) -> None:
    """Add ``experiment`` to the ``somp-ref`` command."""
    from somp_ref.adapters.tasks import TASK_NAMES

    parser = subparsers.add_parser(
        "experiment",
        help="the paper's protocol end to end: export, rank, intervene, evaluate",
        description=(
            "The paper's protocol: export each head's output averaged over the train prompts' "
            "tokens, rank the heads (--method, the paper's raw explained variance and the "
            "Logit Lens), choose alpha on the validation split where the experiment does not "
            "fix it, then for each k scale the top-k heads of each ranking and --random N "
            "(default 10) random head sets (same per-layer counts as --method's, disjoint "
            "from them), at every position or at those "
            "--intervene-positions selects, and measure every test prompt: the target "
            "effect next to collateral damage (KL along the unmodified model's answers to "
            "neutral prompts, degenerate answers), each with a 95 % bootstrap interval over "
            "prompts. Train, validation and test are disjoint by entity. Writes "
            "--out/results.json (everything, per prompt), --out/results.md (the tables) and "
            "--out/NAME/train_store."
        ),
        epilog="experiments: " + ", ".join(TASK_NAMES) + "; study: the selection study of "
        "the default ranking on the validation splits; all: the study and every experiment. "
        "example: somp-ref experiment colors --k 3,8,16 --out runs/colors; the same with the "
        "heads scaled at the answer's tokens only: somp-ref experiment colors "
        "--intervene-positions generated --out runs/colors-generated",
    )
    parser.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        choices=[*TASK_NAMES, "study", "all"],
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
        "factor the selected heads are scaled by (default: -1 to suppress; amplification "
        "experiments choose it for each k by a sweep over 2..8 on the validation split)",
    )
    parser.add_argument(
        "--random",
        type=positive_int,
        default=10,
        metavar="N",
        help="random head sets per k, same per-layer counts as the selection and disjoint "
        "from it, reported as median [IQR] (default: 10, as the paper)",
    )
    add_intervene_positions(parser)
    add_method(
        parser,
        "the primary ranking, the one the alpha sweep scales, the random head sets are shaped "
        "like and the tables label 'default'; somp and ll are always ranked and measured "
        "beside it",
        default=None,
        default_help=f"the selection study's verdict when the run includes study (or all), "
        f"else {DEFAULT_METHOD}",
    )
    add_atoms(parser)
    add_null(parser)
    add_exclude_layers(parser)
    add_positions(parser)  # of the train store
    parser.add_argument(
        "--generate",
        type=positive_int,
        default=32,
        metavar="N",
        help="test prompts answered by generation for word counts and degenerate answers; "
        "every test prompt is measured teacher-forced (default: 32)",
    )
    parser.add_argument(
        "--neutral",
        type=positive_int,
        default=32,
        metavar="N",
        help="neutral prompts whose answers measure collateral damage (KL) (default: 32)",
    )
    add_seed(
        parser,
        "seed of the train/validation/test split, the --null dictionaries and the --random "
        "head sets",
    )
    add_batch_size(parser, 32)
    add_out(parser, "output directory (default: runs/experiment)", default="runs/experiment")
    renamed(
        parser,
        {"--heads": "--k", "--rank": "--method", "--seeds": "--random", "--test": "--generate"},
    )
    # No --method: None, so that a run with the selection study can take the study's verdict.
    parser.set_defaults(func=needs_torch(_run_experiment))


def _run_compare(args: argparse.Namespace) -> int:
    from somp_ref.adapters.comparison import compare_runs
    from somp_ref.adapters.report import finite_or_null, format_comparison
    from somp_ref.adapters.results_files import load_results

    first, second = load_results(args.first), load_results(args.second)
    comparison = compare_runs(first, second, seed=args.seed)
    if args.json:
        payload = {"first": args.first, "second": args.second, "experiments": comparison}
        print(json.dumps(finite_or_null(payload), indent=1, allow_nan=False))
    else:
        print(format_comparison(comparison, args.first, args.second))
    return 0


def register_compare(subparsers) -> None:
    """Add ``compare`` to the ``somp-ref`` command."""
    parser = subparsers.add_parser(
        "compare",
        help="compare two experiment runs prompt by prompt (e.g. where heads are scaled)",
        description=(
            "Pair two runs of 'somp-ref experiment' that differ in one setting (e.g. "
            "--intervene-positions, --positions or --method) over the same test "
            "prompts: for each experiment both ran and each k and heads both measured, each "
            "figure as the ratio of its means (B/A) or, for degenerate answers, their "
            "difference (B-A), with a 95 % bootstrap interval that resamples the prompts "
            "jointly; random head sets paired by draw, median [IQR]; and how many heads "
            "the two selections share. Refuses runs that measured other prompts or another "
            "model. Reads results files only: no model is loaded."
        ),
        epilog="example: somp-ref compare runs/colors runs/colors-generated (B/A of KL "
        "below 1: scaling at the generated tokens only costs less collateral)",
    )
    parser.add_argument("first", metavar="A", help="a run directory (or its results.json)")
    parser.add_argument("second", metavar="B", help="the run compared with A")
    add_json(parser)
    add_seed(parser, "seed of the bootstrap's resampling of the prompts")
    parser.set_defaults(func=_run_compare)
