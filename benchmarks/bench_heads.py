"""Head ranking at 7B scale, every figure from one run of this script.

A synthetic store shaped like a 7B model (32 layers x 32 heads, d_head 128, d_model 4096,
n = 2000 samples, z stored as float16) and a 1000-atom dictionary, k = 50. Prints the time
of the unavoidable matmuls (D W_O per layer, E_h Z_h^T per head), the full ``rank_heads``
time, their ratio, and the peak RSS of the ranking process. Targets: ratio <= 1.5,
peak RSS <= 2 GB.

The store is written by a child process (so its memory does not count) into a temporary
directory, and deleted afterwards. Heads are random: z ~ N(0, 1), W_O ~ N(0, 1/d_model).
That is the hardest case for the lazy argmax: no atom stands out, every score is close to
every other. ``--planted F`` makes a fraction F of heads write a few atoms strongly.

    python benchmarks/bench_heads.py [--layers 32 --heads 32 --n 2000 --atoms 50]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from somp_ref.heads import rank_heads
from somp_ref.store import ActivationStore


def write_store(path: str, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    dh, dm = args.d_head, args.d_model
    unembed = rng.standard_normal((args.vocab, dm)).astype(np.float32)
    with ActivationStore.create(
        path, n_layers=args.layers, n_heads=args.heads, d_head=dh, d_model=dm, dtype="float16"
    ) as store:
        for layer in range(args.layers):
            z = rng.standard_normal((args.n, args.heads, dh), dtype=np.float32)
            o_proj = rng.standard_normal((dm, args.heads * dh), dtype=np.float32) / np.sqrt(dm)
            for head in range(args.heads):
                if rng.random() < args.planted:  # write 5 dictionary atoms strongly
                    atoms = unembed[rng.choice(args.atoms_total, 5, replace=False)]
                    cols = slice(head * dh, (head + 1) * dh)
                    o_proj[:, cols] += atoms.T @ rng.standard_normal((5, dh)) / dm
            store.write_layer(layer, z=z, o_proj=o_proj)
        store.write_unembed(unembed)
        store.write_samples([{"prompt": str(i)} for i in range(args.n)])


def unavoidable_matmuls(store: ActivationStore, atoms: np.ndarray) -> float:
    """Seconds for D W_O per layer and E_h Z_h^T per head (with the same reads and casts)."""
    start = time.perf_counter()
    dh = store.d_head
    for layer in range(store.n_layers):
        z_layer, o_proj = store.layer(layer)
        projected = atoms @ np.asarray(o_proj, dtype=np.float64)
        for head in range(store.n_heads):
            z = np.asarray(z_layer[:, head], dtype=np.float64)
            projected[:, head * dh : (head + 1) * dh] @ z.T
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--d-head", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--atoms-total", type=int, default=1000, help="dictionary size")
    parser.add_argument("--atoms", type=int, default=50, help="k, SOMP atoms per head")
    parser.add_argument("--planted", type=float, default=0.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "store")
        start = time.perf_counter()
        child = multiprocessing.get_context("spawn").Process(target=write_store, args=(path, args))
        child.start()
        child.join()
        written = time.perf_counter() - start
        store = ActivationStore.open(path)
        ids = np.arange(args.atoms_total)
        atoms = np.asarray(store.unembed()[ids], dtype=np.float64)
        floor = unavoidable_matmuls(store, atoms)
        start = time.perf_counter()
        scores = rank_heads(store, ids, args.atoms, show_progress=False)
        ranking = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"store: {args.layers} layers x {args.heads} heads, d_head {args.d_head}, "
        f"d_model {args.d_model}, n {args.n}, float16 z (written in {written:.0f} s)"
    )
    print(
        f"dictionary {args.atoms_total} atoms, k {args.atoms}, planted fraction "
        f"{args.planted}, mean EV {np.nanmean(scores.score):.3f}"
    )
    print(f"{'unavoidable matmuls (D W_O, E Z^T)':<38}{floor:>9.1f} s")
    print(f"{'rank_heads (somp, l1)':<38}{ranking:>9.1f} s")
    print(f"{'ratio':<38}{ranking / floor:>9.2f}   (target <= 1.5)")
    print(f"{'peak RSS of this process':<38}{peak_mb:>9.0f} MB (target <= 2048)")


if __name__ == "__main__":
    main()
