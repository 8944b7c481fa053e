"""The argparse value types of the ``somp-ref`` subcommands: each parses one kind of value
(a bounded integer, layers, a finite number, a torch device, values of k, a head) and says in
one line what was expected when the text is not one.

They import neither torch nor ``somp_ref.adapters``: ``--help`` and bad arguments answer
at once. The flags that use them are defined in :mod:`somp_ref.cli_options`.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from importlib.metadata import entry_points

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
