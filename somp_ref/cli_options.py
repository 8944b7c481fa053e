"""The options the ``somp-ref`` subcommands share: every shared flag, defined once.

Every flag that more than one subcommand takes is defined here, once, so that a flag name
has one meaning wherever it appears: the same dest, type, choices, default and help. Where
what a flag acts on is the command's own (what ``--out`` writes, what ``--seed`` draws), the
command words its help, and :data:`WORDED_PER_COMMAND` says why (a test holds every other
flag to one help and one default). The groups:

* model: ``--model``, ``--revision``, ``--device``, ``--dtype``, ``--device-map``,
  ``--offload-folder``, ``--attn-implementation`` (the commands that load a model);
* prompts: ``--chat-template/--no-chat-template`` (the commands that tokenize prompts),
  ``--positions`` (which tokens become a store's rows);
* ranking: ``--method`` (:data:`somp_ref.ranking.METHODS`, default
  :data:`somp_ref.ranking.DEFAULT_METHOD`), ``--atoms`` (50, the paper's number),
  ``--criterion``, ``--null``, ``--seed``, ``--layers``, ``--exclude-layers``; and, for
  ``rank``, who ranks: ``--engine``, ``--device`` (as the model commands'), ``--workers``;
* heads selection: ``--heads FILE`` (a ranking), ``--top K``;
* steering and outputs: ``--alpha``, ``--intervene-positions``, ``--batch-size``,
  ``--max-new-tokens``, ``--out``, ``--overwrite``, ``--json``.

The argparse value types live in :mod:`somp_ref.cli_types`. Only argparse arguments live
here: the core's commands use this module as the adapters' do, so it imports neither torch
nor ``somp_ref.adapters``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from somp_ref.cli_types import (
    at_least_two,
    device_spec,
    finite_float,
    layer_list,
    non_negative_int,
    positive_int,
)
from somp_ref.layer_pool import PARALLEL_MIN_VALUES
from somp_ref.ranking import DEFAULT_ATOMS, DEFAULT_METHOD, DEFAULT_NULL, METHODS, SHARE_POOL

#: Model weight dtypes ``somp_ref.adapters.models.load_model`` accepts (a test keeps the
#: two equal; the core cannot import the adapters to read them).
DTYPES = ("float32", "float16", "bfloat16", "float64")
#: SOMP's atom-selection norms across samples (see :func:`somp_ref.somp`).
CRITERIA = ("l1", "l2")
#: Ranking engines (:mod:`somp_ref.engines`): numpy built in, torch from the hf extra.
ENGINES = ("numpy", "torch")
#: Which tokens of a prompt become a store's rows, one line each
#: (``somp_ref.adapters.head_export.POSITIONS``, kept here torch-free so that ``--help`` is
#: instant; a test keeps the two equal). The first is the default.
EXPORT_POSITION_HELP = {
    "prompt-mean": "one row per prompt, each head's output averaged over the prompt's own "
    "tokens, the chat template's left out (the paper's rows)",
    "last": "one row per prompt, its last token (with the chat template: the end of the "
    "assistant's header, where the answer starts)",
    "mean": "one row per prompt, averaged over every token, the template's included",
    "all": "one row per token of every prompt",
}
EXPORT_POSITIONS = tuple(EXPORT_POSITION_HELP)
#: Where the command line can scale heads, one line each: the text-model rules of
#: ``somp_ref.adapters.intervene.POSITION_RULES``, whose ``POSITION_RULE_HELP`` takes these
#: lines from here (kept torch-free; a test keeps them in step). The first is the default.
INTERVENE_POSITION_HELP = {
    "all": "every position of prompt and answer (the paper's)",
    "prompt": "the prompt's positions only (prefill), the answer's tokens left alone",
    "generated": "only positions whose input token was generated (the prompt's last "
    "position, which predicts the first answer token, is a prompt position)",
}
INTERVENE_POSITIONS = tuple(INTERVENE_POSITION_HELP)
#: Shared flags whose help (and default) each command words for itself, and why: what they
#: act on is the command's own. Every other flag two subcommands share has one help and one
#: default everywhere (a test holds them to it).
WORDED_PER_COMMAND = {
    "--out": "what the command writes (a store, a ranking, a run directory)",
    "--seed": "what the command draws at random (null dictionaries, data splits, "
    "bootstrap resamples, synthetic heads)",
    "--method": "experiment ranks with somp and ll beside it; there --method picks the "
    "primary ranking (alpha sweep, random control, the 'default' label)",
    "--atoms": "inspect's atoms are the tokens of one head's signature over the vocabulary",
    "--model": "verify also takes 'none' (skip the model checks)",
    "--device": "rank's runs the torch engine (and implies it); the model commands' holds "
    "the model",
    "--alpha": "generate scales by -1 unless told; experiment sweeps it for amplification",
    "--batch-size": "each command's default fits its memory use (results do not depend on it)",
}
#: What each ranking method is, for the help of ``--method``.
METHOD_HELP = {
    "somp": "SOMP explained variance",
    "ll": "the Logit Lens baseline",
    "specificity": "SOMP explained variance as a z-score against --null random dictionaries",
    "excess": "SOMP explained variance minus its mean over --null dictionaries matched "
    "token by token in case, leading space, length and frequency",
    "share": "the variance the concept explains when SOMP may also pick the "
    f"{SHARE_POOL} most frequent word tokens",
}


# ------------------------------------------------------------------ renamed flags


def renamed(parser: argparse.ArgumentParser, names: Mapping[str, str]) -> None:
    """Record flags ``parser`` used to take under another name (old -> what to use now), so
    that passing an old one says what replaced it (see ``somp_ref.cli``)."""
    parser.renamed_flags = {**getattr(parser, "renamed_flags", {}), **names}


# ------------------------------------------------------------------ model


def add_model(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--model``: which model (every command that loads one)."""
    parser.add_argument(
        "--model",
        default="default",
        metavar="NAME",
        help=help
        or "'default' (the embedded SmolLM2-135M-Instruct, offline), a local checkpoint "
        "directory, or a hub id (default: default)",
    )


