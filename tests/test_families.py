"""Every text family on a tiny random model: head contributions add up to what joins the
residual stream, alpha = 1 is exact, export -> rank -> scale runs, and an unlisted model type
is served as Llama-like only when laid out as Llama."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from models import heads_and_what_joins, tiny_causal_lm  # noqa: E402

from somp_ref.adapters.batch_export import export_batches  # noqa: E402
from somp_ref.adapters.families import UnsupportedModelError, family_of  # noqa: E402
from somp_ref.adapters.intervene import scale_heads  # noqa: E402
from somp_ref.adapters.model_heads import model_heads  # noqa: E402
from somp_ref.ranking import rank_heads  # noqa: E402
from somp_ref.selection import top_heads  # noqa: E402

VOCAB = 256
#: float32: 4 heads' contributions summed by einsum against one o_proj GEMM (and, under an
#: attention-output norm, an RMSNorm the model computes in float32 against our own rsqrt):
#: different summation orders over 32 terms, a few ulps (~1e-7) of the output's magnitude
#: each; 1e-5 leaves room without hiding a wrong head split or a missing gain (errors of O(1)).
FLOAT32_REL = 1e-5
#: Families with an entry; every one listed here is checked below.
LISTED = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3_text",
    "olmo2",
    "gpt2",
]
#: Normalise the attention output before the residual add (post_attention_layernorm).
NORMED = {"gemma2", "gemma3_text", "olmo2"}
#: Unlisted model types laid out as Llama: OLMo (its norms are weightless LayerNorms, its
#: attention output joins the residual unnormalised) and a Llama renamed.
FALLBACK = ["olmo", "renamed_llama"]
FALLBACK_WARNING = r"model type '(olmo|renamed_llama)' is not listed; treating it as Llama-like"


class Tokenizer:
    """Just what export needs of a tokenizer for the "last" rule: the vocabulary strings."""

    def __len__(self) -> int:
        return VOCAB

    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        return [f"t{row[0]}" for row in ids]


def build(name: str):
    """A tiny model whose norm weights and biases are random too (at initialisation they are
    ones / zeros, which would hide a missing gain, offset or bias)."""
    model = tiny_causal_lm("llama" if name == "renamed_llama" else name, VOCAB)
    if name == "renamed_llama":
        model.config.model_type = "renamed_llama"
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module", params=LISTED + FALLBACK)
def family(request):
    """(name, model), the model's heads already resolved (the fallback warns then, once)."""
    model = build(request.param)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_heads(model)
    fallback = [w for w in caught if "treating it as Llama-like" in str(w.message)]
    assert len(fallback) == (request.param in FALLBACK)
    return request.param, model


def inputs(seed: int = 0, rows: int = 2, length: int = 7):
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_head_contributions_sum_to_what_joins_the_residual_stream(family):
    name, model = family
    heads = model_heads(model)
    assert (heads.attn_out_norms is not None) == (name in NORMED)
    captured, seen = heads_and_what_joins(model, heads, lambda: logits(model, inputs()))
    assert sorted(captured) == list(range(heads.n_layers)) == sorted(seen)  # our hooks ran
    for layer in range(heads.n_layers):
        W = heads.effective_o_proj(layer)
        assert W.shape == (heads.d_model, heads.n_heads * heads.d_head)
        W = W.reshape(heads.d_model, heads.n_heads, heads.d_head)
        total = torch.einsum("bphd,mhd->bpm", captured[layer].float(), W)
        bias = heads.o_proj_bias(layer)
        assert (bias is not None) == (name == "gpt2")  # the others' o_proj has no bias
        if bias is not None:
            total = total + torch.from_numpy(bias)
        diff = (total - seen[layer]).abs().max().item()
        scale = seen[layer].abs().max().item()
        assert diff <= FLOAT32_REL * scale, f"{name} layer {layer}: {diff:.3e} of {scale:.3e}"


def test_alpha_one_is_bit_identical(family):
    _, model = family
    heads = model_heads(model)
    batch = inputs()
    before = logits(model, batch)
    every = {(layer, h): 1.0 for layer in range(heads.n_layers) for h in range(heads.n_heads)}
    with scale_heads(model, every) as calls:
        during = logits(model, batch)
    assert calls == {layer: 1 for layer in range(heads.n_layers)}
    assert torch.equal(before, during)


