"""A model's heads are resolved once, to the right modules, on tiny random models."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from models import tiny_mistral, tiny_vlm  # noqa: E402

from somp_ref.adapters import model_heads as model_heads_module  # noqa: E402
from somp_ref.adapters.batch_export import export_batches  # noqa: E402
from somp_ref.adapters.capture import capture_z  # noqa: E402
from somp_ref.adapters.families import UnsupportedModelError  # noqa: E402
from somp_ref.adapters.intervene import scale_heads  # noqa: E402
from somp_ref.adapters.model_heads import model_heads  # noqa: E402

VOCAB = 49152  # the tiny VLMs' image token ids sit near the top of SmolLM2's vocabulary


class Tokenizer:
    """Just what export needs of a tokenizer for the "last" rule: the vocabulary strings."""

    def __len__(self) -> int:
        return VOCAB

    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        return [f"t{row[0]}" for row in ids]


@pytest.fixture
def lookups(monkeypatch):
    """Counts family look-ups: one per resolution of a model's heads."""
    calls = []
    real = model_heads_module.family_of

    def counting(model):
        calls.append(model)
        return real(model)

    monkeypatch.setattr(model_heads_module, "family_of", counting)
    return calls


def test_heads_are_resolved_once_for_capture_scaling_and_export(lookups, tmp_path):
    model = tiny_mistral(VOCAB)
    ids = torch.tensor([[5, 6, 7, 8]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with capture_z(model) as captured, torch.no_grad():
        model(**inputs)
    with scale_heads(model, {(0, 1): 0.0, (1, 2): 2.0}) as calls, torch.no_grad():
        model(**inputs)
    store = export_batches(
        model, Tokenizer(), [([{"prompt": "x"}], inputs, None)], tmp_path / "s", show_progress=False
    )
    assert len(captured) == 2 and calls == {0: 1, 1: 1}  # the hooks did run
    assert store.n_layers == 2 and store.n_heads == 4 and store.d_head == 8
    assert lookups == [model]
    assert model_heads(model) is model_heads(model)


def test_export_no_longer_records_the_logit_softcapping(tmp_path):
    model = tiny_mistral(VOCAB)
    ids = torch.tensor([[5, 6, 7]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    store = export_batches(
        model, Tokenizer(), [([{"prompt": "x"}], inputs, None)], tmp_path / "s", show_progress=False
    )
    assert "final_logit_softcapping" not in store.meta
    assert store.meta["family"] == "mistral"


def test_a_copy_is_resolved_to_its_own_modules(lookups):
    model = tiny_mistral(VOCAB)
    original = model_heads(model)
    copied = copy.deepcopy(model)
    heads = model_heads(copied)
    assert len(lookups) == 2
    assert heads.o_proj[1] is copied.model.layers[1].self_attn.o_proj
    assert heads.o_proj[1] is not original.o_proj[1]
    assert heads.unembed is copied.lm_head and heads.final_norm is copied.model.norm


def test_the_cache_does_not_keep_a_model_alive():
    model = tiny_mistral(VOCAB)
    model_heads(model)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_the_layout_comes_from_the_config_and_must_match_o_proj():
    model = tiny_mistral(VOCAB)
    model.config.head_dim = 16
    with pytest.raises(UnsupportedModelError, match=r"o_proj is 32 -> 32, expected 4 heads x 16"):
        model_heads(model)


@pytest.mark.parametrize("family", ["llava", "gemma3", "qwen2_5_vl"])
def test_vlm_heads_are_the_language_model_s_with_gemma3_s_output_norm(family):
    model = tiny_vlm(family, VOCAB)
    heads = model_heads(model)
    language = model.model.language_model
    assert (heads.n_layers, heads.n_heads, heads.d_head, heads.d_model) == (2, 4, 8, 32)
    assert heads.o_proj == tuple(layer.self_attn.o_proj for layer in language.layers)
    assert heads.final_norm is language.norm and heads.unembed is model.lm_head
    weight = heads.o_proj[1].weight.detach()
    if family == "gemma3":
        norm = language.layers[1].post_attention_layernorm
        assert heads.attn_out_norms[1] is norm
        with torch.no_grad():
            norm.weight.normal_()  # Gemma stores the gain minus one
        gain = norm.weight.detach() + 1.0
        assert torch.equal(heads.effective_o_proj(1), gain[:, None] * weight)
    else:
        assert heads.attn_out_norms is None
        assert torch.equal(heads.effective_o_proj(1), weight)
    assert heads.columns(2) == slice(16, 24)
