"""Head interventions: scale what chosen heads write into the residual stream, at every
position or only at some (the prompt, the generated answer, image or text tokens, a mask).

Positions are counted in columns of the padded input, as the KV cache counts them: a
forward that feeds ``n`` tokens on top of a cache holding ``past`` covers columns
``past .. past + n - 1``. Which columns are the prompt is known three ways, in this order:

1. inside ``model.generate`` (wrapped for the duration of :func:`scale_heads`): the columns
   of the input given to ``generate``; every later column holds a generated token, with the
   KV cache or without it (``use_cache=False`` re-feeds the whole sequence each step);
2. inside :func:`generated_from` (teacher forcing): row i's prompt ends where the caller
   says its answer starts;
3. otherwise, the prompt is what a forward without cached keys feeds; tokens fed on top of
   a cache count as generated.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from somp_ref.adapters.model_heads import model_heads
from somp_ref.cli_options import INTERVENE_POSITION_HELP
from somp_ref.head_scores import Head

#: The named position rules; the first is the default (the paper's: every position).
POSITION_RULES = ("all", "prompt", "generated", "image", "text")

#: One line per rule, for docstrings and ``--help``: the text rules' lines are the ones
#: ``--intervene-positions`` shows (kept in the torch-free core, which cannot import this).
POSITION_RULE_HELP = {
    **INTERVENE_POSITION_HELP,
    "image": "image-token positions only (vision-language models)",
    "text": "every position but the image tokens (vision-language models)",
}

#: A rule: a name of POSITION_RULES, a boolean mask of shape (batch, columns), or a
#: callable ``rule(rows, columns)`` of LongTensors of shapes (batch, 1) and (1, n) returning
#: booleans broadcastable to (batch, n).
PositionRule = str | torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_GENERATED_FROM: ContextVar[torch.Tensor | None] = ContextVar("generated_from", default=None)


@contextmanager
def generated_from(columns: Sequence[int] | torch.Tensor) -> Iterator[None]:
    """Declare teacher-forced answers: in the forwards inside the block, row i's tokens from
    column ``columns[i]`` on count as generated, the earlier ones as its prompt.

    Used where the unmodified model's answers are fed back in one forward (the experiment's
    teacher-forced measures), so that ``positions="generated"`` scales the answer's
    positions as generation would have. Without an active :func:`scale_heads` of a
    "prompt" or "generated" rule, it changes nothing.
    """
    token = _GENERATED_FROM.set(torch.as_tensor(columns, dtype=torch.long).reshape(-1))
    try:
        yield
    finally:
        _GENERATED_FROM.reset(token)


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if not hasattr(cache, "get_seq_length"):
        raise TypeError(
            f"position rules need a transformers Cache object, got {type(cache).__name__}"
        )
    return int(cache.get_seq_length())


class _PositionTracker:
    """Works out, at each forward of the model, which (row, column) the rule scales."""

    def __init__(self, model: Any, rule: PositionRule):
        self.rule = rule
        self.signature = inspect.signature(model.forward)
        self.var_keyword = next(
            (
                name
                for name, parameter in self.signature.parameters.items()
                if parameter.kind is inspect.Parameter.VAR_KEYWORD
            ),
            None,
        )
        self.image_mask: Callable[[torch.Tensor], torch.Tensor] | None = None
        if isinstance(rule, str) and rule in ("image", "text"):
            from somp_ref.adapters.image_tokens import image_token_mask, vision_family

            vision_family(model, f"positions={rule!r}")
            self.image_mask = functools.partial(image_token_mask, model)
        self.generating: int | None = None  # prompt width, inside model.generate
        self.last_width: int | None = None  # width of the last forward without cache
        self.mask: torch.Tensor | None = None  # (batch, n) of the current forward
        self.scope = "all"  # "all", "none" or "some" positions of the current forward
        self.on_device: dict[Any, torch.Tensor] = {}

    def before_forward(self, module, args, kwargs) -> None:
        arguments = dict(self.signature.bind_partial(*args, **kwargs).arguments)
        if self.var_keyword is not None:
            arguments |= arguments.pop(self.var_keyword, {})
        input_ids = arguments.get("input_ids")
        embeds = arguments.get("inputs_embeds")
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            raise ValueError("position rules need input_ids or inputs_embeds in the forward")
        batch, n = int(reference.shape[0]), int(reference.shape[1])
        cache = arguments.get("cache", arguments.get("past_key_values"))
        past = _cache_length(cache)
        columns = torch.arange(past, past + n)
        mask = self._mask(input_ids, batch, past, n, columns)
        self.mask = mask
        self.on_device = {}
        self.scope = "all" if bool(mask.all()) else "none" if not bool(mask.any()) else "some"

    def _boundary(self, batch: int, past: int, n: int) -> torch.Tensor:
        """Per row, the first column that holds a generated token."""
        if self.generating is not None:
            return torch.full((batch,), self.generating)
        starts = _GENERATED_FROM.get()
        if starts is not None:
            if starts.numel() != batch:
                raise ValueError(
                    f"generated_from gives {starts.numel()} rows, the forward has {batch}"
                )
            return starts
        if past == 0:
            self.last_width = n
        return torch.full((batch,), self.last_width if self.last_width is not None else past)

    def _mask(self, input_ids, batch: int, past: int, n: int, columns) -> torch.Tensor:
        rule = self.rule
        if isinstance(rule, str) and rule in ("prompt", "generated"):
            generated = columns[None, :] >= self._boundary(batch, past, n)[:, None]
            return generated if rule == "generated" else ~generated
        if isinstance(rule, str):  # "image" or "text"
            if input_ids is None:
                raise ValueError(
                    f"positions={rule!r} needs input_ids (image tokens) in the forward"
                )
            image = self.image_mask(input_ids).cpu()
            return image if rule == "image" else ~image
        if isinstance(rule, torch.Tensor):
            if rule.shape[0] != batch or rule.shape[1] < past + n:
                raise ValueError(
                    f"the position mask is {tuple(rule.shape)} but the forward covers "
                    f"{batch} rows and columns {past}..{past + n - 1}"
                )
            return rule[:, past : past + n].cpu()
        rows = torch.arange(batch)[:, None]
        chosen = torch.as_tensor(rule(rows, columns[None, :])).cpu()
        if chosen.dtype != torch.bool:
            raise ValueError(f"a position rule must return booleans, got {chosen.dtype}")
        return torch.broadcast_to(chosen, (batch, n))

    def after_forward(self, module, args, kwargs, output) -> None:
        self.mask, self.on_device, self.scope = None, {}, "all"

    def mask_for(self, x: torch.Tensor) -> torch.Tensor:
        """The current forward's mask on x's device, checked against x's (batch, pos)."""
        if self.mask is None:
            raise RuntimeError(
                f"positions={_describe(self.rule)} needs the model's own forward: call the "
                "model passed to scale_heads (or its generate), not one of its submodules"
            )
        if tuple(x.shape[:2]) != tuple(self.mask.shape):
            raise RuntimeError(
                f"an o_proj input of shape {tuple(x.shape)} does not match the forward's "
                f"(batch, pos) {tuple(self.mask.shape)}"
            )
        if x.device not in self.on_device:
            self.on_device[x.device] = self.mask.to(x.device)[..., None]
        return self.on_device[x.device]

    def wrap_generate(self, generate: Callable) -> Callable:
        @functools.wraps(generate)
        def wrapped(*args, **kwargs):
            inputs = kwargs.get("inputs_embeds")
            if inputs is None:
                inputs = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
            previous = self.generating
            self.generating = None if inputs is None else int(inputs.shape[1])
            try:
                return generate(*args, **kwargs)
            finally:
                self.generating = previous

        return wrapped


