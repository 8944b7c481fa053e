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
