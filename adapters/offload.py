"""Models spread over devices by accelerate: where inputs go, and reading weights it has
offloaded.

Under a device map (``from_pretrained(..., device_map="auto")``) layers that do not fit on
the accelerators are offloaded to the CPU or the disk: their parameters sit on the "meta"
device and accelerate's hook on the module (``module._hf_hook``) keeps the real tensors in
its ``weights_map``, loading them for each forward. Export reads weights outside any
forward (o_proj, the final norm, the unembedding), so it reads them from there.
"""

from __future__ import annotations

from typing import Any

import torch


def materialized(module: Any, name: str) -> torch.Tensor:
    """``module``'s parameter or buffer ``name``, detached, wherever its values are: on its
    device, or in the weights map of an accelerate offload hook.

    Raises
    ------
    RuntimeError
        When the tensor is on the meta device and no hook holds its values.
    """
    tensor = getattr(module, name).detach()
    if tensor.device.type != "meta":
        return tensor
    hook = getattr(module, "_hf_hook", None)
    for candidate in (hook, *getattr(hook, "hooks", ())):  # a SequentialHook holds several
        weights = getattr(candidate, "weights_map", None)
        if weights is not None and name in weights:
            return torch.as_tensor(weights[name]).detach()
    raise RuntimeError(
        f"{type(module).__name__}.{name} is on the meta device and no accelerate hook holds "
        "its values: the model was not fully loaded"
    )


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: its input embedding's device (under an accelerate device
    map, the device that layer executes on, even when its weights are offloaded)."""
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    device = embedding.weight.device
    return torch.device("cpu") if device.type == "meta" else device
