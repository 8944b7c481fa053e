"""Figures (the ``plot`` extra: matplotlib). Imported only when a plot is asked for."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from somp_ref.errors import MissingExtraError
from somp_ref.files import check_output_file, write_bytes_atomically

INSTALL_HINT = "plots need matplotlib: pip install 'somp-ref[plot]'"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as err:  # not installed (a broken install keeps its traceback)
        raise MissingExtraError(INSTALL_HINT) from err
    return plt


def _image_format(path: str | os.PathLike) -> str:
    """The format named by ``path``'s extension (png without one), if matplotlib writes it."""
    from matplotlib.backend_bases import FigureCanvasBase

    kind = Path(path).suffix[1:].lower() or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if kind not in supported:
        raise ValueError(f"{path}: cannot write .{kind} images; use one of {', '.join(supported)}")
    return kind


def check_plot_file(path: str | os.PathLike) -> None:
    """Raise before any work unless a plot can be written to ``path``: matplotlib is
    installed, it writes the format of the extension, and the location is writable."""
    _pyplot()
    _image_format(path)
    check_output_file(path)


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int) -> None:
    """Render ``fig`` in memory, then write it atomically (a failed write keeps the old
    image); the figure is closed either way."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=_image_format(path), dpi=dpi)
    finally:
        _pyplot().close(fig)
    write_bytes_atomically(path, buffer.getvalue())


def head_heatmap(
    values: np.ndarray, path: str | os.PathLike, *, title: str, label: str = "explained variance"
) -> None:
    """A layer x head heatmap of ``values`` (n_layers, n_heads) written to ``path`` (the
    extension's format, PNG without one)."""
    plt = _pyplot()
    n_layers, n_heads = values.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * n_heads + 2), max(3, 0.22 * n_layers + 1.5)))
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="viridis", origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
