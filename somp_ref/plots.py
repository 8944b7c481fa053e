"""Figures (the ``plot`` extra: matplotlib). Imported only when a plot is asked for."""

from __future__ import annotations

import os

import numpy as np

INSTALL_HINT = "plots need matplotlib: pip install 'somp-ref[plot]'"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return plt


def head_heatmap(
    values: np.ndarray, path: str | os.PathLike, *, title: str, label: str = "explained variance"
) -> None:
    """A layer x head heatmap of ``values`` (n_layers, n_heads) written to ``path`` (PNG)."""
    plt = _pyplot()
    n_layers, n_heads = values.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * n_heads + 2), max(3, 0.22 * n_layers + 1.5)))
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="viridis", origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
