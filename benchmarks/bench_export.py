"""Export on the embedded model, every figure from one run of this script.

1. Overhead: a plain forward pass (``model(**batch)``, as a user runs it) over the same
   batches against ``export_activations`` (hooks, position selection, copying to numpy,
   writing the store batch by batch; export skips the full-vocabulary logits, so it may
   beat the plain pass). Target: export <= 1.1x forward.
2. Memory: the peak RSS of two fresh processes that each load the model and export
   ``positions="all"`` (one row per token) for about 2,000 and 20,000 rows. Rows go to disk
   batch by batch, so the peak must stay flat while the store grows tenfold (at SmolLM2's
   shape a row is 69 KB: 20,000 rows are 1.4 GB).

    python benchmarks/bench_export.py [--prompts 96 --batch-size 8 --repeats 3 --rows 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import torch

from somp_ref.adapters.head_export import export_activations
from somp_ref.adapters.models import load_model
from somp_ref.adapters.prompts import BUILTIN
from somp_ref.adapters.tokenization import encode


def _export_rows(rows: int, out: str, queue) -> None:
    """In a child process: load the model, export about ``rows`` token rows, report
    (rows, peak RSS after loading in MB, peak RSS at the end in MB, store MB)."""
    model, tokenizer = load_model("default")
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    words = "red green blue water stone river cloud light".split()
    records, total = [], 0
    while total < rows:  # prompts until their tokens (no template: one row each) reach rows
        prompt = " ".join(words[(len(records) + j) % 8] for j in range(8))
        records.append({"prompt": prompt})
        total += len(tokenizer(prompt)["input_ids"])
    store = export_activations(
        model,
        tokenizer,
        records,
        out,
        positions="all",
        chat_template=False,
        batch_size=32,
        show_progress=False,
    )
    size = sum(f.stat().st_size for f in Path(out).iterdir()) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((store.n_samples, loaded, peak, size))


def memory(rows: int) -> None:
    context = multiprocessing.get_context("spawn")
    print(f"\n{'rows':>8} {'store MB':>9} {'RSS after load MB':>18} {'peak RSS MB':>12}")
    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (rows, 10 * rows):
            queue = context.Queue()
            child = context.Process(target=_export_rows, args=(n, f"{tmp}/s{n}", queue))
            child.start()
            got, loaded, peak, size = queue.get()
            child.join()
            peaks.append(peak)
            print(f"{got:>8} {size:>9.0f} {loaded:>18.0f} {peak:>12.0f}")
    print(f"peak RSS ratio, 10x the rows: {peaks[1] / peaks[0]:.3f}   (target: flat, ~1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=2000, help="rows of the smaller export")
    args = parser.parse_args()
    memory(args.rows)
    model, tokenizer = load_model("default")
    pool = [r["prompt"] for name in ("colors", "neutral") for r in BUILTIN[name]]
    prompts = [pool[i % len(pool)] for i in range(args.prompts)]
    records = [{"prompt": p} for p in prompts]

    @torch.no_grad()
    def forward_only() -> None:
        for start in range(0, len(prompts), args.batch_size):
            batch = encode(tokenizer, prompts[start : start + args.batch_size], chat_template=True)
            model(**batch, use_cache=False)

    def export(tmp: str, i: int) -> None:
        export_activations(
            model,
            tokenizer,
            records,
            Path(tmp) / f"s{i}",
            batch_size=args.batch_size,
            chat_template=True,
            show_progress=False,
        )

    forward_only()  # warm-up
    forward_times, export_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # interleaved, so drifts in machine speed hit both
            start = time.perf_counter()
            forward_only()
            forward_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            export(tmp, i)
            export_times.append(time.perf_counter() - start)
    forward, exported = min(forward_times), min(export_times)
    print(
        f"SmolLM2-135M-Instruct, {args.prompts} prompts, batch {args.batch_size}, chat "
        f"template, positions=prompt-mean (export's default), float32 CPU, best of {args.repeats}"
    )
    print(f"{'plain forward passes':<28}{forward:>8.2f} s")
    print(f"{'export_activations':<28}{exported:>8.2f} s")
    print(f"{'ratio':<28}{exported / forward:>8.3f}   (target <= 1.1)")


if __name__ == "__main__":
    main()