def add_model_loading(parser: argparse.ArgumentParser) -> None:
    """``--model`` and how to load it: ``--revision``, ``--device``, ``--dtype``,
    ``--attn-implementation``."""
    add_model(parser)
    add_model_placement(parser)


def add_model_placement(parser: argparse.ArgumentParser) -> None:
    """How a model named by ``--model`` loads: ``--revision``, ``--device``, ``--dtype``,
    ``--device-map``, ``--offload-folder``, ``--attn-implementation``."""
    parser.add_argument(
        "--revision",
        metavar="REV",
        help="for a hub id: the branch, tag or commit to load; the model is pinned to the "
        "commit it names (default: the hub's default branch, main for most models)",
    )
    parser.add_argument(
        "--device",
        type=device_spec,
        default="cpu",
        help="torch device, e.g. cuda or cuda:1 (default: cpu)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="dtype of the model weights (default: float32)",
    )
    parser.add_argument(
        "--device-map",
        metavar="MAP",
        help="spread a model too big for one device over several with accelerate, instead "
        "of --device: auto (GPUs in order, then CPU, then --offload-folder), balanced, "
        "sequential, or a JSON file mapping module names to devices "
        '(e.g. {"model.layers.0": "cuda:0", "lm_head": "cuda:1"}) (default: none)',
    )
    parser.add_argument(
        "--offload-folder",
        metavar="DIR",
        help="where --device-map keeps layers it maps to disk (default: none)",
    )
    parser.add_argument(
        "--attn-implementation",
        default="eager",
        metavar="IMPL",
        help="transformers attention kernel: eager (deterministic, what the checks compare "
        "against), sdpa, flash_attention_2 (default: eager)",
    )


# ------------------------------------------------------------------ ranking


def add_method(
    parser: argparse.ArgumentParser,
    role: str = "how heads are ranked",
    *,
    default: str | None = DEFAULT_METHOD,
    default_help: str = DEFAULT_METHOD,
) -> None:
    """``--method``: how heads are ranked (``role``: what the command does with the ranking,
    see :data:`WORDED_PER_COMMAND`; ``default_help``: what the ``default`` means, where it
    is not a method's name)."""
    described = "; ".join(f"{name}: {METHOD_HELP.get(name, name)}" for name in METHODS)
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=default,
        help=f"{role} ({described}) (default: {default_help})",
    )


def add_atoms(
    parser: argparse.ArgumentParser,
    help: str = "SOMP atoms per head, at most the concept's tokens",
) -> None:
    """``--atoms``: SOMP atoms (default :data:`somp_ref.ranking.DEFAULT_ATOMS`, 50, the
    paper's number)."""
    parser.add_argument(
        "--atoms",
        type=positive_int,
        default=DEFAULT_ATOMS,
        metavar="N",
        help=f"{help} (default: {DEFAULT_ATOMS})",
    )


def add_criterion(parser: argparse.ArgumentParser) -> None:
    """``--criterion``: the norm across samples in SOMP's atom score."""
    parser.add_argument(
        "--criterion",
        choices=CRITERIA,
        default="l1",
        help="norm across samples in SOMP's atom score (default: l1, as the authors)",
    )


