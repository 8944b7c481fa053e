"""The options the ``somp-ref`` subcommands share, and their argparse types.

Every flag that more than one subcommand takes is defined here, once, so that a flag name
has one meaning (the same dest, type and choices) wherever it appears; each subcommand
only words the help for what it does with it. The groups:

* model: ``--model``, ``--revision``, ``--device``, ``--dtype``, ``--attn-implementation``
  (the commands that load a model);
* ranking: ``--method`` (:data:`somp_ref.ranking.METHODS`, default
  :data:`somp_ref.ranking.DEFAULT_METHOD`), ``--atoms`` (50, the paper's number),
  ``--criterion``, ``--null``, ``--seed``, ``--layers``, ``--exclude-layers``; and, for
  ``rank``, who ranks: ``--engine``, ``--device`` (as the model commands'), ``--workers``;
* heads selection: ``--heads FILE`` (a ranking), ``--top K``;
* steering and outputs: ``--alpha``, ``--intervene-positions``, ``--batch-size``,
  ``--max-new-tokens``, ``--out``.

Only argparse arguments and types live here: the core's commands use this module as the
adapters' do, so it imports neither torch nor ``somp_ref.adapters``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points

from somp_ref.layer_pool import PARALLEL_MIN_VALUES
from somp_ref.ranking import DEFAULT_METHOD, METHODS, SHARE_POOL

#: SOMP atoms per head unless told otherwise: the paper's number.
DEFAULT_ATOMS = 50
#: Random dictionaries behind the "specificity" ranking (as the measured experiments).
DEFAULT_NULL = 6
#: Model weight dtypes ``somp_ref.adapters.models.load_model`` accepts (a test keeps the
#: two equal; the core cannot import the adapters to read them).
DTYPES = ("float32", "float16", "bfloat16", "float64")
#: SOMP's atom-selection norms across samples (see :func:`somp_ref.somp`).
CRITERIA = ("l1", "l2")
#: Ranking engines (:mod:`somp_ref.engines`): numpy built in, torch from the hf extra.
ENGINES = ("numpy", "torch")
#: Layers a model may have: the activation store's schema bound on n_layers. A layer number
#: at or past it is refused while parsing (``0-99999999999`` would build a list of 1e11).
MAX_LAYERS = 4096
#: Device types torch itself parses (``torch.device``); others come from out-of-tree
#: backends that torch loads through the entry-point group ``torch.backends``.
TORCH_DEVICE_TYPES = (
    "cpu",
    "cuda",
    "mps",
    "xpu",
    "meta",
    "hip",
    "xla",
    "hpu",
    "mtia",
    "maia",
    "ipu",
    "ve",
    "fpga",
    "lazy",
    "vulkan",
    "mkldnn",
    "opengl",
    "opencl",
    "ideep",
    "privateuseone",
)
_DEVICE = re.compile(r"([a-z][a-z0-9_]*)(?::(0|[1-9][0-9]{0,3}))?")
_LAYER_PART = re.compile(r"([0-9]+)(?:-([0-9]+))?")
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


# ------------------------------------------------------------------ types


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

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
at_least_two = int_at_least(2)


def layer_list(text: str) -> list[int]:
    """An argparse type: layers as '0,1,5-7' -> [0, 1, 5, 6, 7] (0-based, ranges inclusive,
    each below :data:`MAX_LAYERS`)."""
    layers: list[int] = []
    for part in text.split(","):
        match = _LAYER_PART.fullmatch(part.strip())
        if match is None:
            raise argparse.ArgumentTypeError(
                f"layers are 0-based numbers or ranges like 0,1,5-7, got {text!r:.80}"
            )
        low, high = (_layer_number(digits) for digits in (match[1], match[2] or match[1]))
        if high < low:
            raise argparse.ArgumentTypeError(f"the range {part.strip()!r} is empty")
        layers += range(low, high + 1)
    return layers


def _layer_number(digits: str) -> int:
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(MAX_LAYERS)) or int(significant) >= MAX_LAYERS:
        shown = significant if len(significant) <= 12 else significant[:12] + "..."
        raise argparse.ArgumentTypeError(
            f"layer {shown} is past any model's: layers are numbered 0-{MAX_LAYERS - 1}"
        )
    return int(significant)


def finite_float(text: str) -> float:
    """An argparse type: a finite number (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def device_spec(text: str) -> str:
    """An argparse type: a torch device, ``TYPE`` or ``TYPE:INDEX`` ('cpu', 'cuda:1').

    Checked without importing torch: the form, and a type torch parses (unless an
    out-of-tree backend is installed, whose types torch alone knows). Whether the device
    exists is checked later, before a model loads (``somp_ref.adapters.preflight``).
    """
    match = _DEVICE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"a device is TYPE or TYPE:INDEX, e.g. cpu, cuda, cuda:1, mps; got {text!r}"
        )
    if match[1] not in TORCH_DEVICE_TYPES and not entry_points(group="torch.backends"):
        raise argparse.ArgumentTypeError(
            f"unknown device type {match[1]!r} in {text!r}; torch has "
            + ", ".join(TORCH_DEVICE_TYPES[:8])
            + ", ..."
        )
    return text


