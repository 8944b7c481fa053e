"""Models for the adapter tests: the embedded SmolLM2 and tiny random Mistral models."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def tiny_mistral(vocab_size: int, *, seed: int = 0, dtype=torch.float32):
    """A randomly initialised 2-layer Mistral (4 query heads, 2 KV heads), eager attention."""
    torch.manual_seed(seed)
    config = transformers.MistralConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    model = transformers.MistralForCausalLM(config).to(dtype)
    model.eval()
    return model


#: Placeholder token ids of the tiny VLMs (unused ids at the top of SmolLM2's vocabulary,
#: whose tokenizer the tests share).
IMAGE, BOI, EOI, VISION_START, VISION_END = 49100, 49101, 49102, 49103, 49104


def _text(**extra):
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        **extra,
    )


def tiny_vlm(family: str, vocab_size: int, *, seed: int = 0):
    """A randomly initialised LLaVA (Llama text), Gemma3 or Qwen2.5-VL, eager attention."""
    torch.manual_seed(seed)
    T = transformers
    if family == "llava":
        config = T.LlavaConfig(
            vision_config=T.CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            text_config=T.LlamaConfig(vocab_size=vocab_size, **_text()),
            image_token_index=IMAGE,
        )
        model_class = T.LlavaForConditionalGeneration
    elif family == "gemma3":
        config = T.Gemma3Config(
            text_config=T.Gemma3TextConfig(vocab_size=vocab_size, sliding_window=16, **_text()),
            vision_config=T.SiglipVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
            image_token_index=IMAGE,
            boi_token_index=BOI,
            eoi_token_index=EOI,
        )
        model_class = T.Gemma3ForConditionalGeneration
    elif family == "qwen2_5_vl":
        config = T.Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=vocab_size,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                # mrope_section must sum to head_dim / 2 = 4
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            ),
            vision_config=dict(
                depth=1,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=32,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=28,
                fullatt_block_indexes=[0],
            ),
            image_token_id=IMAGE,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
            video_token_id=49105,
        )
        model_class = T.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(family)
    config._attn_implementation = "eager"
    for sub in ("text_config", "vision_config"):
        getattr(config, sub)._attn_implementation = "eager"
    return model_class(config).eval()


def tiny_causal_lm(family: str, vocab_size: int = 256, *, seed: int = 0):
    """A randomly initialised 2-layer text model of ``family`` (a ``config.model_type``):
    width 32, 4 query heads of 8 (2 KV heads where the family has GQA), eager attention.

    Families: llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text, olmo2, gpt2, olmo.
    """
    torch.manual_seed(seed)
    T = transformers
    text = dict(vocab_size=vocab_size, max_position_embeddings=256, tie_word_embeddings=False)
    # pad ids must be inside the small vocabulary (Phi-3's default is 32000)
    gqa = dict(_text(), pad_token_id=0, bos_token_id=1, eos_token_id=2, **text)
    if family == "gpt2":
        config = T.GPT2Config(
            vocab_size=vocab_size,
            n_positions=256,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_inner=64,
            bos_token_id=1,
            eos_token_id=2,
        )
        model_class = T.GPT2LMHeadModel
    else:
        config_class, model_class = {
            "llama": (T.LlamaConfig, T.LlamaForCausalLM),
            "mistral": (T.MistralConfig, T.MistralForCausalLM),
            "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
            "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM),
            "phi3": (T.Phi3Config, T.Phi3ForCausalLM),
            "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM),
            "gemma3_text": (T.Gemma3TextConfig, T.Gemma3ForCausalLM),
            "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM),
            "olmo": (T.OlmoConfig, T.OlmoForCausalLM),
        }[family]
        config = config_class(**gqa)
    config._attn_implementation = "eager"
    return model_class(config).eval()


def save_tiny_checkpoint(path, family: str = "llama", *, seed: int = 0, vocabulary=None):
    """A tiny random model of ``family`` and a word-level tokenizer (``w0 w1 ...``, or the
    words of ``vocabulary``, after [PAD], [UNK] and [EOS]) saved as a local checkpoint
    directory: what ``--model DIR`` loads, without the hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chosen = [f"w{i}" for i in range(253)] if vocabulary is None else list(vocabulary)
    words = ["[PAD]", "[UNK]", "[EOS]", *chosen]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    model = tiny_causal_lm(family, len(words), seed=seed)
    model.config.pad_token_id, model.config.eos_token_id = 0, 2
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def heads_and_what_joins(model, heads, forward):
    """Run ``forward()`` once capturing each layer's head contributions (``capture_z`` with
    ``contributions=True``, layer -> (batch, position, head, d_head)) and what joins the
    residual stream after attention (the output of the post-attention norm where the family
    has one, else of o_proj, layer -> (batch, position, d_model))."""
    from somp_ref.adapters.capture import capture_z

    targets = heads.attn_out_norms if heads.attn_out_norms is not None else heads.o_proj
    joined = {}
    handles = [
        module.register_forward_hook(lambda mod, a, out, i=i: joined.__setitem__(i, out))
        for i, module in enumerate(targets)
    ]
    try:
        with capture_z(model, contributions=True) as captured:
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return captured, joined
