"""Export what every head writes, for a set of prompts, into an activation store."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from somp_ref.adapters.capture import (
    PER_PROMPT_RULES,
    PositionMasks,
    capture_z,
    position_mask,
    select_positions,
)
from somp_ref.adapters.model_heads import ModelHeads, model_heads
from somp_ref.adapters.tokenization import encode, prompt_token_mask, real_positions
from somp_ref.progress import progress
from somp_ref.store import ActivationStore

#: The rules a text export offers ("image-mean", "image", "text" need images).
POSITIONS = ("prompt-mean", "last", "mean", "all")


def vocabulary(tokenizer: Any, size: int) -> list[str]:
    """Decoded string of every unembedding row (empty beyond the tokenizer's vocabulary)."""
    known = min(size, len(tokenizer))
    ids = [[i] for i in range(known)]
    backend = getattr(tokenizer, "backend_tokenizer", None)  # Rust: ~15x faster, same strings
    if backend is not None:
        strings = backend.decode_batch(ids, skip_special_tokens=False)
    else:
        strings = tokenizer.batch_decode(ids)
    return strings + [""] * (size - known)


def unembedding(heads: ModelHeads) -> tuple[np.ndarray, np.ndarray | None]:
    """The unembedding (v, d_model) and the final norm's effective weight (d_model,), or
    None for a norm without a weight."""
    weight = heads.unembed.weight.detach().float().cpu().numpy()
    norm = getattr(heads.final_norm, "weight", None)
    if norm is not None:
        norm = norm.detach().float().cpu().numpy() + heads.family.norm_weight_offset
    return weight, norm


def export_activations(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    out: str | Path,
    *,
    positions: str = "prompt-mean",
    batch_size: int = 8,
    chat_template: bool = False,
    dtype: str = "float32",
    padding_side: str = "left",
    overwrite: bool = False,
    show_progress: bool = True,
) -> ActivationStore:
    """Run the prompts through the model and store every head's z at the chosen positions.

    Parameters
    ----------
    model, tokenizer
        A loaded causal LM of a supported family (see :mod:`somp_ref.adapters.families`).
    records : sequence of dict
        One per prompt, each with a "prompt" string; other fields go to samples.jsonl.
    out : path
        The store directory (must not exist unless ``overwrite``).
    positions : {"prompt-mean", "last", "mean", "all"}, default="prompt-mean"
        Which token positions become sample rows (see :func:`select_positions`); the
        default is the paper's: each head's output averaged over the prompt's own tokens.
    batch_size : int, default=8
        Prompts per forward pass; results do not depend on it.
    chat_template : bool, default=False
        Wrap each prompt as a user turn of the tokenizer's chat template.
    dtype : {"float32", "float16"}, default="float32"
        How z is stored.
    padding_side : {"left", "right"}, default="left"
        Results do not depend on it either (position ids count real tokens only).

    Returns
    -------
    ActivationStore
        Opened for reading. If anything fails midway the directory is left marked
        incomplete and will not open as a store.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not records:
        raise ValueError("records must not be empty")
    device = next(model.parameters()).device

    def batches():
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            prompts = [str(r["prompt"]) for r in chunk]
            inputs = encode(
                tokenizer,
                prompts,
                chat_template=chat_template,
                padding_side=padding_side,
                device=device,
            )
            masks = PositionMasks()
            if positions == "prompt-mean":
                masks = PositionMasks(
                    prompt=prompt_token_mask(
                        tokenizer, prompts, inputs, chat_template=chat_template
                    )
                )
            yield chunk, inputs, masks

    return export_batches(
        model,
        tokenizer,
        batches(),
        out,
        positions=positions,
        dtype=dtype,
        overwrite=overwrite,
        show_progress=show_progress,
        n_batches=-(-len(records) // batch_size),
        meta={"chat_template": chat_template},
    )


def export(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | dict[str, Any]],
    path: str | Path,
    *,
    positions: str = "prompt-mean",
    chat_template: bool | None = None,
    **options: Any,
) -> ActivationStore:
    """Export what every head writes for ``prompts`` into a store at ``path``, in one call.

    Parameters
    ----------
    model, tokenizer
    prompts : sequence of str or dict
        Prompt strings, or records with a "prompt" field (other fields are kept).
    path : path
    positions : str, default="prompt-mean"
        The paper's rows: each head's output averaged over the prompt's own tokens.
    chat_template : bool, optional
        Default: wrap prompts in the tokenizer's chat template when it has one.
    **options
        Passed to :func:`export_activations` (batch_size, dtype, overwrite, ...).

    Returns
    -------
    ActivationStore
    """
    records = [p if isinstance(p, dict) else {"prompt": p} for p in prompts]
    if chat_template is None:
        chat_template = getattr(tokenizer, "chat_template", None) is not None
    return export_activations(
        model,
        tokenizer,
        records,
        path,
        positions=positions,
        chat_template=chat_template,
        **options,
    )


@torch.no_grad()
def export_batches(
    model: Any,
    tokenizer: Any,
    batches: Iterable[tuple[Sequence[dict[str, Any]], dict[str, Any], Any]],
    out: str | Path,
    *,
    positions: str = "last",
    dtype: str = "float32",
    overwrite: bool = False,
    show_progress: bool = True,
    n_batches: int | None = None,
    meta: dict[str, Any] | None = None,
) -> ActivationStore:
    """Export from prebuilt model inputs: each batch is ``(records, inputs, masks)`` with
    ``inputs`` passed as ``model(**inputs)`` (an ``attention_mask`` is required) and
    ``masks`` the :class:`PositionMasks` the positions rule needs (prompt or image tokens).

    Heads' contributions are stored as factors: z (normalised under an attention-output
    norm, see :mod:`somp_ref.adapters.capture`) and the matching effective o_proj weight.
    """
    heads = model_heads(model)
    # On any error the with block releases the writer lock (an interrupted overwrite leaves
    # the old store as it was; a new store stays incomplete and never opens as complete).
    with ActivationStore.create(
        out,
        n_layers=heads.n_layers,
        n_heads=heads.n_heads,
        d_head=heads.d_head,
        d_model=heads.d_model,
        dtype=dtype,
        overwrite=overwrite,
        meta={
            "model_id": getattr(model, "somp_ref_model_id", None)
            or getattr(model.config, "_name_or_path", "unknown"),
            "family": heads.family.name,
            "positions": positions,
            "hook": "o_proj input (hook_z)",
            "contribution": "post-attention-norm share"
            if heads.attn_out_norms is not None
            else "z @ W_O[:, head]^T",
            "model_dtype": str(next(model.parameters()).dtype),
            **(meta or {}),
        },
    ) as store:
        per_layer: list[list[np.ndarray]] = [[] for _ in range(heads.n_layers)]
        samples: list[dict[str, Any]] = []
        with capture_z(model, contributions=True) as captured:
            for records, inputs, masks in progress(
                batches, desc="export (batches)", enabled=show_progress, total=n_batches
            ):
                model(**inputs, use_cache=False)
                mask = inputs["attention_mask"]
                for layer in range(heads.n_layers):
                    rows = select_positions(captured[layer], mask, positions, masks)
                    per_layer[layer].append(rows.float().cpu().numpy().astype(dtype))
                samples += _sample_records(records, inputs, tokenizer, positions, masks)
        for layer, module in enumerate(
            progress(heads.o_proj, desc="write layers", enabled=show_progress)
        ):
            bias = None if module.bias is None else module.bias.detach().float().cpu().numpy()
            store.write_layer(
                layer,
                z=np.concatenate(per_layer[layer]),
                o_proj=heads.effective_o_proj(layer).cpu().numpy(),
                bias=bias,
            )
            per_layer[layer] = []
        unembed, final_norm = unembedding(heads)
        store.write_unembed(unembed, final_norm, vocab=vocabulary(tokenizer, unembed.shape[0]))
        store.write_samples(samples)
    print(
        f"wrote {store.path}: {store.n_samples} rows x {heads.n_layers} layers x "
        f"{heads.n_heads} heads",
        file=sys.stderr,
    )
    return ActivationStore.open(out)


def _sample_records(
    records: Sequence[dict[str, Any]],
    inputs: dict[str, Any],
    tokenizer: Any,
    positions: str,
    masks: PositionMasks,
) -> list[dict[str, Any]]:
    """One record per stored row; with a per-token rule, one per kept token."""
    if positions in PER_PROMPT_RULES:
        return [dict(r) for r in records]
    rows = []
    real_index = real_positions(inputs["attention_mask"])
    kept = position_mask(inputs["attention_mask"], positions, masks)
    for row, (record, ids, keep) in enumerate(zip(records, inputs["input_ids"], kept, strict=True)):
        for index in keep.nonzero().squeeze(-1).tolist():
            rows.append(
                {
                    **record,
                    "position": int(real_index[row, index]),
                    "token": tokenizer.decode([int(ids[index])]),
                }
            )
    return rows
