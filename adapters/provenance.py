"""A loaded model's weights fingerprint: what a store and its rankings record of the model,
so that a ranking is not applied to another model unawares
(:func:`somp_ref.provenance.check_same_model`)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from somp_ref.adapters.model_heads import model_heads
from somp_ref.adapters.offload import materialized


def model_fingerprint(model: Any) -> str:
    """SHA-256 of what head rankings and interventions depend on: every layer's effective
    o_proj weight and the unembedding, as float32 whatever dtype the model was loaded in
    (a model loaded in bfloat16 and in float32 agree when its weights are bfloat16).
    Computed once per model (seconds for a 7B model on a CPU) and cached on it."""
    cached = getattr(model, "somp_ref_fingerprint", None)
    if cached is not None:
        return cached
    heads = model_heads(model)
    digest = hashlib.sha256()
    for layer in range(heads.n_layers):
        digest.update(np.ascontiguousarray(heads.effective_o_proj(layer).cpu().numpy()).data)
    unembed = materialized(heads.unembed, "weight").float().cpu().numpy()
    digest.update(np.ascontiguousarray(unembed).data)
    model.somp_ref_fingerprint = digest.hexdigest()
    return model.somp_ref_fingerprint
