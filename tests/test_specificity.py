"""The specificity score: a planted concept head beats an embedding-copy head that raw
explained variance cannot tell apart."""

from __future__ import annotations

import numpy as np
import pytest

from somp_ref.heads import rank_heads, specificity_scores, top_heads, word_token_pool
from somp_ref.store import ActivationStore

CONCEPT = [10, 20, 30, 40, 50]
COPY, CONCEPT_HEAD, NOISE = 0, 1, 2


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One layer, three heads, over an anisotropic vocabulary (every token embedding shares
    one direction m, as in models with tied embeddings).

    Head 0 copies "the embedding direction" (it writes s_i m): any token dictionary explains
    it. Head 1 writes mixtures of the concept tokens only. Head 2 writes noise.
    """
    rng = np.random.default_rng(0)
    vocab, d_model, d_head, n = 300, 32, 4, 80
    m = rng.standard_normal(d_model)
    m /= np.linalg.norm(m)
    unembed = 4.0 * m + rng.standard_normal((vocab, d_model)) / np.sqrt(d_model)
    o_proj = np.zeros((d_model, 3 * d_head))
    o_proj[:, 0] = m
    o_proj[:, 1:d_head] = 0.01 * rng.standard_normal((d_model, d_head - 1))
    o_proj[:, d_head : 2 * d_head] = unembed[CONCEPT].T @ rng.standard_normal((5, d_head))
    o_proj[:, 2 * d_head :] = rng.standard_normal((d_model, d_head))
    z = rng.standard_normal((n, 3, d_head))
    path = tmp_path_factory.mktemp("spec") / "store"
    with ActivationStore.create(path, n_layers=1, n_heads=3, d_head=d_head, d_model=d_model) as st:
        st.write_layer(0, z=z, o_proj=o_proj)
        words = [" " + "".join(chr(97 + int(c)) for c in f"{i:03d}") for i in range(vocab)]
        st.write_unembed(unembed, vocab=words)
        st.write_samples([{"prompt": str(i)} for i in range(n)])
    return ActivationStore.open(path)


def test_raw_explained_variance_cannot_tell_copy_head_from_concept_head(store):
    raw = rank_heads(store, CONCEPT, 5, show_progress=False)
    assert raw.score[0, COPY] >= 0.9  # explains "any" dictionary
    assert raw.score[0, CONCEPT_HEAD] >= 0.99


def test_specificity_ranks_only_the_concept_head_high(store):
    spec = specificity_scores(store, CONCEPT, 5, n_null=8, seed=1, show_progress=False)
    assert top_heads(spec, 1) == [(0, CONCEPT_HEAD)]
    z = spec.score[0]
    assert z[CONCEPT_HEAD] > 5.0  # many null standard deviations above random dictionaries
    assert z[COPY] < 3.0 and z[NOISE] < 3.0
    assert np.array_equal(
        spec.details["explained_variance"], rank_heads(store, CONCEPT, 5, show_progress=False).score
    )
    assert top_heads(rank_heads(store, CONCEPT, 5, "specificity", n_null=8, seed=1), 1) == [
        (0, CONCEPT_HEAD)
    ]
    assert spec.method == "specificity" and spec.params["n_null"] == 8


def test_specificity_is_reproducible_and_validates(store):
    a = specificity_scores(store, CONCEPT, 3, n_null=3, seed=4, show_progress=False)
    b = specificity_scores(store, CONCEPT, 3, n_null=3, seed=4, show_progress=False)
    assert np.array_equal(a.score, b.score)
    with pytest.raises(ValueError, match=r"n_null must be >= 2"):
        specificity_scores(store, CONCEPT, 3, n_null=1, show_progress=False)


def test_word_token_pool_keeps_word_like_tokens():
    vocab = [" red", "red", " r", "!!", " Blue", "<|im_end|>", " über", "abc1"]
    assert word_token_pool(vocab, len(vocab)).tolist() == [0, 1, 4]
    assert word_token_pool(None, 5).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("method", ["excess", "share"])
def test_the_null_based_rankings_rank_only_the_concept_head_high(store, method):
    scores = rank_heads(store, CONCEPT, 5, method, n_null=6, seed=2, show_progress=False)
    assert top_heads(scores, 1) == [(0, CONCEPT_HEAD)]
    assert scores.method == method
    raw = rank_heads(store, CONCEPT, 5, show_progress=False)
    assert np.array_equal(scores.details["explained_variance"], raw.score)
    if method == "excess":  # the concept's EV minus the matched nulls' mean
        assert np.allclose(scores.score, raw.score - scores.details["null_mean"])
    else:  # the concept's share of an SOMP over concept + common words: at most its own EV
        assert np.all(scores.score <= scores.details["explained_variance_words"] + 1e-12)
        assert all(set(s.tolist()) <= set(CONCEPT) for s in scores.supports.values())


def test_matched_null_tokens_look_like_the_concept_tokens():
    from somp_ref.null_dictionaries import matched_draws

    rng = np.random.default_rng(5)
    words = ["".join(rng.choice(list("abcdefghij"), rng.integers(3, 9))) for _ in range(3000)]
    vocab = [
        (" " if i % 2 else "") + (w.capitalize() if i % 3 == 0 else w) for i, w in enumerate(words)
    ]
    concept = np.array([101, 202, 303, 1500, 2999])
    for draw in matched_draws(vocab, concept, 4, seed=0):
        assert draw.size == concept.size and not set(draw) & set(concept.tolist())
        for null in draw.tolist():
            # some concept token shares its space, case and (within one) length
            assert any(
                vocab[null].startswith(" ") == vocab[c].startswith(" ")
                and vocab[null].lstrip()[0].isupper() == vocab[c].lstrip()[0].isupper()
                and abs(len(vocab[null].strip()) - len(vocab[c].strip())) <= 1
                for c in concept
            )
    first, second = (
        matched_draws(vocab, concept, 2, seed=1),
        matched_draws(vocab, concept, 2, seed=1),
    )
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
