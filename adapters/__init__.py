"""Torch + transformers adapters (the ``hf`` extra): load models, export what each head
writes into an activation store, and scale heads at inference.

The Python API in three calls::

    from somp_ref import rank, top_heads
    from somp_ref.adapters import export, steer

    store = export(model, tokenizer, prompts, "runs/colors")
    scores = rank(store, "colors")
    with steer(model, top_heads(scores, 8), alpha=-1):
        ...

The names below load on first use, so that importing the package (as the command line
does) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: Public name -> the module that defines it.
_API = {
    "export": "somp_ref.adapters.head_export",
    "export_activations": "somp_ref.adapters.head_export",
    "steer": "somp_ref.adapters.intervene",
    "scale_heads": "somp_ref.adapters.intervene",
    "generate": "somp_ref.adapters.generation",
    "load_model": "somp_ref.adapters.models",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'somp_ref.adapters' has no attribute {name!r}")
    return getattr(import_module(_API[name]), name)
