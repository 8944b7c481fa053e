"""A store's data as a ranking reads it: token ids and values checked, layers one at a time.

Stores refuse non-finite values when written; one that holds them was altered or written by
other code, and no score computed from it would mean anything, so every read here names the
first NaN/Inf it meets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from somp_ref.factored import rescaled
from somp_ref.store import ActivationStore, StoreError

#: Samples of a layer's z checked finite at a time (4096 x 32 heads x 128: 16 MB of
#: booleans).
_FINITE_BLOCK = 4096


def check_token_ids(token_ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """Validated token ids as int64 (n,), duplicates dropped, order kept."""
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D list, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"token_ids must be integers, got dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(
            f"token_ids must be in [0, {vocab_size}) (the unembedding's rows), got {bad[:5]}"
        )
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)].astype(np.int64)


def check_finite(values: np.ndarray, store: ActivationStore, what: str) -> np.ndarray:
    """``values`` unchanged, or a StoreError naming the first NaN/Inf entry."""
    bad = ~np.isfinite(values)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise StoreError(
            f"{store.path}: {what} holds {values[index]} at {index}; the store is corrupt"
        )
    return values


def checked_atoms(
    store: ActivationStore, token_ids: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The dictionary a ranking pursues over: (ids, atoms), the token ids checked as
    :func:`check_token_ids` checks them, int64 (t,), and the unembedding's rows for them in
    float64 (t, d_model), checked finite."""
    unembed = store.unembed()
    ids = check_token_ids(token_ids, unembed.shape[0])
    atoms = np.asarray(unembed[ids], dtype=np.float64)
    finite = np.isfinite(atoms).all(axis=1)
    if not finite.all():  # name the vocabulary's row, not the position in the dictionary
        row = int(np.argmin(finite))
        check_finite(atoms[row], store, f"unembed row {int(ids[row])} (token id, d_model)")
    return ids, atoms


def _all_finite(z: np.ndarray) -> bool:
    """Whether every value of a layer's z (n, heads, d_head) is finite, read in its stored
    order a block of samples at a time (head by head, the reads would be strided: seven
    times slower on a 7B layer, and the temporaries stay at one block)."""
    return all(
        np.isfinite(z[start : start + _FINITE_BLOCK]).all()
        for start in range(0, z.shape[0], _FINITE_BLOCK)
    )


def checked_layers(
    store: ActivationStore, chosen: list[int]
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (layer, z (n, heads, d_head) as stored, o_proj (d_model, heads * d_head) in
    float64 with each head's columns rescaled into the safe range, each head's exponent
    (heads,)), every value checked finite.

    Each head gets its own power of two: with one for the layer, a head whose weights are
    1e200 times its neighbour's would push the neighbour's products below float64's range
    (its score 0 and its support empty). Inside the safe range nothing is copied.
    """
    for layer in chosen:
        z, o_proj = store.layer(layer)
        if not _all_finite(z):  # name the first head that holds a NaN/Inf
            for head in range(store.n_heads):
                check_finite(z[:, head], store, f"layer {layer}, head {head}: z (sample, d_head)")
        o_proj = check_finite(np.asarray(o_proj, dtype=np.float64), store, f"layer {layer}: o_proj")
        n_heads, d_head = z.shape[1:]
        heads = [rescaled(o_proj[:, h * d_head : (h + 1) * d_head]) for h in range(n_heads)]
        exponents = np.array([exponent for _, exponent in heads], dtype=np.int64)
        if exponents.any():
            o_proj = np.concatenate([block for block, _ in heads], axis=1)
        yield layer, z, o_proj, exponents
