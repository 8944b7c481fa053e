"""Regenerate the golden vectors from the reference implementation.

    python -m somp_ref.verify.golden.regenerate [--check]

Each case is a small problem that exercises one rule of the numerical contract
(docs/ARCHITECTURE.md); its file holds the inputs (H, D), the parameters (metadata), and the
outputs of ``somp`` (naive engine: the oracle), ``matching_pursuit`` and ``logit_lens``, and
the margin of every selection step (:mod:`somp_ref.verify.golden.margins`): the generator
refuses a case whose decisions are not clear, so that supports, stop reasons and lens orders
are the same on every machine.
Files are written deterministically (fixed seeds, sorted keys); the floating-point outputs
carry the rounding of the BLAS kernel that computed them, so the bytes are reproducible on
one kernel only. ``--check`` regenerates in memory and compares with the shipped files:
integers and metadata exactly, floats to the contract's tolerances; it also reports whether
the bytes are identical on the kernel at hand.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open

import somp_ref
from somp_ref import logit_lens, matching_pursuit, somp
from somp_ref.verify.golden.margins import (
    CLEAR_MARGIN,
    CLEAR_SPREAD,
    step_margins,
    unclear_steps,
    unclear_stop,
)
from somp_ref.verify.ports import COEF_RTOL, EV_ATOL

HERE = Path(__file__).parent
FORMAT_VERSION = 1
SEED = 20251021
LENS_TOP = 3


def cases() -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    """name -> (H, D, parameters)."""
    rng = np.random.default_rng(SEED)
    out = {}
    # Planted: 3 of 10 orthogonal atoms (random norms) write every sample.
    Q = np.linalg.qr(rng.standard_normal((12, 10)))[0].T * rng.uniform(0.5, 2, (10, 1))
    W = rng.standard_normal((8, 3)) + 2.0 * np.sign(rng.standard_normal((8, 3)))
    out["planted"] = (W @ Q[[1, 4, 7]], Q, {"n_atoms": 6, "center": False})
    # Random, both criteria, centered and not.
    H, D = rng.standard_normal((9, 7)) + 3.0, rng.standard_normal((15, 7))
    for criterion in ("l1", "l2"):
        for center in (True, False):
            name = f"random_{criterion}_{'centered' if center else 'raw'}"
            out[name] = (H, D, {"n_atoms": 5, "center": center, "criterion": criterion})
    out["random_unnormalized"] = (
        H,
        D * rng.uniform(0.2, 3, (15, 1)),
        {"n_atoms": 5, "normalize": False},
    )
    # Rank-deficient dictionary: a duplicate, a multiple (by 2, so that its normalised scores
    # tie with its original bit for bit and the lowest index must win), a sum of two atoms.
    base = rng.standard_normal((4, 8))
    D = np.vstack([base, base[1], 2.0 * base[2], base[0] + base[3]])
    out["rank_deficient"] = (rng.standard_normal((6, 8)), D, {"n_atoms": 8})
    # Zero atoms and zero samples.
    D = rng.standard_normal((6, 5))
    D[[0, 3]] = 0.0
    H = rng.standard_normal((5, 5))
    H[2] = 0.0
    out["zero_rows"] = (H, D, {"n_atoms": 4, "center": False})
    # Exact ties: duplicated axis atoms; the lowest index must win.
    out["ties"] = (
        np.array([[1.0, 1.0, 0.0], [2.0, 2.0, 0.0]]),
        np.vstack([np.eye(3), np.eye(3)]),
        {"n_atoms": 4, "center": False},
    )
    # Early stop by tol.
    out["tol"] = (
        rng.standard_normal((10, 6)),
        rng.standard_normal((12, 6)),
        {"n_atoms": 12, "tol": 0.3},
    )
    # Constant samples: nothing left after centering.
    out["constant"] = (np.tile([1.0, -2.0, 0.5], (4, 1)), np.eye(3), {"n_atoms": 2})
    return out


def expected(
    H: np.ndarray, D: np.ndarray, params: dict
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata entries of one case: inputs, outputs and decision margins.

    Raises
    ------
    AssertionError
        When a decision of the case is not clear (see :mod:`somp_ref.verify.golden.margins`): such a
        case would pin a kernel's rounding, not the contract.
    """
    res = somp(H, D, engine="naive", **params)
    mp = matching_pursuit(H, D, engine="naive", **params)
    lens = logit_lens(H, D, top=LENS_TOP)
    Hc = H - res.mean
    somp_margins = step_margins(Hc, D, res.support, params, refit=True)
    mp_margins = step_margins(Hc, D, mp.support, params, refit=False)
    energies = res.residual_norm**2
    mp_energies = mp.residual_norm**2
    problems = (
        unclear_steps(somp_margins)
        + unclear_steps(mp_margins)
        + unclear_stop(Hc, D, res.support, res.coef, energies, res.stop_reason, params, refit=True)
        + unclear_stop(Hc, D, mp.support, mp.coef, mp_energies, mp.stop_reason, params, refit=False)
        + _unclear_lens(H, D)
    )
    if problems:
        raise AssertionError("; ".join(problems))
    tensors = {
        "H": H,
        "D": D,
        "somp.support": res.support,
        "somp.coef": res.coef,
        "somp.explained_variance": res.explained_variance,
        "somp.residual_norm": res.residual_norm,
        "somp.margin": somp_margins["margin"],
        "somp.spread": somp_margins["spread"],
        "mp.support": mp.support,
        "mp.coef": mp.coef,
        "mp.explained_variance": mp.explained_variance,
        "mp.margin": mp_margins["margin"],
        "mp.spread": mp_margins["spread"],
        "lens.indices": lens.indices,
        "lens.logits": lens.logits,
    }
    return tensors, {"somp.stop_reason": res.stop_reason, "mp.stop_reason": mp.stop_reason}


