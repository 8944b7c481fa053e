"""What a store directory is made of: the format's name and version, its file names, which
names are its parts, and the error every store module raises."""

from __future__ import annotations

import re

from somp_ref.errors import UserError

FORMAT = "somp_ref.activation_store"
FORMAT_VERSION = 1
META_FILE = "meta.json"
UNEMBED_FILE = "unembed.safetensors"
SAMPLES_FILE = "samples.jsonl"
STORE_DTYPES = ("float16", "float32", "float64")
#: meta.json's key, in a resumable replacement (``create(overwrite=True, resumable=True)``),
#: holding the SHA-256 of the meta.json of the store it replaces.
REPLACING = "replacing"

# Layer indexes are below the schema's bound on n_layers, 4096: 3 or 4 digits.
_LAYER_NAME = re.compile(r"layer_([0-9]{3,4})\.safetensors")


class StoreError(UserError):
    """A store that is missing, partial, corrupt, of another version, or misused."""


def layer_file(layer: int) -> str:
    """File name of one layer's tensors."""
    return f"layer_{layer:03d}.safetensors"


def is_part_name(name: str, n_layers: int | None) -> bool:
    """Whether ``name`` is a part of a store of ``n_layers`` layers (any count if None).

    Checked by pattern and range, so an absurd ``n_layers`` costs nothing.
    """
    if name in (UNEMBED_FILE, SAMPLES_FILE):
        return True
    match = _LAYER_NAME.fullmatch(name)
    if match is None or layer_file(int(match[1])) != name:  # one spelling per layer
        return False
    return n_layers is None or int(match[1]) < n_layers
