"""Image- and text-selective head scaling on the tiny random LLaVA, Gemma3 and Qwen2.5-VL:
scaling only image positions leaves a text-only prompt bit-identical and changes an image
prompt from its first image token on; generation gives the same tokens with and without
the KV cache; ``classify_images`` takes the rule."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from models import IMAGE, tiny_vlm  # noqa: E402

from somp_ref.adapters.intervene import scale_heads  # noqa: E402
from somp_ref.adapters.vision import classify_images, image_inputs, image_token_mask  # noqa: E402

FAMILIES = ["llava", "gemma3", "qwen2_5_vl"]
#: The tiny VLMs' vocabulary: SmolLM2's size, so the placeholder ids (49100-49105) fit.
VOCAB = 49152
TEXT = [5, 6, 7, 8, 9]
ALPHAS = {(0, 0): -2.0, (1, 1): 3.0, (1, 3): 0.0}


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request):
    return tiny_vlm(request.param, VOCAB)


def image_prompt(model, seed=0):
    image = np.random.default_rng(seed).random((20, 20, 3))
    return image_inputs(model, TEXT, image)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_image_positions_leave_a_text_only_prompt_bit_identical(vlm):
    text_only = {"input_ids": torch.tensor([TEXT])}
    base = logits(vlm, text_only)
    with scale_heads(vlm, ALPHAS, positions="image") as calls:
        assert torch.equal(logits(vlm, text_only), base)
    assert all(n > 0 for n in calls.values())  # the hooks ran, and scaled nothing
    with scale_heads(vlm, ALPHAS, positions="text"):  # the same heads do act on text
        assert not torch.equal(logits(vlm, text_only), base)


def test_image_positions_change_an_image_prompt_from_the_first_image_token_on(vlm):
    inputs = image_prompt(vlm)
    image = image_token_mask(vlm, inputs["input_ids"])[0]
    first = int(image.nonzero()[0])
    base = logits(vlm, inputs)
    with scale_heads(vlm, ALPHAS, positions="image"):
        now = logits(vlm, inputs)
    assert torch.equal(now[0, :first], base[0, :first])  # before any image token
    assert not torch.equal(now[0, first:], base[0, first:])
    assert not torch.equal(now[0, -1], base[0, -1])  # the text after the image sees it


def test_image_and_text_together_are_all(vlm):
    # Every position is scaled once, by one of the two rules: "all"'s multiplications.
    inputs = image_prompt(vlm, seed=1)
    with scale_heads(vlm, ALPHAS):
        everywhere = logits(vlm, inputs)
    with scale_heads(vlm, ALPHAS, positions="image"), scale_heads(vlm, ALPHAS, positions="text"):
        split = logits(vlm, inputs)
    assert torch.equal(split, everywhere)


@pytest.mark.parametrize("rule", ["all", "image", "text", "prompt", "generated"])
def test_alpha_one_is_bit_identical_under_every_rule_on_an_image_prompt(vlm, rule):
    inputs = image_prompt(vlm, seed=3)
    base = logits(vlm, inputs)
    with scale_heads(vlm, dict.fromkeys(ALPHAS, 1.0), positions=rule) as calls:
        assert torch.equal(logits(vlm, inputs), base)
    assert all(n > 0 for n in calls.values())  # the hooks ran
    options = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    unscaled = vlm.generate(**inputs, **options)
    with scale_heads(vlm, dict.fromkeys(ALPHAS, 1.0), positions=rule):
        assert torch.equal(vlm.generate(**inputs, **options), unscaled)


@pytest.mark.parametrize("rule", ["image", "text", "prompt", "generated"])
def test_generation_is_the_same_with_and_without_the_cache(vlm, rule):
    inputs = image_prompt(vlm, seed=2)
    options = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with scale_heads(vlm, ALPHAS, positions=rule):
        cached = vlm.generate(**inputs, use_cache=True, **options)
        recomputed = vlm.generate(**inputs, use_cache=False, **options)
    assert torch.equal(cached, recomputed)
    assert not (cached[0, -5:] == IMAGE).any()  # generated tokens are text


class DigitsTokenizer:
    """Enough of a tokenizer for classify_images: one id per character (no special tokens)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [10 + ord(c) % 200 for c in text]}


def test_classify_images_takes_image_and_text_positions(vlm):
    images = [{"image": np.random.default_rng(i).random((12, 12, 3)), "label": "1"} for i in (3, 4)]
    names = ["0", "1", "2"]
    tokenizer = DigitsTokenizer()
    base = classify_images(vlm, tokenizer, images, names)
    scaled = classify_images(vlm, tokenizer, images, names, alphas=ALPHAS, positions="image")
    assert scaled["scores"] != base["scores"]  # the image positions' heads count
    same = classify_images(
        vlm, tokenizer, images, names, alphas=dict.fromkeys(ALPHAS, 1.0), positions="text"
    )
    assert same["scores"] == base["scores"]  # alpha = 1: bit-identical scores
    assert len(base["scores"]) == 2 and all(len(s) == 3 for s in base["scores"])


def test_image_rules_need_a_vision_language_model():
    from models import tiny_mistral

    with pytest.raises(ValueError, match="positions='text' needs a vision-language model"):
        with scale_heads(tiny_mistral(64), ALPHAS, positions="text"):
            pass


def test_image_rules_need_token_ids(vlm):
    embeds = vlm.get_input_embeddings()(torch.tensor([TEXT]))
    with scale_heads(vlm, ALPHAS, positions="image"):
        with pytest.raises(ValueError, match="positions='image' needs input_ids"):
            with torch.no_grad():
                vlm(inputs_embeds=embeds)