def _unclear_lens(H: np.ndarray, D: np.ndarray) -> list[str]:
    """The lens's order is clear when neighbouring logits (down to the first dropped one)
    are tied to rounding or clearly apart, in units of ``||x|| max_j ||D_j||``."""
    problems = []
    unit = np.linalg.norm(H, axis=1) * np.max(np.linalg.norm(D, axis=1))
    top = np.sort(H @ D.T, axis=1)[:, ::-1][:, : LENS_TOP + 1]
    gaps = (top[:, :-1] - top[:, 1:]) / np.maximum(unit, np.finfo(float).tiny)[:, None]
    unclear = (gaps > CLEAR_SPREAD) & (gaps < CLEAR_MARGIN)
    if unclear.any():
        problems.append(f"lens: {int(unclear.sum())} neighbouring logits near the tie window")
    return problems


def serialize(
    name: str, H: np.ndarray, D: np.ndarray, params: dict, versions: dict[str, str] | None = None
) -> bytes:
    """The file's bytes. ``versions`` overrides the recorded package versions (``--check``
    reuses the existing file's, so only data and structure are compared)."""
    tensors, reasons = expected(H, D, params)
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "case": name,
        "params": json.dumps(params, sort_keys=True),
        "generator": "python -m somp_ref.verify.golden.regenerate",
        "somp_ref": somp_ref.__version__,
        "numpy": np.__version__,
        "seed": str(SEED),
        **reasons,
        **(versions or {}),
    }
    return deterministic_safetensors(tensors, metadata)


_DTYPES = {np.dtype(np.float64): "F64", np.dtype(np.int64): "I64"}


def deterministic_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A safetensors file whose header has sorted keys (the safetensors library orders
    metadata by hash, so its bytes vary from run to run). Little-endian, header padded with
    spaces to 8 bytes, tensors in name order: a valid file for any safetensors reader."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": _DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


