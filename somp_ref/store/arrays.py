"""The arrays a writer hands the store, checked before they are written: real numbers of the
expected shape, converted to the stored dtype, and finite once converted."""

from __future__ import annotations

from typing import Any

import numpy as np


def _first_non_finite(
    converted: np.ndarray, original: np.ndarray
) -> tuple[tuple[int, ...], str] | None:
    """Index and description of the first non-finite value of ``converted`` (None when all
    are finite); a value that only overflowed when converted from ``original`` says so."""
    finite = np.isfinite(converted)
    if finite.all():
        return None
    index = tuple(int(i) for i in np.unravel_index(int(np.argmin(finite)), finite.shape))
    found = f"{converted[index]}"
    source = np.float64(original[index])
    if np.isfinite(source):
        found += f" after conversion to {converted.dtype} from {float(source)!r}"
    return index, found


def checked(
    value: Any,
    name: str,
    shape: tuple[int | None, ...],
    dtype: str,
    axes: tuple[str | None, ...],
) -> np.ndarray:
    """``value`` as a C-contiguous ``dtype`` array of ``shape`` (None: any length), finite
    after the conversion.

    Parameters
    ----------
    name : str
        How messages name the array (e.g. ``"layer 3: z"``).
    axes : tuple of str or None, one per axis
        How messages name an index along each axis (None: not named).

    Raises
    ------
    TypeError
        For non-real values.
    ValueError
        For a wrong or empty shape, or a non-finite value (naming the first one's place).
    """
    array = np.asarray(value)
    if array.dtype.kind not in "fiu" and not array.dtype.name.startswith("bfloat16"):
        raise TypeError(f"{name} must be a real numeric array, got dtype {array.dtype}")
    if array.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(array.shape, shape, strict=True)
    ):
        want = ", ".join("n" if s is None else str(s) for s in shape)
        want = f"({want},)" if len(shape) == 1 else f"({want})"
        raise ValueError(f"{name} must have shape {want}, got {array.shape}")
    if 0 in array.shape:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
        converted = np.ascontiguousarray(array, dtype=dtype)
    bad = _first_non_finite(converted, array)
    if bad is not None:
        index, found = bad
        place = ", ".join(f"{axis} {i}" for axis, i in zip(axes, index, strict=True) if axis)
        raise ValueError(f"{name} is not finite at {place} ({found})")
    return converted


def weight_dtype(value: Any) -> str:
    """Weights keep float64 if given float64, else float32 (never narrower)."""
    return "float64" if np.asarray(value).dtype == np.float64 else "float32"
