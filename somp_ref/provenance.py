"""Where a ranking comes from: the model, the store, the concept and the software.

Every ranking records, in its ``source`` (and so in its CSV and JSON files): the store's
model id (``hub_id@commit`` for a hub model, the path of a local one), the fingerprint of
the model's weights that export computed (:func:`somp_ref.adapters.provenance
.model_fingerprint`, a hash of every o_proj and the unembedding), the store's path and
content hash, the concept's name and a hash of its dictionary ids, and the versions of the
packages that computed it. ``generate --heads`` compares the model and the fingerprint
with the model it loads.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from typing import Any

import numpy as np

#: Packages whose versions a ranking records (those installed).
PACKAGES = ("somp-ref", "numpy", "scipy", "safetensors", "torch", "transformers")


def package_versions() -> dict[str, str]:
    """The installed versions of :data:`PACKAGES` (read from their metadata, nothing is
    imported)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def store_content_hash(meta: dict[str, Any]) -> str:
    """SHA-256 over a complete store's recorded file hashes (meta.json's ``files``): it
    changes when any of the store's data does."""
    files = sorted((name, info["sha256"]) for name, info in meta["files"].items())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def ids_hash(token_ids: np.ndarray) -> str:
    """SHA-256 of a dictionary's token ids, in order (as int64 little-endian)."""
    return hashlib.sha256(np.asarray(token_ids, dtype="<i8").tobytes()).hexdigest()


def ranking_source(store: Any, token_ids: np.ndarray) -> dict[str, Any]:
    """The ``source`` of a ranking of ``store`` over the dictionary ``token_ids``."""
    meta = store.meta  # a fresh copy each access: read once
    keys = ("model_id", "model_fingerprint", "family", "positions")
    return {key: meta[key] for key in keys if key in meta} | {
        "store": os.fspath(store.path),
        "store_hash": store_content_hash(meta),
        "dictionary_hash": ids_hash(token_ids),
        "versions": package_versions(),
    }


class ModelMismatchError(ValueError):
    """A ranking made on another model than the one it is applied to."""


def check_same_model(source: dict[str, Any], model_id: str, fingerprint: str | None) -> None:
    """Raise :class:`ModelMismatchError` when a ranking's ``source`` records other weights
    than ``fingerprint`` or, where either has no fingerprint, another model id than
    ``model_id``. The weights decide: the same checkpoint under another path or id is the
    same model. A ranking that records neither passes (nothing to compare: old files)."""
    theirs, their_weights = source.get("model_id"), source.get("model_fingerprint")
    if their_weights is not None and fingerprint is not None:
        if their_weights != fingerprint:
            made_on = f"model {theirs!r}" if theirs != model_id else f"{model_id!r}"
            raise ModelMismatchError(
                f"the ranking was made on {made_on} with other weights ({their_weights[:12]}, "
                f"this one {fingerprint[:12]})"
            )
    elif theirs is not None and theirs != model_id:
        raise ModelMismatchError(f"the ranking was made on model {theirs!r}, not {model_id!r}")