def add_null(parser: argparse.ArgumentParser) -> None:
    """``--null``: random dictionaries of the specificity ranking."""
    parser.add_argument(
        "--null",
        type=at_least_two,
        default=DEFAULT_NULL,
        metavar="N",
        help=f"null dictionaries behind --method specificity and excess (default: {DEFAULT_NULL})",
    )


def add_seed(parser: argparse.ArgumentParser, help: str) -> None:
    """``--seed``: a random seed (``help`` says what it draws)."""
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, metavar="N", help=f"{help} (default: 0)"
    )


def add_exclude_layers(parser: argparse.ArgumentParser) -> None:
    """``--exclude-layers``: layers never ranked nor selected."""
    parser.add_argument(
        "--exclude-layers",
        type=layer_list,
        default=[],
        metavar="LAYERS",
        help="layers to skip, 0-based, e.g. 0 or 0,1 or 0-2 (default: none)",
    )


def add_layers(parser: argparse.ArgumentParser) -> None:
    """``--layers`` and ``--exclude-layers``: which layers are ranked."""
    parser.add_argument(
        "--layers",
        type=layer_list,
        default=None,
        metavar="LAYERS",
        help="layers to rank, 0-based, e.g. 10-29 or 0,5,7; others get no score (default: all)",
    )
    add_exclude_layers(parser)


def check_layer_flags(args: argparse.Namespace, n_layers: int, owner: str) -> None:
    """ValueError if ``--layers`` or ``--exclude-layers`` name a layer that ``owner`` ("the
    store", "the model") with ``n_layers`` layers does not have, or leave no layer to rank:
    before any work is done."""
    for flag in ("--layers", "--exclude-layers"):
        values = getattr(args, flag[2:].replace("-", "_"), None) or ()
        bad = sorted({layer for layer in values if layer >= n_layers})
        if bad:
            raise ValueError(
                f"{flag}: {owner} has layers 0-{n_layers - 1}, got {','.join(map(str, bad))}"
            )
    check_some_layer_left(args, n_layers)


def check_some_layer_left(args: argparse.Namespace, n_layers: int | None = None) -> None:
    """ValueError if ``--layers`` and ``--exclude-layers`` leave no layer of ``n_layers``
    (None: not known yet, only ``--layers`` minus ``--exclude-layers``) to rank."""
    layers = getattr(args, "layers", None)
    excluded = set(getattr(args, "exclude_layers", None) or ())
    if not excluded:
        return
    if layers is None:
        if n_layers is None:
            return
        layers = range(n_layers)
    if not set(layers) - excluded:
        what = "--layers" if getattr(args, "layers", None) is not None else f"the {n_layers} layers"
        raise ValueError(f"--exclude-layers excludes every one of {what}: no layer left to rank")


def add_ranking(parser: argparse.ArgumentParser, scope: str | None = None) -> None:
    """Every option of a ranking, as ``rank`` and ``export --rank-concept`` take them; where
    the command does more than rank, its ``scope`` ("only with --rank-concept: ...") heads
    them in ``--help`` as a group, so that each flag keeps rank's help."""
    group = parser if scope is None else parser.add_argument_group("ranking", scope)
    add_method(group)
    add_atoms(group)
    add_criterion(group)
    add_null(group)
    add_seed(group, "seed drawing the --null dictionaries")
    add_layers(group)