def k_list(text: str) -> list[int]:
    """An argparse type: values of k as '3,8,16' -> [3, 8, 16], each >= 1."""
    parts = text.split(",")
    if not all(part.strip().isdigit() and int(part) >= 1 for part in parts):
        raise argparse.ArgumentTypeError(f"expected integers >= 1 like 3,8,16, got {text!r}")
    return [int(part) for part in parts]


def head_spec(text: str) -> tuple[int, int]:
    """An argparse type: a head as 'LAYER.HEAD' -> (layer, head), both 0-based."""
    layer, sep, head = text.partition(".")
    if not (sep and layer.isdigit() and head.isdigit()):
        raise argparse.ArgumentTypeError(f"a head is LAYER.HEAD, e.g. 12.3, got {text!r}")
    return int(layer), int(head)


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
        help="for a hub id: the branch, tag or commit to load, pinned to its commit "
        "(default: main)",
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


def add_method(parser: argparse.ArgumentParser) -> None:
    """``--method``: how heads are ranked."""
    described = "; ".join(f"{name}: {METHOD_HELP.get(name, name)}" for name in METHODS)
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=DEFAULT_METHOD,
        help=f"how heads are ranked ({described}) (default: {DEFAULT_METHOD})",
    )


def add_atoms(parser: argparse.ArgumentParser, help: str = "SOMP atoms per head") -> None:
    """``--atoms``: SOMP atoms (default 50, the paper's number)."""
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


def add_ranking(parser: argparse.ArgumentParser) -> None:
    """Every option of a ranking, as ``rank`` and ``export --rank-concept`` take them."""
    add_method(parser)
    add_atoms(parser)
    add_criterion(parser)
    add_null(parser)
    add_seed(parser, "seed drawing the --null dictionaries")
    add_layers(parser)


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


#: Where the command line can scale heads (somp_ref.adapters.intervene.POSITION_RULES, the
#: text-model ones, kept here torch-free; a test keeps them in step). The first is the default.
INTERVENE_POSITIONS = ("all", "prompt", "generated")


def add_intervene_positions(parser: argparse.ArgumentParser) -> None:
    """``--intervene-positions``: at which positions the selected heads are scaled."""
    parser.add_argument(
        "--intervene-positions",
        choices=INTERVENE_POSITIONS,
        default=INTERVENE_POSITIONS[0],
        help="where the selected heads are scaled: all = every position of prompt and answer "
        "(the paper's); prompt = the prompt's positions only, the answer's left alone; "
        "generated = only positions whose input token was generated (the prompt's last "
        "position, which predicts the first answer token, is left alone) "
        f"(default: {INTERVENE_POSITIONS[0]})",
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


def add_out(parser: argparse.ArgumentParser, help: str, *, default: str | None = None) -> None:
    """``--out``: where the command writes its main output (``help`` says what it is);
    required unless it has a ``default``."""
    parser.add_argument(
        "--out", required=default is None, default=default, metavar="PATH", help=help
    )
