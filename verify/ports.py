"""Check any SOMP implementation against the golden vectors.

Calling convention of a port::

    result = port(H, D, n_atoms, *, center, normalize, criterion, tol)

with H (n_samples, d_model) and D (n_atoms_total, d_model) float64 numpy arrays; ``result``
has ``support`` (t,), ``coef`` (n_samples, t) and ``explained_variance`` (t + 1,) as
attributes or mapping keys (array-likes, e.g. torch tensors, are converted with
``numpy.asarray``). The golden problems have no near-ties: supports must match exactly.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import numpy as np
from safetensors import safe_open

#: Coefficients of a port may differ from the naive oracle by rounding: least-squares
#: solutions of these small, well-conditioned problems (cond < 1e3) agree to ~cond * eps.
COEF_RTOL = 1e-8
#: Explained variance is a ratio of energies in [0, 1]; rounding only.
EV_ATOL = 1e-10
DEFAULTS = {"center": True, "normalize": True, "criterion": "l1", "tol": 0.0}


@dataclass
class CaseReport:
    """The outcome of one golden case."""

    case: str
    passed: bool
    detail: str


def golden_cases() -> dict[str, tuple[dict[str, np.ndarray], dict[str, str]]]:
    """name -> (tensors, metadata) of every shipped golden file."""
    folder = files("somp_ref.verify.golden")
    out = {}
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".safetensors"):
            with safe_open(str(entry), framework="np") as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
                out[entry.name[: -len(".safetensors")]] = (tensors, handle.metadata())
    return out


def load_port(spec: str) -> Callable[..., Any]:
    """``package.module:function`` -> the function.

    Raises
    ------
    ModuleNotFoundError
        No such module.
    ValueError
        A malformed ``spec``; a module that fails while it is imported (a syntax error,
        an exception, an import of its own that fails, even ``SystemExit``), naming the
        module and the error; no such attribute.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"a port is 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except ModuleNotFoundError as err:
        if err.name == module_name or module_name.startswith(f"{err.name}."):
            raise  # the port (or its package) is not there
        raise ValueError(
            f"port module {module_name} failed while imported: {_describe(err)}"
        ) from None
    except SyntaxError as err:  # the module's own code: report it, it is not our bug
        where = f" ({err.filename}, line {err.lineno})" if err.filename else ""
        raise ValueError(
            f"port module {module_name} has a syntax error{where}: {err.msg}"
        ) from None
    except BaseException as err:  # noqa: BLE001  (SystemExit too: the command reports it)
        raise ValueError(
            f"port module {module_name} failed while imported: {_describe(err)}"
        ) from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"{module_name} has no attribute {attribute!r}") from None


def _describe(err: BaseException) -> str:
    """``Type: message`` of an exception, on one line."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _field(result: Any, name: str) -> np.ndarray:
    value = result[name] if isinstance(result, dict) else getattr(result, name)
    if hasattr(value, "detach"):  # torch tensors on any device
        value = value.detach().cpu()
    return np.asarray(value)


def check_case(
    port: Callable[..., Any], tensors: dict[str, np.ndarray], metadata: dict[str, str]
) -> tuple[bool, str]:
    params = {**DEFAULTS, **json.loads(metadata["params"])}
    n_atoms = params.pop("n_atoms")
    try:
        result = port(tensors["H"].copy(), tensors["D"].copy(), n_atoms, **params)
        support = _field(result, "support").astype(np.int64)
        coef = _field(result, "coef").astype(np.float64)
        ev = _field(result, "explained_variance").astype(np.float64)
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001  a port may fail in any way (even
        # SystemExit, which must not end the run as a success): this case's result
        return False, f"raised {_describe(err)}"
    want_support = tensors["somp.support"]
    if not np.array_equal(support, want_support):
        return False, f"support {support.tolist()} != {want_support.tolist()}"
    want_coef, want_ev = tensors["somp.coef"], tensors["somp.explained_variance"]
    if coef.shape != want_coef.shape or ev.shape != want_ev.shape:
        return (
            False,
            f"shapes coef {coef.shape}, ev {ev.shape}; want {want_coef.shape}, {want_ev.shape}",
        )
    for name, values in (("coef", coef), ("explained variance", ev)):
        if not np.isfinite(values).all():  # NaN would pass every "error > tol" test
            return False, f"{name} holds NaN or Inf"
    coef_err = float(np.max(np.abs(coef - want_coef), initial=0.0))
    coef_tol = COEF_RTOL * max(1.0, float(np.max(np.abs(want_coef), initial=0.0)))
    ev_err = float(np.max(np.abs(ev - want_ev), initial=0.0))
    if coef_err > coef_tol:
        return False, f"coef max error {coef_err:.2e} > {coef_tol:.1e}"
    if ev_err > EV_ATOL:
        return False, f"explained variance max error {ev_err:.2e} > {EV_ATOL:.0e}"
    return True, f"coef err {coef_err:.1e}, ev err {ev_err:.1e}"


def check_port(port: Callable[..., Any] | str) -> list[CaseReport]:
    """Run a port on every golden case; one report per case."""
    if isinstance(port, str):
        port = load_port(port)
    return [
        CaseReport(name, *check_case(port, tensors, metadata))
        for name, (tensors, metadata) in golden_cases().items()
    ]
