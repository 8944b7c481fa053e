"""Checks the model commands make before a model loads, and the loading itself.

Bad arguments (an output a store cannot be written to, a device torch cannot use, a model
path that does not exist, layers the model lacks) are reported at once, in one line, and
not after minutes of loading; nothing here imports torch until it must.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

from somp_ref.adapters.models import first_line
from somp_ref.cli_options import check_layer_flags
from somp_ref.engines import HF_INSTALL
from somp_ref.errors import MissingExtraError

INSTALL_LINE = f"this command needs the hf extra: {HF_INSTALL}"


def needs_torch(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run``, answering with the install line where torch or transformers is missing."""

    def wrapped(args: argparse.Namespace) -> int:
        # find_spec, not import: importing torch takes seconds, and the checks that come
        # before the model loads should answer at once.
        if not all(importlib.util.find_spec(name) for name in ("torch", "transformers")):
            raise MissingExtraError(INSTALL_LINE)
        return run(args)

    return wrapped


def check_store_target(out: str, overwrite: bool) -> None:
    """Raise before the model loads if ``export`` could not create its store at ``out``:
    the store's own dry run (:func:`somp_ref.store.replacing.check_claim`, what
    :meth:`~somp_ref.store.ActivationStore.create` checks, touching nothing), with the
    command line's words for an ``out`` that exists without ``--overwrite``."""
    from somp_ref.files import check_output_dir
    from somp_ref.store.locations import real_location, refuse_hidden_sibling, refuse_symlink
    from somp_ref.store.replacing import check_claim

    refuse_symlink(out)
    refuse_hidden_sibling(real_location(out))
    path = check_output_dir(out)
    if path.exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, "already exists (pass --overwrite to replace it)", out)
    check_claim(real_location(out), overwrite)


def check_device(device: str) -> None:
    """Raise before the model loads unless torch can use ``device``: torch parses it, and
    an accelerator (cuda, mps, xpu, ...) is available with that index. Imports torch:
    call it after the cheap checks."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"--device {device!r}: {first_line(err)}") from None
    if parsed.type in ("cpu", "meta"):
        return
    backend = getattr(torch, parsed.type, None)
    is_available = getattr(backend, "is_available", None)
    if callable(is_available) and not is_available():
        raise ValueError(
            f"--device {device}: no {parsed.type} device is available to torch "
            f"{torch.__version__} here (torch.{parsed.type}.is_available() is False)"
        )
    device_count = getattr(backend, "device_count", None)
    if parsed.index is not None and callable(device_count) and parsed.index >= device_count():
        count = device_count()
        raise ValueError(
            f"--device {device}: there {'is' if count == 1 else 'are'} {count} "
            f"{parsed.type} device{'' if count == 1 else 's'} here"
            + (f" ({parsed.type}:0)" if count == 1 else "")
            + (f" ({parsed.type}:0 to {parsed.type}:{count - 1})" if count > 1 else "")
        )


def check_model(args: argparse.Namespace) -> None:
    """Raise for a local model path that does not exist, or a revision of anything but a
    hub id, before torch is imported."""
    from somp_ref.adapters.models import check_model_name

    check_model_name(args.model, args.revision)


def load(args: argparse.Namespace):
    """The model and tokenizer the model flags name (imports torch)."""
    from somp_ref.adapters.models import load_model

    return load_model(
        args.model,
        revision=args.revision,
        device=process_device(args.device),
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        device_map=read_device_map(args.device_map),
        offload_folder=args.offload_folder,
    )


def process_device(device: str) -> str:
    """``device`` for this process: in a data-parallel launch (``torchrun``, ``accelerate
    launch``), an accelerator named without an index ("cuda") is this process's own,
    ``cuda:LOCAL_RANK``."""
    local = os.environ.get("LOCAL_RANK")
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several and local is not None and device not in ("cpu", "meta") and ":" not in device:
        return f"{device}:{local}"
    return device


#: The device maps accelerate computes itself (``--device-map NAME``).
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def read_device_map(spec: str | None) -> str | dict[str, str] | None:
    """``--device-map``: None, one of :data:`DEVICE_MAP_NAMES`, or a JSON file mapping module
    names to devices (``{"model.layers.0": "cuda:0", ..., "lm_head": "cpu"}``)."""
    if spec is None or spec in DEVICE_MAP_NAMES:
        return spec
    from somp_ref.user_files import read_user_text

    try:
        mapping = json.loads(read_user_text(spec, "device map"))
    except ValueError as err:
        raise ValueError(f"--device-map {spec}: not JSON ({first_line(err)})") from None
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, (str, int)) for k, v in mapping.items()
    ):
        raise ValueError(
            f"--device-map {spec}: must be a JSON object mapping module names to devices"
        )
    return mapping


def check_device_map(args: argparse.Namespace) -> None:
    """Raise before the model loads for --device with --device-map, or a map file that is
    not one."""
    if args.device_map is not None and args.device != "cpu":
        raise ValueError("give --device or --device-map, not both")
    read_device_map(args.device_map)


def check_layers(model, args: argparse.Namespace) -> None:
    """Raise, right after the model loads and before any forward pass, for layer numbers
    the model does not have."""
    from somp_ref.adapters.model_heads import model_heads

    check_layer_flags(args, model_heads(model).n_layers, "the model")


def read_ranking(path: str):
    """The ranking in ``path``: the JSON or the CSV that ``somp-ref rank`` writes."""
    from somp_ref.head_scores import HeadScores

    if Path(path).suffix.lower() == ".json":
        return HeadScores.from_json(path)
    return HeadScores.from_csv(path)
