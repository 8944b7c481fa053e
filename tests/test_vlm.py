"""Vision-language adapters (LLaVA, Gemma3, Qwen2.5-VL) on tiny random models: the same
checks as the text families, with images."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from models import IMAGE, heads_and_what_joins, tiny_vlm  # noqa: E402

from somp_ref.adapters.intervene import scale_heads  # noqa: E402
from somp_ref.adapters.model_heads import model_heads  # noqa: E402
from somp_ref.adapters.vision import (  # noqa: E402
    check_image_tokens,
    classify_images,
    digits_dataset,
    export_vision,
    image_inputs,
)
from somp_ref.heads import rank_heads, top_heads  # noqa: E402

pytestmark = pytest.mark.model

#: float32: summing 4 heads' contributions against one o_proj GEMM (and, for Gemma3, an
#: RMSNorm computed in float32): a few ulps of the output's magnitude.
FLOAT32_REL = 1e-5
FAMILIES = ["llava", "gemma3", "qwen2_5_vl"]


@pytest.fixture(scope="module")
def tokenizer():
    from somp_ref.adapters.models import load_model

    return load_model("default")[1]


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tokenizer):
    return tiny_vlm(request.param, len(tokenizer)), request.param


def inputs_for(model, tokenizer, text="What digit is this?", seed=0):
    image = np.random.default_rng(seed).random((20, 20, 3))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return image_inputs(model, ids, image)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_head_contributions_sum_to_what_joins_the_residual_stream(vlm, tokenizer):
    model, family = vlm
    heads = model_heads(model)
    inputs = inputs_for(model, tokenizer)
    captured, seen = heads_and_what_joins(model, heads, lambda: logits(model, inputs))
    assert (heads.attn_out_norms is not None) == (family == "gemma3")
    for layer in range(heads.n_layers):
        W = heads.effective_o_proj(layer).reshape(heads.d_model, heads.n_heads, heads.d_head)
        total = torch.einsum("bphd,mhd->bpm", captured[layer].float(), W)
        diff = (total - seen[layer]).abs().max().item()
        scale = seen[layer].abs().max().item()
        assert diff <= FLOAT32_REL * scale, f"{family} layer {layer}: {diff:.3e}"


def test_alpha_one_is_bit_identical_with_images(vlm, tokenizer):
    model, _ = vlm
    heads = model_heads(model)
    inputs = inputs_for(model, tokenizer)
    before = logits(model, inputs)
    every = {(layer, h): 1.0 for layer in range(heads.n_layers) for h in range(heads.n_heads)}
    with scale_heads(model, every) as calls:
        during = logits(model, inputs)
    assert all(count == 1 for count in calls.values())
    assert torch.equal(before, during)


def test_alpha_zero_equals_zeroed_o_proj_columns(vlm, tokenizer):
    model, _ = vlm
    heads = model_heads(model)
    chosen = [(0, 1), (1, 3)]
    inputs = inputs_for(model, tokenizer)
    with scale_heads(model, {h: 0.0 for h in chosen}):
        ablated = logits(model, inputs)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for layer, head in chosen:
            model_heads(edited).o_proj[layer].weight[:, heads.columns(head)] = 0.0
    expected = logits(edited, inputs)
    diff = (ablated - expected).abs().max().item()
    assert diff <= FLOAT32_REL * expected.abs().max().item(), f"{diff:.3e}"
    assert not torch.allclose(ablated, logits(model, inputs))


def test_vision_tower_is_never_hooked(vlm):
    model, _ = vlm
    ours = {id(m) for m in model_heads(model).o_proj}
    vision = (
        model.model.vision_tower if hasattr(model.model, "vision_tower") else model.model.visual
    )
    assert not ours & {id(m) for m in vision.modules()}


@pytest.mark.parametrize("positions", ["last", "text", "image", "all", "mean"])
def test_export_rank_intervene_end_to_end(vlm, tokenizer, tmp_path, positions):
    model, family = vlm
    items = [
        {"prompt": f"Describe picture number {i}.", "image": item["image"], "id": i}
        for i, item in enumerate(digits_dataset(4, size=24))
    ]
    store = export_vision(
        model, tokenizer, items, tmp_path / "s", positions=positions, show_progress=False
    )
    image_tokens = int((inputs_for(model, tokenizer)["input_ids"] == IMAGE).sum())
    if positions == "image":
        assert store.n_samples == 4 * image_tokens
        assert all(s["token"] == tokenizer.decode([IMAGE]) for s in store.samples())
    if positions in ("last", "mean"):
        assert store.n_samples == 4 and [s["id"] for s in store.samples()] == [0, 1, 2, 3]
    assert store.meta["family"] == family
    scores = rank_heads(store, list(range(100, 160)), 5, show_progress=False)
    heads = top_heads(scores, 2)
    assert len(heads) == 2 and np.isfinite(scores.details["explained_variance"]).all()
    inputs = inputs_for(model, tokenizer)
    with scale_heads(model, {h: -1.0 for h in heads}):
        steered = logits(model, inputs)
    assert not torch.equal(steered, logits(model, inputs))


def test_image_token_mismatch_is_a_clear_error(vlm, tokenizer, tmp_path):
    model, family = vlm
    inputs = inputs_for(model, tokenizer)
    ids = inputs["input_ids"][0].tolist()
    position = ids.index(IMAGE)
    broken = dict(inputs)
    broken["input_ids"] = torch.tensor([ids[:position] + ids[position + 1 :]])
    broken["attention_mask"] = torch.ones_like(broken["input_ids"])
    needed = int((inputs["input_ids"] == IMAGE).sum())
    with pytest.raises(
        ValueError,
        match=rf"{family}: the input has {needed - 1} image "
        rf"tokens .* need {needed}",
    ):
        check_image_tokens(model, broken)
    with pytest.raises(ValueError, match=r"image tokens"):
        export_vision(
            model,
            tokenizer,
            [{"prompt": "x", "inputs": broken}],
            tmp_path / "s",
            show_progress=False,
        )


def test_digits_classification_helper(vlm, tokenizer):
    model, _ = vlm
    items = digits_dataset(5, size=16, seed=1)
    assert all(item["image"].shape == (16, 16, 3) for item in items)
    assert all(0.0 <= item["image"].min() <= item["image"].max() <= 1.0 for item in items)
    result = classify_images(model, tokenizer, items, [str(d) for d in range(10)])
    assert len(result["predictions"]) == 5
    assert set(result["predictions"]) <= {str(d) for d in range(10)}
    truth = [p == item["label"] for p, item in zip(result["predictions"], items, strict=True)]
    assert result["accuracy"] == np.mean(truth)


def test_image_mean_rows_average_each_items_image_token_rows(vlm, tokenizer, tmp_path):
    """The paper's VLM rows: one row per item, the mean of the head's output over that
    item's image-token positions (the rows ``positions="image"`` stores one by one)."""
    model, _ = vlm
    items = [
        {"prompt": f"Describe picture number {i}.", "image": item["image"], "id": i}
        for i, item in enumerate(digits_dataset(3, size=24))
    ]
    rows, means = (
        export_vision(model, tokenizer, items, tmp_path / rule, positions=rule, show_progress=False)
        for rule in ("image", "image-mean")
    )
    assert means.n_samples == 3 and [s["id"] for s in means.samples()] == [0, 1, 2]
    per_item = rows.n_samples // 3
    differs = []  # from each item's first image row somewhere: a mean, not one row
    for layer in range(rows.n_layers):
        z = np.asarray(rows.layer(layer)[0], dtype=np.float64)
        expected = z.reshape(3, per_item, *z.shape[1:]).mean(axis=1)
        got = np.asarray(means.layer(layer)[0], dtype=np.float64)
        # Both are stored in the store's dtype: each side is off by half its ulp at most.
        ulp = np.finfo(means.layer(layer)[0].dtype).eps * np.abs(z).max()
        np.testing.assert_allclose(got, expected, rtol=0, atol=2 * ulp)
        differs.append(not np.allclose(got, z[::per_item], rtol=0, atol=2 * ulp))
    assert any(differs)