#: How far a regenerated case may differ from the shipped file. Integers (supports, lens
#: order) and metadata must be equal; floats carry the rounding of the kernel that computed
#: them. Inputs: the planted case's orthogonal atoms come from LAPACK's QR, exact to a few
#: eps. Outputs: the contract's tolerances (somp_ref.verify.ports). Margins are differences of
#: scores in noise-scale units, exact to ~1e-13; spreads are below 1e-12 by construction.
INPUT_RTOL = 1e-14
MARGIN_ATOL = 1e-10
LOGIT_RTOL = 1e-12


def _tolerance(key: str) -> tuple[str, float]:
    """(kind, tolerance) of one tensor: "exact", "relative" (to the largest entry) or
    "absolute"."""
    if key.endswith((".support", ".indices")):
        return "exact", 0.0
    if key in ("H", "D"):
        return "relative", INPUT_RTOL
    if key.endswith(".coef"):
        return "relative", COEF_RTOL
    if key.endswith((".explained_variance",)):
        return "absolute", EV_ATOL
    if key.endswith(".residual_norm"):
        return "relative", EV_ATOL
    if key == "lens.logits":
        return "relative", LOGIT_RTOL
    return "absolute", MARGIN_ATOL  # margins and spreads


def compare(recorded: dict[str, np.ndarray], fresh: dict[str, np.ndarray]) -> list[str]:
    """The tensors of a regenerated case that differ beyond their tolerance."""
    if set(recorded) != set(fresh):
        return [f"tensors {sorted(set(recorded) ^ set(fresh))} present in only one"]
    differ = []
    for key in sorted(fresh):
        want, got = recorded[key], fresh[key]
        kind, tol = _tolerance(key)
        if want.shape != got.shape or want.dtype != got.dtype:
            differ.append(f"{key}: {got.dtype}{got.shape} vs {want.dtype}{want.shape}")
        elif kind == "exact" or np.array_equal(want, got):
            if not np.array_equal(want, got):
                differ.append(f"{key}: {got.tolist()} vs {want.tolist()}")
        elif not np.array_equal(np.isinf(want), np.isinf(got)):
            differ.append(f"{key}: infinite entries differ")
        else:
            finite = np.isfinite(want)
            error = float(np.max(np.abs(want[finite] - got[finite]), initial=0.0))
            if kind == "relative":
                error /= max(float(np.max(np.abs(want[finite]), initial=0.0)), 1e-300)
            if error > tol:
                differ.append(f"{key}: error {error:.1e} > {tol:.0e}")
    return differ


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(path, framework="np") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def check(name: str, H: np.ndarray, D: np.ndarray, params: dict) -> tuple[list[str], bool]:
    """Regenerate one case in memory and compare it with the shipped file.

    Returns the differences beyond tolerance and whether the bytes are identical.
    """
    path = HERE / f"{name}.safetensors"
    if not path.is_file():
        return [f"{path.name} is missing"], False
    tensors, metadata = _read(path)
    fresh, reasons = expected(H, D, params)
    differ = compare(tensors, fresh)
    for key, value in reasons.items():
        if metadata.get(key) != value:
            differ.append(f"{key}: {value} vs {metadata.get(key)}")
    versions = {key: metadata[key] for key in ("somp_ref", "numpy") if key in metadata}
    identical = path.read_bytes() == serialize(name, H, D, params, versions)
    return differ, identical


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="regenerate (or --check) the golden vectors")
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare with the shipped files (to tolerance), do not write",
    )
    args = parser.parse_args(argv)
    if not args.check:
        for name, (H, D, params) in cases().items():
            (HERE / f"{name}.safetensors").write_bytes(serialize(name, H, D, params))
        print(f"wrote {len(cases())} golden files to {HERE}")
        return 0
    failed, identical = [], 0
    for name, (H, D, params) in cases().items():
        differ, same_bytes = check(name, H, D, params)
        identical += same_bytes
        if differ:
            failed.append(name)
            print(f"{name}: " + "; ".join(differ))
    total = len(cases())
    print(
        f"golden vectors agree to tolerance: {total - len(failed)} of {total}; "
        f"byte-identical on this BLAS kernel: {identical} of {total}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
