"""Loading models: the embedded default (:mod:`somp_ref.adapters.embedded_model`), local
checkpoints and hub ids.

A hub id is pinned before it loads: ``huggingface_hub`` names the commit its revision points
to, the model loads at that commit, and ``hub_id@commit`` is the id stores record. Offline,
or when the hub cannot be reached, the snapshot in the local Hugging Face cache is used.
Downloads show the hub's own progress bars.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from somp_ref.adapters.embedded_model import DEFAULT_MODEL_ID, ModelLoadError, default_checkpoint

DEFAULT_MODEL = "default"
DTYPES = ("float32", "float16", "bfloat16", "float64")


def local_checkpoint(name_or_path: str) -> Path | None:
    """The local checkpoint directory ``name_or_path`` names, or None for a hub id.

    A name is a local path when it exists, starts with ``/``, ``.`` or ``~``, or has more
    than one ``/`` (a hub id is ``name`` or ``owner/name``), so a mistyped path is reported
    here instead of being looked up on the hub.

    Raises
    ------
    ModelLoadError
        A local path that is missing, a file, or a directory without ``config.json``; a
        ``~user`` that cannot be expanded.
    """
    try:
        path = Path(name_or_path).expanduser()
    except RuntimeError:  # "~user/..." for a user without a home directory
        raise ModelLoadError(
            f"model directory {name_or_path}: cannot expand {name_or_path.split('/')[0]!r} "
            "(no such user, or no home directory)"
        ) from None
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
    if not (looks_local or path.exists()):
        return None
    if not path.exists():
        raise ModelLoadError(f"model directory {name_or_path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{name_or_path}: not a transformers checkpoint directory (no config.json)"
        )
    return path


@dataclass(frozen=True)
class ModelSource:
    """Where a model loads from, and the id stores record of it.

    Attributes
    ----------
    path : str
        What ``from_pretrained`` loads: a local checkpoint directory (the default model's,
        the user's, or a hub snapshot in the local cache) or a hub id.
    model_id : str
        Recorded as ``model.somp_ref_model_id`` (export writes it into the store's meta):
        the default model's description, the local path, or ``hub_id@commit_sha``.
    revision : str or None
        The commit ``from_pretrained`` fetches ``path`` at, for a hub id; None otherwise.
    """

    path: str
    model_id: str
    revision: str | None = None


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def hub_source(repo_id: str, revision: str | None = None) -> ModelSource:
    """A hub id pinned to the commit that ``revision`` (a branch, tag or commit; default
    "main") names.

    The hub is asked through ``huggingface_hub``; offline (``HF_HUB_OFFLINE=1``) or when it
    cannot be reached, the snapshot of that revision in the local Hugging Face cache is
    used, and its commit recorded.

    Raises
    ------
    ModelLoadError
        The hub has no such model (or it is private or gated) or no such revision; or the
        hub cannot be asked and nothing of the model is cached.
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    if constants.HF_HUB_OFFLINE:
        reason = "the hub is switched off (HF_HUB_OFFLINE=1)"
    else:
        try:
            sha = HfApi().model_info(repo_id, revision=revision).sha
        except GatedRepoError as err:
            raise ModelLoadError(
                f"{repo_id} is gated: accept its terms on huggingface.co and log in with "
                f"'hf auth login' ({first_line(err)})"
            ) from None
        except RepositoryNotFoundError:
            raise ModelLoadError(
                f"no model {repo_id!r} on the Hugging Face hub, nor a local directory of "
                "that name (a private model needs 'hf auth login')"
            ) from None
        except RevisionNotFoundError:
            raise ModelLoadError(f"{repo_id} has no revision {revision!r} on the hub") from None
        except Exception as err:  # unreachable: the class depends on the hub's HTTP library
            reason = f"the hub cannot be reached ({first_line(err)})"
        else:
            if sha:
                return ModelSource(repo_id, f"{repo_id}@{sha}", sha)
            reason = "the hub named no commit for it"
    config = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(config, str):
        raise ModelLoadError(
            f"{repo_id}{at} is not in the Hugging Face cache and {reason}: load it once "
            "online, or pass a local checkpoint directory"
        )
    snapshot = Path(config).parent  # .../snapshots/<commit sha>/config.json
    return ModelSource(str(snapshot), f"{repo_id}@{snapshot.name}")


def check_model_name(name_or_path: str, revision: str | None = None) -> Path | None:
    """The local checkpoint directory ``name_or_path`` names, or None for the default model
    or a hub id; cheap (nothing loads, the hub is not asked), for failing fast.

    Raises
    ------
    ModelLoadError
        A local path that is not a checkpoint (see :func:`local_checkpoint`), or a revision
        given for anything but a hub id.
    """
    local = None if name_or_path == DEFAULT_MODEL else local_checkpoint(name_or_path)
    if revision is not None and (name_or_path == DEFAULT_MODEL or local is not None):
        raise ModelLoadError(
            f"a revision ({revision!r}) applies to hub ids only, not to {name_or_path!r}"
        )
    return local


def resolve_model(name_or_path: str, revision: str | None = None) -> ModelSource:
    """Where ``name_or_path`` loads from: the default model, a local checkpoint directory,
    or a hub id pinned to a commit (see :func:`hub_source`).

    Raises
    ------
    ModelLoadError
        A local path that is not a checkpoint, a revision given for anything but a hub id,
        or a hub id that cannot be resolved.
    """
    local = check_model_name(name_or_path, revision)
    if name_or_path == DEFAULT_MODEL:
        return ModelSource(str(default_checkpoint()), DEFAULT_MODEL_ID)
    if local is not None:
        return ModelSource(str(local), name_or_path)
    return hub_source(name_or_path, revision)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    attn_implementation: str = "eager",
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, in eval mode.

    Parameters
    ----------
    name_or_path : str, default="default"
        ``"default"`` (the embedded SmolLM2-135M-Instruct), a local checkpoint directory,
        or a hub id.
    revision : str, optional
        For a hub id: the branch, tag or commit to load (default "main"). It is pinned to
        its commit before loading, and ``hub_id@commit`` recorded as the model id.
    device : str, default="cpu"
        e.g. "cuda", "cuda:1".
    dtype : {"float32", "float16", "bfloat16", "float64"}, default="float32"
    attn_implementation : str, default="eager"
        Eager attention is deterministic and what the parity tests compare against.
    device_map : str or dict, optional
        Spread the model over the devices with accelerate instead of moving it to
        ``device``: "auto" (fill the GPUs in order, then the CPU, then ``offload_folder``),
        "balanced", "sequential", or a mapping of module names to devices ("cuda:0",
        "cpu", "disk"). Capture, export and interventions work wherever the layers are.
    offload_folder : str, optional
        Where layers mapped to "disk" are kept.

    Returns
    -------
    (model, tokenizer)
        The tokenizer has a pad token (the EOS token when it had none); the model carries
        its id as ``model.somp_ref_model_id``.

    Raises
    ------
    ModelLoadError
        The model cannot be found, fetched or loaded (see :func:`resolve_model`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if device_map is not None and device != "cpu":
        raise ValueError(f"give a device ({device!r}) or a device map, not both")
    source = resolve_model(name_or_path, revision)  # before torch: a bad name fails fast
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pinned = {"revision": source.revision} if source.revision else {}
    if device_map is not None:
        pinned |= {"device_map": device_map, "offload_folder": offload_folder}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **pinned)
        model = AutoModelForCausalLM.from_pretrained(
            source.path,
            dtype=getattr(torch, dtype),
            attn_implementation=attn_implementation,
            **pinned,
        )
    except (OSError, ValueError, ImportError) as err:  # transformers' and the hub's "cannot
        # load", and a backend it needs that is not installed (flash_attention_2, ...)
        raise ModelLoadError(f"could not load model {name_or_path!r}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device_map is None:
        model.to(device)
    model.eval()
    model.somp_ref_model_id = source.model_id
    return model, tokenizer
