"""Vision-language models (LLaVA, Gemma3, Qwen2.5-VL): image inputs, export, and an image
classification helper. Only the language model's heads are hooked; vision towers never are.

Inputs come from the model's processor when one is given (``AutoProcessor``), or are built
here from token ids and an image array (``image_inputs``), which needs no processor files:
that is how the tests drive tiny random models, and how prebuilt inputs are checked. Every
path checks that the input has as many image tokens as the images need, and says so
clearly when it does not (the models themselves fail deep inside their forward).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from somp_ref.adapters.batch_export import export_batches
from somp_ref.adapters.capture import PositionMasks
from somp_ref.adapters.image_tokens import (
    image_token_id,
    image_token_mask,
    vision_family,
)
from somp_ref.adapters.intervene import PositionRule, scale_heads
from somp_ref.adapters.offload import input_device
from somp_ref.errors import MissingExtraError
from somp_ref.head_scores import Head
from somp_ref.store import ActivationStore


def image_tokens_needed(model: Any, inputs: dict[str, Any]) -> int:
    """How many image tokens the images in ``inputs`` occupy in the text.

    LLaVA: one per patch ((image_size / patch_size)^2, plus one with the "full" feature
    strategy, which keeps CLS) per image; Gemma3: ``mm_tokens_per_image`` per image;
    Qwen2.5-VL: ``t * h * w / spatial_merge_size^2`` per image from ``image_grid_thw``.
    """
    name, config = vision_family(model), model.config
    if name == "qwen2_5_vl":
        grid = inputs["image_grid_thw"]
        merge = config.vision_config.spatial_merge_size
        return int(torch.as_tensor(grid).prod(dim=-1).sum()) // merge**2
    n_images = int(inputs["pixel_values"].shape[0])
    if name == "gemma3":
        return n_images * int(config.mm_tokens_per_image)
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    full = getattr(config, "vision_feature_select_strategy", "default") == "full"
    return n_images * (patches + int(full))


def check_image_tokens(model: Any, inputs: dict[str, Any]) -> None:
    """Raise ValueError unless the input has exactly as many image tokens as its images."""
    found = int((inputs["input_ids"] == image_token_id(model)).sum())
    needed = image_tokens_needed(model, inputs)
    if found != needed:
        raise ValueError(
            f"{vision_family(model)}: the input has {found} image tokens (id "
            f"{image_token_id(model)}) but its images need {needed}; build inputs with the "
            "model's processor or somp_ref.adapters.vision.image_inputs"
        )


def _pixels(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(H, W[, 3]) array in [0, 1] or uint8 -> (3, height, width) float, scaled to [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    if np.asarray(image).dtype == np.uint8:
        array = array / 255.0
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
    tensor = torch.nn.functional.interpolate(
        tensor, size=(height, width), mode="bilinear", align_corners=False
    )[0]
    return (tensor - 0.5) / 0.5


def image_inputs(
    model: Any, text_ids: Sequence[int], image: np.ndarray, *, grid: tuple[int, int] = (2, 2)
) -> dict[str, Any]:
    """Model inputs for one image followed by ``text_ids``, without a processor.

    The image is resized to what the vision tower takes and normalised to [-1, 1] (a real
    processor's exact normalisation differs; use it for real checkpoints). ``grid`` is the
    Qwen2.5-VL image size in merge windows (height, width): the image becomes
    ``grid * spatial_merge_size`` patches a side and ``grid[0] * grid[1]`` image tokens.

    Returns
    -------
    dict
        ``input_ids``, ``attention_mask``, ``pixel_values`` and, by family,
        ``token_type_ids`` (Gemma3) or ``image_grid_thw`` (Qwen2.5-VL).
    """
    name, config = vision_family(model), model.config
    image_id = image_token_id(model)
    vision = config.vision_config
    out: dict[str, Any] = {}
    if name == "qwen2_5_vl":
        merge, patch = vision.spatial_merge_size, vision.patch_size
        temporal = vision.temporal_patch_size
        gh, gw = grid[0] * merge, grid[1] * merge
        pixels = _pixels(image, gh * patch, gw * patch)
        frames = pixels[None].repeat(temporal, 1, 1, 1)  # (T, C, H, W): a still image
        channels = frames.shape[1]
        # The Qwen2-VL image processor's patch order: merge windows, then patches in them.
        patches = frames.reshape(
            1, temporal, channels, gh // merge, merge, patch, gw // merge, merge, patch
        )
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        out["pixel_values"] = patches.reshape(gh * gw, channels * temporal * patch * patch)
        out["image_grid_thw"] = torch.tensor([[1, gh, gw]])
        n_image = gh * gw // merge**2
        ids = [config.vision_start_token_id] + [image_id] * n_image + [config.vision_end_token_id]
    else:
        out["pixel_values"] = _pixels(image, vision.image_size, vision.image_size)[None]
        n_image = image_tokens_needed(model, out)
        ids = [image_id] * n_image
        if name == "gemma3":
            ids = [config.boi_token_index, *ids, config.eoi_token_index]
    ids = torch.tensor([ids + [int(t) for t in text_ids]])
    out["input_ids"] = ids
    out["attention_mask"] = torch.ones_like(ids)
    if name == "gemma3":  # image tokens attend to each other bidirectionally
        out["token_type_ids"] = (ids == image_id).long()
    dtype = next(model.parameters()).dtype
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def processor_inputs(processor: Any, model: Any, prompt: str, image: Any) -> dict[str, Any]:
    """Inputs from a real checkpoint's processor (``prompt`` must contain the model's image
    placeholder, as its chat template writes it)."""
    inputs = dict(processor(text=[prompt], images=[image], return_tensors="pt"))
    check_image_tokens(model, inputs)
    return inputs


def _to(inputs: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}


def export_vision(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    out: str | Path,
    *,
    positions: str = "image-mean",
    processor: Any = None,
    dtype: str = "float32",
    overwrite: bool = False,
    show_progress: bool = True,
) -> ActivationStore:
    """Export head activations for image + prompt items, one item per forward pass.

    Parameters
    ----------
    items : sequence of dict
        Each with "prompt" (str) and "image" (array); other fields go to samples.jsonl.
        Alternatively "inputs": prebuilt model inputs (checked for image tokens).
    positions : {"image-mean", "last", "mean", "all", "image", "text"}, default="image-mean"
        Which token positions become sample rows (see
        :func:`somp_ref.adapters.capture.select_positions`); the default is the paper's:
        each head's output averaged over the image patches.
    processor : optional
        The checkpoint's processor; without it, :func:`image_inputs` builds the inputs.
    """
    device = input_device(model)
    image_token_id(model)  # a clear error before the first item

    def batches():
        for item in items:
            if "inputs" in item:
                inputs = dict(item["inputs"])
            elif processor is not None:
                inputs = processor_inputs(processor, model, item["prompt"], item["image"])
            else:
                ids = tokenizer(item["prompt"], add_special_tokens=False)["input_ids"]
                inputs = image_inputs(model, ids, item["image"])
            check_image_tokens(model, inputs)
            record = {k: v for k, v in item.items() if k not in ("image", "inputs")}
            masks = PositionMasks(image=image_token_mask(model, inputs["input_ids"]))
            yield [record], _to(inputs, device), masks

    return export_batches(
        model,
        tokenizer,
        batches(),
        out,
        positions=positions,
        dtype=dtype,
        overwrite=overwrite,
        show_progress=show_progress,
        n_batches=len(items),
        meta={"inputs": "image + text"},
    )


@torch.no_grad()
def classify_images(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    class_names: Sequence[str],
    *,
    prompt: str = "This digit is",
    processor: Any = None,
    alphas: Mapping[Head, float] | None = None,
    positions: PositionRule = "all",
) -> dict[str, Any]:
    """Predict each image's class by scoring the class names as continuations.

    For every item, the log-probability of each " name" after the image and ``prompt`` is
    summed over its tokens; the best name is the prediction.

    Parameters
    ----------
    alphas : mapping of (layer, head) -> float, optional
        Heads scaled while scoring (see :func:`somp_ref.adapters.intervene.scale_heads`);
        default: none.
    positions : str, default="all"
        Where ``alphas`` apply: "all", "image" (the image tokens only), "text" (every other
        token), or any rule :func:`~somp_ref.adapters.intervene.scale_heads` takes.

    Returns
    -------
    dict
        "predictions" (list of str), "accuracy" (float, against each item's "label"),
        "scores" (list of list of float: per item, each class name's log-probability).
    """
    device = input_device(model)
    predictions, all_scores = [], []
    with scale_heads(model, dict(alphas or {}), positions=positions):
        for item in items:
            scores = []
            for name in class_names:
                answer = tokenizer(" " + name, add_special_tokens=False)["input_ids"]
                if processor is not None:
                    inputs = processor_inputs(processor, model, f"{prompt} {name}", item["image"])
                else:
                    text = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                    inputs = image_inputs(model, text + answer, item["image"])
                check_image_tokens(model, inputs)
                logits = model(**_to(inputs, device)).logits[0].float()
                ids = inputs["input_ids"][0].to(device)
                span = range(len(ids) - len(answer), len(ids))
                logp = torch.log_softmax(logits, dim=-1)
                scores.append(sum(float(logp[p - 1, ids[p]]) for p in span))
            predictions.append(class_names[int(np.argmax(scores))])
            all_scores.append(scores)
    labels = [str(item.get("label")) for item in items]
    accuracy = float(np.mean([p == t for p, t in zip(predictions, labels, strict=True)]))
    return {"predictions": predictions, "accuracy": accuracy, "scores": all_scores}


def digits_dataset(n: int = 20, *, size: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """Images of handwritten digits from scikit-learn's bundled 8x8 set, upscaled to
    ``size`` x ``size`` RGB in [0, 1], with their labels ("0".."9")."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as err:
        raise MissingExtraError(
            "the digits data set needs scikit-learn: pip install scikit-learn"
        ) from err
    digits = load_digits()
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(digits.images), size=n, replace=False)
    scale = max(1, size // 8)
    items = []
    for index in chosen:
        gray = np.kron(digits.images[index] / 16.0, np.ones((scale, scale)))
        items.append(
            {
                "image": np.repeat(gray[:, :, None], 3, axis=2),
                "label": str(int(digits.target[index])),
                "index": int(index),
            }
        )
    return items