def test_export_rank_scale_end_to_end(family, tmp_path):
    name, model = family
    heads = model_heads(model)
    batches = [([{"prompt": f"p{i}", "id": i}], inputs(seed=i, rows=1), None) for i in range(6)]
    store = export_batches(model, Tokenizer(), batches, tmp_path / "s", show_progress=False)
    assert store.n_samples == 6 and store.meta["family"] == name
    assert (store.n_layers, store.n_heads, store.d_head) == (2, 4, 8)
    for layer in range(heads.n_layers):
        assert np.array_equal(store.layer(layer)[1], heads.effective_o_proj(layer).numpy())
        bias = heads.o_proj_bias(layer)
        stored = store.layer_bias(layer)
        assert (stored is None) == (bias is None)
        assert bias is None or np.array_equal(stored, bias)
    scores = rank_heads(store, list(range(10, 60)), 5, method="somp", show_progress=False)
    assert scores.score.shape == (2, 4) and np.isfinite(scores.score).all()
    [(layer, head)] = top_heads(scores, 1)

    batch = inputs(seed=9)
    with scale_heads(model, {(layer, head): 0.0}):
        ablated = logits(model, batch)
    edited = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warns again for the copy
        edited_heads = model_heads(edited)
    with torch.no_grad():
        edited_heads.o_proj_weight(layer)[:, heads.columns(head)] = 0.0
    expected = logits(edited, batch)
    diff = (ablated - expected).abs().max().item()
    assert diff <= FLOAT32_REL * expected.abs().max().item(), f"{name}: {diff:.3e}"
    assert not torch.allclose(ablated, logits(model, batch))


def test_o_proj_weight_is_a_view_of_the_parameter():
    """GPT-2's Conv1D stores W_O transposed; writes through o_proj_weight reach the model."""
    model = tiny_causal_lm("gpt2", VOCAB)
    heads = model_heads(model)
    c_proj = model.transformer.h[1].attn.c_proj
    assert heads.o_proj[1] is c_proj and heads.final_norm is model.transformer.ln_f
    assert heads.o_proj_weight(1).shape == (32, 32)
    assert torch.equal(heads.o_proj_weight(1), c_proj.weight.T)
    with torch.no_grad():
        heads.o_proj_weight(1)[:, heads.columns(2)] = 0.0
    assert not c_proj.weight[16:24].any() and c_proj.weight[:16].any()


def test_the_gain_offset_and_norm_of_each_normed_family():
    for name, offset in [("gemma2", 1.0), ("gemma3_text", 1.0), ("olmo2", 0.0)]:
        model = build(name)
        heads = model_heads(model)
        norm = model.model.layers[0].post_attention_layernorm
        assert heads.attn_out_norms[0] is norm and heads.family.norm_weight_offset == offset
        gain = norm.weight.detach() + offset
        weight = model.model.layers[0].self_attn.o_proj.weight.detach()
        assert torch.equal(heads.effective_o_proj(0), gain[:, None] * weight)


def test_an_unlisted_llama_layout_warns_once_per_model():
    model = build("renamed_llama")
    with pytest.warns(UserWarning, match=FALLBACK_WARNING + r".* no attention-output norm"):
        heads = model_heads(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model_heads(model) is heads  # cached: no second warning
    assert heads.family.name == "renamed_llama" and heads.attn_out_norms is None
    assert heads.o_proj == tuple(layer.self_attn.o_proj for layer in model.model.layers)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("gpt2", r"not laid out as Llama"),
        ("gemma2", r"its layers have (post|pre)_feedforward_layernorm"),
        ("olmo2", r"its layers have post_feedforward_layernorm"),
    ],
)
def test_an_unlisted_model_of_another_layout_is_refused(name, reason):
    model = tiny_causal_lm(name, VOCAB)
    model.config.model_type = "unlisted"
    with pytest.raises(
        UnsupportedModelError,
        match=rf"model type 'unlisted' is not supported; supported: .*gpt2.*Llama-like: {reason}",
    ):
        model_heads(model)


def test_a_model_without_a_config_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"model type None is not supported"):
        family_of(torch.nn.Linear(2, 2))
