"""Export overhead on the embedded model, every figure from one run of this script.

Times a plain forward pass over the same batches against ``export_activations`` (hooks,
position selection, copying to numpy, writing the store). Target: export <= 1.1x forward.

    python benchmarks/bench_export.py [--prompts 96 --batch-size 8 --repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from somp_ref.adapters.head_export import export_activations
from somp_ref.adapters.models import load_model
from somp_ref.adapters.prompts import BUILTIN
from somp_ref.adapters.tokenization import encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
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
        f"template, positions=last, float32 CPU, best of {args.repeats}"
    )
    print(f"{'plain forward passes':<28}{forward:>8.2f} s")
    print(f"{'export_activations':<28}{exported:>8.2f} s")
    print(f"{'ratio':<28}{exported / forward:>8.3f}   (target <= 1.1)")


if __name__ == "__main__":
    main()