def _describe(rule: PositionRule) -> str:
    if isinstance(rule, str):
        return repr(rule)
    return "a mask" if isinstance(rule, torch.Tensor) else "a callable"


def check_positions(rule: PositionRule) -> None:
    """Raise ValueError unless ``rule`` is a valid position rule (see :data:`PositionRule`)."""
    if isinstance(rule, str):
        if rule not in POSITION_RULES:
            raise ValueError(
                f"positions must be one of {', '.join(POSITION_RULES)}, a boolean mask or a "
                f"callable, got {rule!r}"
            )
    elif isinstance(rule, torch.Tensor):
        if rule.dtype != torch.bool or rule.ndim != 2:
            raise ValueError(
                "a position mask must be a boolean tensor of shape (batch, columns), got "
                f"{rule.dtype} of shape {tuple(rule.shape)}"
            )
    elif not callable(rule):
        raise ValueError(
            "positions must be a rule name, a boolean mask or a callable, got "
            f"{type(rule).__name__}"
        )


@contextmanager
def scale_heads(
    model: Any, alphas: Mapping[Head, float], *, positions: PositionRule = "all"
) -> Iterator[dict[int, int]]:
    """Multiply head h's slice of the o_proj input by alpha, for every (layer, head) given,
    at the positions ``positions`` selects.

    The head's contribution to the residual stream (``z_h W_O[:, h]^T``) is scaled and
    nothing else: other heads, the o_proj bias and the KV cache of the same layer are
    untouched (the cache holds keys and values, computed before o_proj; a position scaled
    earlier reaches later ones only through the residual stream). alpha = 1 leaves the
    logits bit-identical under every rule (multiplying by 1.0 is exact); alpha = 0 ablates
    the head. Hooks are removed on exit, also on errors.

    Parameters
    ----------
    model
        A transformers model (causal LM or vision-language model).
    alphas : mapping of (layer, head) -> float
    positions : str, bool Tensor of shape (batch, columns), or callable, default="all"
        "all": every position (the paper's); "prompt": the prompt's positions only;
        "generated": only positions whose input token was generated (the prompt's last
        position, which predicts the first answer token, is a prompt position); "image" /
        "text": the image-token positions / every other one (vision-language models; the
        image token is the one :func:`somp_ref.adapters.image_tokens.image_token_id` names). A
        mask selects columns of the padded input per row; a callable gets ``(rows,
        columns)`` LongTensors of shapes (batch, 1) and (1, n) and returns booleans.
        Columns count as the KV cache does (see the module docstring), so ``generate``
        gives the same text with and without the cache under every rule. Any rule but "all"
        needs the model's own forward (or its ``generate``) to be called, not a submodule.

    Yields
    ------
    dict of int -> int
        Calls of each hooked layer's hook, updated live (for checking that the path ran).
    """
    check_positions(positions)
    heads = model_heads(model)
    per_layer: dict[int, dict[int, float]] = {}
    for (layer, head), alpha in alphas.items():
        if not (0 <= layer < heads.n_layers and 0 <= head < heads.n_heads):
            raise ValueError(
                f"head {(layer, head)} is outside {heads.n_layers} layers x {heads.n_heads} heads"
            )
        per_layer.setdefault(int(layer), {})[int(head)] = float(alpha)
    selective = not (isinstance(positions, str) and positions == "all")
    tracker = _PositionTracker(model, positions) if selective and per_layer else None
    calls = {layer: 0 for layer in per_layer}
    handles = []
    missing = object()
    own_generate = missing

    def hook_for(layer: int, scale: torch.Tensor):
        cache: dict[tuple, torch.Tensor] = {}

        def hook(module, args):
            x = args[0]
            key = (x.dtype, x.device)
            if key not in cache:
                cache[key] = scale.to(dtype=x.dtype, device=x.device)
            calls[layer] += 1
            if tracker is None or tracker.scope == "all" and tracker.mask is not None:
                return (x * cache[key], *args[1:])
            mask = tracker.mask_for(x)
            if tracker.scope == "none":
                return None
            return (torch.where(mask, x * cache[key], x), *args[1:])

        return hook

    try:
        if tracker is not None:
            handles.append(
                model.register_forward_pre_hook(tracker.before_forward, with_kwargs=True)
            )
            handles.append(
                model.register_forward_hook(
                    tracker.after_forward, with_kwargs=True, always_call=True
                )
            )
            if hasattr(model, "generate"):
                own_generate = model.__dict__.get("generate", missing)
                model.generate = tracker.wrap_generate(model.generate)
        for layer, scaled in per_layer.items():
            scale = torch.ones(heads.n_heads, heads.d_head, dtype=torch.float64)
            for head, alpha in scaled.items():
                scale[head] = alpha
            handle = heads.o_proj[layer].register_forward_pre_hook(hook_for(layer, scale.flatten()))
            handles.append(handle)
        yield calls
    finally:
        for handle in handles:
            handle.remove()
        if tracker is not None and hasattr(model, "generate"):
            if own_generate is missing:
                model.__dict__.pop("generate", None)
            else:
                model.generate = own_generate


@contextmanager
def steer(
    model: Any, heads: Iterable[Head], alpha: float = -1.0, *, positions: PositionRule = "all"
) -> Iterator[dict[int, int]]:
    """Scale every head of ``heads`` by ``alpha`` inside the block (see :func:`scale_heads`,
    which ``positions`` goes to).

    ``alpha=-1`` flips the heads (suppresses what they write), ``0`` ablates them, ``5``
    amplifies them.

    Examples
    --------
    >>> with steer(model, top_heads(scores, 8), alpha=-1):  # doctest: +SKIP
    ...     print(generate(model, tokenizer, ["Describe the color of a banana."]))
    >>> with steer(model, top_heads(scores, 8), alpha=-1, positions="generated"):  # doctest: +SKIP
    ...     print(generate(model, tokenizer, ["Describe the color of a banana."]))
    """
    with scale_heads(model, {tuple(head): alpha for head in heads}, positions=positions) as calls:
        yield calls
