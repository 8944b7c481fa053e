"""Boundary checks for the public functions.

Every public entry point validates its arguments here, once; the kernels behind it trust
what they receive. Errors name the argument, what was expected and what came.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np

from somp_ref.errors import InputTypeError

# Narrow float formats that numpy has no native kind for (ml_dtypes registers them as
# kind 'V'); they are widened to float64 like float16 is.
_EXTENSION_FLOATS = ("bfloat16", "float8")


def as_matrix(value: Any, name: str) -> np.ndarray:
    """Return ``value`` as a finite, non-empty 2-D float64 array.

    No copy is made when ``value`` already is float64; read-only and non-contiguous
    arrays are accepted as they are.

    Raises
    ------
    InputTypeError
        A TypeError: the dtype is not real numeric (bool, complex, object, strings).
    ValueError
        When the array is not 2-D, has a zero-length axis, or holds NaN/Inf.
    """
    array = np.asarray(value)
    dtype = array.dtype
    widenable = dtype.kind in "fiu" or dtype.name.startswith(_EXTENSION_FLOATS)
    if not widenable:
        raise InputTypeError(f"{name} must hold real numbers (float or integer), got dtype {dtype}")
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got {array.ndim}-D with shape {array.shape}")
    if 0 in array.shape:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")
    array = array.astype(np.float64, copy=False)
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"{name} must be finite, found {bad} NaN/Inf entries")
    return array


def check_same_width(left: np.ndarray, right: np.ndarray, names: tuple[str, str]) -> None:
    """Raise ValueError unless both matrices have the same number of columns (d_model)."""
    if left.shape[1] != right.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same number of columns (d_model), "
            f"got {names[0]}.shape={left.shape} and {names[1]}.shape={right.shape}"
        )


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an int >= 1, rejecting bools and non-integers."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputTypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_choice(value: Any, name: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ValueError listing them."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r:.60}"
        )
    return value


def check_flag(value: Any, name: str) -> bool:
    """Return ``value`` as a bool, accepting only True and False (numpy's too).

    ``center="no"`` is truthy and ``normalize=None`` falsy: both would silently run the
    opposite of what their author meant, so anything but a boolean is refused.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise InputTypeError(
            f"{name} must be True or False, got {type(value).__name__} {value!r:.60}"
        )
    return bool(value)


def check_real(value: Any, name: str) -> float:
    """Return ``value`` as a float, accepting real numbers only (no bool, no string)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name} must be a number, got {type(value).__name__} {value!r:.60}")
    return float(value)


def check_tolerance(value: Any, name: str = "tol") -> float:
    """Return ``value`` as a float in [0, 1) (a fraction of the signal energy)."""
    tol = check_real(value, name)
    if not 0.0 <= tol < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {tol}")
    return tol
