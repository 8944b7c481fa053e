"""Head ranking at 7B scale: every figure from one run of this script.

A synthetic store shaped like a 7B model (32 heads per layer, d_head 128, d_model 4096,
n = 2000 samples, z stored as float16) and a 1000-atom dictionary, k = 50. By default 8
of the 32 layers, so that the whole run takes a few minutes on 2 cores; every figure is
per layer-sized work, so the ratios are those of 32 layers (``--layers 32`` to check).

Prints, from one run:

* the floor: the unavoidable matmuls (D W_O per layer, E_h Z_h^T per head, with the same
  reads and casts), on all ``--layers``;
* ``rank_heads`` (somp) with criterion l1 and l2 on all ``--layers``, and each time over
  the floor (targets: l1 <= 3, l2 <= 1.5); l1 also with ``workers=2`` (what ``somp-ref
  rank`` runs on 2 cores: the floor's products use every core, a pursuit one);
* the speed-up on 2 cores over one core (l1, this process held to one core and one BLAS
  thread): of one process on both (it overlaps the next heads' products with a pursuit)
  and of ``workers=2`` (target >= 1.7), on the first ``--workers-layers`` layers, 8 by
  default (a pool starts in about a second, which a few layers do not repay);
* with a CUDA GPU: the torch engine's time and the same floor on the GPU (float64, as the
  engine computes; target <= 1.5);
* the peak RSS of this process (target <= 2 GB).

The store is written by a child process (so its memory does not count) into a temporary
directory, and deleted afterwards. Heads are random: z ~ N(0, 1), W_O ~ N(0, 1/d_model).
That is the hardest case for the l1 engine's lazy argmax: no atom stands out, every score
is close to every other. ``--planted F`` makes a fraction F of heads write a few atoms
strongly.

    python benchmarks/bench_heads.py [--layers 8 --heads 32 --n 2000 --atoms 50]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import multiprocessing
import os
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


def gpu_matmuls(store: ActivationStore, atoms: np.ndarray, torch) -> float:
    """The same floor on the GPU, float64 as the torch engine computes, copies included."""
    device = torch.device("cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    D = torch.as_tensor(atoms, device=device)
    dh = store.d_head
    for layer in range(store.n_layers):
        z_layer, o_proj = store.layer(layer)
        projected = D @ torch.as_tensor(np.asarray(o_proj), device=device).double()
        z = torch.as_tensor(np.asarray(z_layer), device=device).double()
        for head in range(store.n_heads):
            projected[:, head * dh : (head + 1) * dh] @ z[:, head].T
    torch.cuda.synchronize()
    return time.perf_counter() - start


@contextlib.contextmanager
def one_core():
    """This thread (and the threads it starts) on one core, BLAS on one thread."""
    from threadpoolctl import threadpool_limits

    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        with threadpool_limits(1):
            yield
    finally:
        os.sched_setaffinity(0, cores)


def timed(store: ActivationStore, ids: np.ndarray, k: int, **options) -> tuple[float, object]:
    start = time.perf_counter()
    scores = rank_heads(store, ids, k, show_progress=False, **options)
    return time.perf_counter() - start, scores


def row(label: str, seconds: float, note: str = "") -> None:
    print(f"{label:<44}{seconds:>9.1f} s{note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--d-head", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--atoms-total", type=int, default=1000, help="dictionary size")
    parser.add_argument("--atoms", type=int, default=50, help="k, SOMP atoms per head")
    parser.add_argument("--planted", type=float, default=0.0)
    parser.add_argument("--workers-layers", type=int, default=8)
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
        k = args.atoms
        floor = unavoidable_matmuls(store, atoms)
        l1, scores = timed(store, ids, k, criterion="l1")
        l1_two, _ = timed(store, ids, k, criterion="l1", workers=2)
        l2, _ = timed(store, ids, k, criterion="l2")
        l2_two, _ = timed(store, ids, k, criterion="l2", workers=2)
        sub = list(range(min(args.workers_layers, args.layers)))
        with one_core():
            one, _ = timed(store, ids, k, criterion="l1", layers=sub)
        overlapped, _ = timed(store, ids, k, criterion="l1", layers=sub)
        two, _ = timed(store, ids, k, criterion="l1", layers=sub, workers=2)
        gpu = None
        if importlib.util.find_spec("torch") is not None:
            import torch

            if torch.cuda.is_available():
                gpu_floor = gpu_matmuls(store, atoms, torch)
                gpu_rank, _ = timed(store, ids, k, criterion="l1", engine="torch", device="cuda")
                gpu = (torch.cuda.get_device_name(), gpu_floor, gpu_rank)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"store: {args.layers} layers x {args.heads} heads, d_head {args.d_head}, "
        f"d_model {args.d_model}, n {args.n}, float16 z (written in {written:.0f} s)"
    )
    print(
        f"dictionary {args.atoms_total} atoms, k {k}, planted fraction "
        f"{args.planted}, mean EV (l1) {np.nanmean(scores.score):.3f}"
    )
    row("unavoidable matmuls (D W_O, E Z^T)", floor)
    row("rank_heads (somp, l1)", l1, f"   ratio {l1 / floor:5.2f} (target <= 3)")
    row("rank_heads (somp, l1), workers=2", l1_two, f"   ratio {l1_two / floor:5.2f}")
    row("rank_heads (somp, l2)", l2, f"   ratio {l2 / floor:5.2f} (target <= 1.5)")
    row("rank_heads (somp, l2), workers=2", l2_two, f"   ratio {l2_two / floor:5.2f}")
    label = f"l1, {len(sub)} layers"
    row(f"{label}, one core", one)
    row(f"{label}, 2 cores, one process", overlapped, f"   speed-up {one / overlapped:4.2f}")
    row(f"{label}, 2 cores, workers=2", two, f"   speed-up {one / two:4.2f} (target >= 1.7)")
    if gpu is None:
        print("torch engine on a GPU: no CUDA device here, not measured")
    else:
        name, gpu_floor, gpu_rank = gpu
        row(f"matmuls on the GPU ({name[:18]})", gpu_floor)
        row(
            "rank_heads (somp, l1, torch, cuda)",
            gpu_rank,
            f"   ratio {gpu_rank / gpu_floor:5.2f} (target <= 1.5)",
        )
    print(f"{'peak RSS of this process':<44}{peak_mb:>9.0f} MB (target <= 2048)")


if __name__ == "__main__":
    main()
