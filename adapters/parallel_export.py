"""Data-parallel export: under ``torchrun`` or ``accelerate launch`` each process exports its
contiguous block of the prompts to a shard ``OUT.shard-R-of-W``, and process 0 merges the
shards, in order, into ``OUT`` once all are done (a gloo barrier)."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from somp_ref.store import ActivationStore, StoreError
from somp_ref.store.merging import merge_stores, shard_path
from somp_ref.store.replacing import remove_store_dir


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process in a data-parallel launch: from an initialised
    ``torch.distributed`` group, else ``RANK`` / ``WORLD_SIZE`` (which ``torchrun`` and
    ``accelerate launch`` set); (0, 1) for a plain run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard_bounds(n: int, world: int) -> list[tuple[int, int]]:
    """Contiguous blocks of ``n`` prompts for ``world`` processes, sizes differing by at
    most one, in order (the merged store keeps the prompts' order)."""
    edges = [n * rank // world for rank in range(world + 1)]
    return list(itertools.pairwise(edges))


def export_in_shards(
    export_here: Callable[..., ActivationStore],
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    out: str | Path,
    rank: int,
    world: int,
    **options: Any,
) -> ActivationStore | None:
    """Export this process's block of ``records`` to its shard with ``export_here`` (the
    one-process export, called as ``export_here(model, tokenizer, records, shard,
    **options)``); then, on rank 0 once every process is done, merge the shards into
    ``out`` and remove them.

    Returns
    -------
    ActivationStore or None
        The merged store; None when the shards are on machines this one cannot see (rank 0
        then prints the ``somp-ref store merge`` line to run).
    """
    import datetime

    import torch.distributed as dist

    shards_left = any(shard_path(out, r, world).exists() for r in range(world))
    if options.get("resume") and _is_complete(Path(out)) and not shards_left:
        # Merged before (the merge removes the shards); with shards left, the store at
        # out is an older one that an interrupted --overwrite is replacing.
        print(f"{out}: already complete, nothing to resume", file=sys.stderr)
        return ActivationStore.open(out)
    started = False
    if not dist.is_initialized():  # torchrun / accelerate launch: the env:// rendezvous
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=1))
        started = True
    try:
        bounds = shard_bounds(len(records), world)
        start, end = bounds[rank]
        shard = shard_path(out, rank, world)
        resume = options.pop("resume")
        if end > start:
            # A shard finished before is checked (same model and inputs) and kept.
            export_here(
                model,
                tokenizer,
                records[start:end],
                shard,
                resume=resume and shard.exists(),
                **options,
            )
        dist.barrier()
        shards = [shard_path(out, r, world) for r, (a, b) in enumerate(bounds) if b > a]
        unseen = [str(path) for path in shards if not path.exists()]
        if rank == 0 and unseen:  # several machines without a shared file system
            print(
                f"{len(unseen)} shards were written on other machines ({unseen[0]}, ...): "
                f"{out} is not written; copy them beside it and run: somp-ref store merge "
                + " ".join(str(path) for path in shards)
                + f" --out {out}",
                file=sys.stderr,
            )
        elif rank == 0:
            merge_stores(
                shards,
                out,
                # resume: an incomplete store left by a merge that was interrupted
                overwrite=options["overwrite"] or (resume and Path(out).exists()),
                show_progress=options["show_progress"],
            )
            for path in shards:
                remove_store_dir(path, None)
                # Its writer lock file: every process is past the barrier, none holds it.
                (path.parent / f".{path.name}.lock").unlink(missing_ok=True)
        dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()
    return None if unseen else ActivationStore.open(out)


def _is_complete(path: Path) -> bool:
    try:
        ActivationStore.open(path)
    except StoreError:
        return False
    return True
