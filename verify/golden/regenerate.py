"""Regenerate the golden vectors from the reference implementation.

    python -m verify.golden.regenerate [--check]

Each case is a small problem that exercises one rule of the contract (DESIGN.md); its file
holds the inputs (H, D), the parameters (metadata), and the outputs of ``somp`` (naive
engine: the oracle), ``matching_pursuit`` and ``logit_lens``. Files are written
deterministically (fixed seeds, sorted keys), so running this script again reproduces them
byte for byte on the same platform. ``--check`` compares instead of writing.
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

HERE = Path(__file__).parent
FORMAT_VERSION = 1
SEED = 20251021


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


def expected(H: np.ndarray, D: np.ndarray, params: dict) -> dict[str, np.ndarray]:
    res = somp(H, D, engine="naive", **params)
    mp_params = {k: v for k, v in params.items()}
    mp = matching_pursuit(H, D, engine="naive", **mp_params)
    lens = logit_lens(H, D, top=3)
    return {
        "H": H,
        "D": D,
        "somp.support": res.support,
        "somp.coef": res.coef,
        "somp.explained_variance": res.explained_variance,
        "somp.residual_norm": res.residual_norm,
        "mp.support": mp.support,
        "mp.coef": mp.coef,
        "mp.explained_variance": mp.explained_variance,
        "lens.indices": lens.indices,
        "lens.logits": lens.logits,
    }, {"somp.stop_reason": res.stop_reason, "mp.stop_reason": mp.stop_reason}


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
        "generator": "python -m verify.golden.regenerate",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="regenerate (or --check) the golden vectors")
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    differ = []
    for name, (H, D, params) in cases().items():
        path = HERE / f"{name}.safetensors"
        if args.check:
            if not path.is_file():
                differ.append(name)
                continue
            with safe_open(path, framework="np") as handle:
                recorded = handle.metadata()
            versions = {key: recorded[key] for key in ("somp_ref", "numpy") if key in recorded}
            if path.read_bytes() != serialize(name, H, D, params, versions):
                differ.append(name)
        else:
            path.write_bytes(serialize(name, H, D, params))
    if args.check:
        print("golden vectors identical" if not differ else f"differ: {', '.join(differ)}")
        return 1 if differ else 0
    print(f"wrote {len(cases())} golden files to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
