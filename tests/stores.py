"""Synthetic activation stores for the tests: random heads, some planted to write a concept."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from somp_ref.store import ActivationStore


def write_planted_store(
    path: Path,
    *,
    n_layers: int = 3,
    n_heads: int = 4,
    d_head: int = 6,
    d_model: int = 24,
    vocab: int = 60,
    n_samples: int = 40,
    concept: tuple[int, ...] = (3, 7, 11, 19, 23),
    planted: tuple[tuple[int, int], ...] = ((1, 2), (2, 0)),
    seed: int = 0,
    dtype: str = "float32",
) -> ActivationStore:
    """A complete store whose ``planted`` heads write (mostly) the ``concept`` tokens.

    A planted head's o_proj columns span directions of concept tokens, so its contribution
    ``z W_O,h^T`` is a combination of concept atoms plus a little noise; other heads get
    random columns. The vocabulary strings are ``tok0, tok1, ...`` with the concept tokens
    named ``red, green, ...``.
    """
    rng = np.random.default_rng(seed)
    unembed = rng.standard_normal((vocab, d_model))
    names = [f"tok{i}" for i in range(vocab)]
    for token, name in zip(concept, ["red", "green", "blue", "yellow", "purple"], strict=False):
        names[token] = name
    store = ActivationStore.create(
        path,
        n_layers=n_layers,
        n_heads=n_heads,
        d_head=d_head,
        d_model=d_model,
        meta={"model_id": "synthetic", "positions": "last"},
        dtype=dtype,
    )
    for layer in range(n_layers):
        z = rng.standard_normal((n_samples, n_heads, d_head))
        o_proj = rng.standard_normal((d_model, n_heads * d_head)) / np.sqrt(d_model)
        for lay, head in planted:
            if lay == layer:
                mix = rng.standard_normal((len(concept), d_head))
                cols = slice(head * d_head, (head + 1) * d_head)
                o_proj[:, cols] = unembed[list(concept)].T @ mix / np.sqrt(d_model)
                o_proj[:, cols] += 0.01 * rng.standard_normal((d_model, d_head))
        store.write_layer(layer, z=z, o_proj=o_proj)
    store.write_unembed(unembed, final_norm=np.ones(d_model), vocab=names)
    store.write_samples([{"prompt": f"prompt {i}", "split": "train"} for i in range(n_samples)])
    store.close()
    return ActivationStore.open(path)
