"""SOMP speed on the issue's reference size, every figure from one run of this script.

n=2000 samples, d=4096, v=1000 atoms, k=50, float64, fixed seed. Prints the floor (one
matmul H D^T, which any SOMP must do), the naive and fast engines, SPAMS's somp when the
optional package ``spams-bin`` is installed, and the ratios. Targets: fast <= 3x floor,
fast <= 0.5x SPAMS, fast >= 30x faster than naive.

    python benchmarks/bench_somp.py [--n 2000 --d 4096 --v 1000 --k 50 --repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from somp_ref import somp


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def spams_somp(H: np.ndarray, D: np.ndarray, k: int):
    """SPAMS's somp on the same problem, or None when spams-bin is not installed."""
    try:
        import spams
    except ImportError:
        return None
    X = np.asfortranarray(H.T)
    atoms = D / np.linalg.norm(D, axis=1, keepdims=True)  # SPAMS wants unit-norm atoms
    Dmat = np.asfortranarray(atoms.T)
    groups = np.array([0], dtype=np.int32)  # one group: all samples share the support
    return lambda: spams.somp(X, Dmat, groups, L=k, eps=0.0, numThreads=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--v", type=int, default=1000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    H = rng.standard_normal((args.n, args.d))
    D = rng.standard_normal((args.v, args.d))

    floor, _ = best_time(lambda: H @ D.T, args.repeats)
    fast, fast_res = best_time(lambda: somp(H, D, args.k), args.repeats)
    naive, naive_res = best_time(lambda: somp(H, D, args.k, engine="naive"), 1)
    same = np.array_equal(fast_res.support, naive_res.support)
    rows = [
        ("floor: one matmul H D^T", floor),
        ("somp engine='fast'", fast),
        ("somp engine='naive'", naive),
    ]
    run_spams = spams_somp(H, D, args.k)
    spams_time = None
    if run_spams is not None:
        spams_time, _ = best_time(run_spams, args.repeats)
        rows.append(("SPAMS somp (spams-bin)", spams_time))

    print(f"n={args.n} d={args.d} v={args.v} k={args.k} float64, best of {args.repeats}")
    print(f"{'what':<28}{'seconds':>10}")
    for name, seconds in rows:
        print(f"{name:<28}{seconds:>10.3f}")
    print()
    print(f"fast / floor  = {fast / floor:6.2f}   (target <= 3)")
    print(f"naive / fast  = {naive / fast:6.1f}   (target >= 30)")
    if spams_time is None:
        print("fast / SPAMS  =    n/a   (spams-bin not installed: pip install spams-bin)")
    else:
        print(f"fast / SPAMS  = {fast / spams_time:6.2f}   (target <= 0.5)")
    print(f"fast and naive supports identical: {same}")


if __name__ == "__main__":
    main()