def ranking_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`somp_ref.ranking.rank` that :func:`add_ranking`'s
    flags set."""
    return {
        "method": args.method,
        "n_atoms": args.atoms,
        "criterion": args.criterion,
        "n_null": args.null,
        "seed": args.seed,
        "layers": args.layers,
        "exclude_layers": args.exclude_layers,
    }


def add_rank_engine(parser: argparse.ArgumentParser) -> None:
    """``--engine``, ``--device`` and ``--workers``: who pursues the heads, where, and in
    how many processes (``rank``)."""
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="who pursues the heads: numpy (the float64 reference, CPU) or torch (the hf "
        "extra, any --device) (default: numpy, or torch when --device is not cpu)",
    )
    parser.add_argument(
        "--device",
        type=device_spec,
        default=None,
        help="torch device of --engine torch, e.g. cuda or cuda:1; a device other than cpu "
        "implies --engine torch (default: cpu)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        metavar="N",
        help="processes ranking layers at once with --engine numpy; the scores do not depend "
        "on it (default: the CPUs available; 1 when one layer is ranked or the ranked layers "
        f"hold under {PARALLEL_MIN_VALUES} z values)",
    )


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def rank_engine_options(args: argparse.Namespace, n_layers: int, layer_values: int) -> dict:
    """The keyword arguments of :func:`somp_ref.ranking.rank_heads` that
    :func:`add_rank_engine`'s flags set, those equal to its defaults left out.

    ``n_layers`` layers are ranked, each holding ``layer_values`` z values (n_samples x
    n_heads x d_head): ``--workers``' default is 1 for one layer or fewer than
    :data:`somp_ref.layer_pool.PARALLEL_MIN_VALUES` values in all, else the CPUs available.
    """
    device = args.device
    engine = args.engine or ("numpy" if device in (None, "cpu") else "torch")
    workers = args.workers
    if workers is None:
        small = n_layers <= 1 or n_layers * layer_values < PARALLEL_MIN_VALUES
        workers = 1 if engine != "numpy" or small else available_cpus()
    options = {"engine": engine, "device": device, "workers": workers}
    defaults = {"engine": "numpy", "device": None, "workers": 1}
    return {key: value for key, value in options.items() if value != defaults[key]}


# ------------------------------------------------------------------ heads, steering, outputs


def add_heads_selection(parser: argparse.ArgumentParser) -> None:
    """``--heads FILE`` (a ranking) and ``--top K`` (how many of its best heads)."""
    parser.add_argument(
        "--heads",
        required=True,
        metavar="FILE",
        help="a ranking: the CSV (or JSON) that 'somp-ref rank' writes (required)",
    )
    parser.add_argument(
        "--top",
        type=positive_int,
        default=8,
        metavar="K",
        help="how many of the ranking's best heads (default: 8)",
    )


def add_alpha(parser: argparse.ArgumentParser, default: float | None, help: str) -> None:
    """``--alpha``: the factor the selected heads are scaled by."""
    parser.add_argument("--alpha", type=finite_float, default=default, help=help)


def _one_line_each(explained: Mapping[str, str]) -> str:
    """``name = what it is`` for each value, one after the other."""
    return "; ".join(f"{name} = {text}" for name, text in explained.items())


def add_intervene_positions(parser: argparse.ArgumentParser) -> None:
    """``--intervene-positions``: at which positions the selected heads are scaled."""
    parser.add_argument(
        "--intervene-positions",
        choices=INTERVENE_POSITIONS,
        default=INTERVENE_POSITIONS[0],
        help="where the selected heads are scaled: "
        f"{_one_line_each(INTERVENE_POSITION_HELP)} (default: {INTERVENE_POSITIONS[0]})",
    )


# ------------------------------------------------------------------ prompts


def add_chat_template(parser: argparse.ArgumentParser) -> None:
    """``--chat-template/--no-chat-template``: whether prompts are wrapped in the model's
    chat template; None (neither given) means: when the tokenizer has one, the rule of
    ``experiment``, ``export`` and ``generate`` in Python too
    (``somp_ref.adapters.tokenization.resolve_chat_template``)."""
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap each prompt as a user turn of the model's chat template (an error if its "
        "tokenizer has none); --no-chat-template feeds the prompt's raw text "
        "(default: the template when the tokenizer has one, raw text otherwise)",
    )


def add_positions(parser: argparse.ArgumentParser) -> None:
    """``--positions``: which tokens of each prompt become a store's rows."""
    parser.add_argument(
        "--positions",
        choices=EXPORT_POSITIONS,
        default=EXPORT_POSITIONS[0],
        help="which tokens of each prompt become rows of the store: "
        f"{_one_line_each(EXPORT_POSITION_HELP)} (default: {EXPORT_POSITIONS[0]})",
    )


def add_batch_size(parser: argparse.ArgumentParser, default: int) -> None:
    """``--batch-size``: prompts per forward pass (results do not depend on it)."""
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=default,
        metavar="N",
        help=f"prompts per forward pass; results do not depend on it (default: {default})",
    )


def add_max_new_tokens(parser: argparse.ArgumentParser, default: int | None, help: str) -> None:
    """``--max-new-tokens``: tokens generated per answer."""
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=default, metavar="N", help=help
    )


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: replace what ``--out`` names."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing store at --out (default: refuse)",
    )


def add_json(parser: argparse.ArgumentParser) -> None:
    """``--json``: print the results as JSON on stdout."""
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the results, every figure, as JSON on stdout instead of tables "
        "(default: tables)",
    )


def add_out(parser: argparse.ArgumentParser, help: str, *, default: str | None = None) -> None:
    """``--out``: where the command writes its main output (``help`` says what it is);
    required unless it has a ``default``."""
    parser.add_argument(
        "--out", required=default is None, default=default, metavar="PATH", help=help
    )
