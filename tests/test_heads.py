"""Factored per-head SOMP, ranking, and head selection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose
from problems import assert_same_selection
from stores import write_planted_store

from somp_ref import layer_reads, ll_head_score, somp
from somp_ref.heads import (
    HeadScores,
    head_signature,
    head_somp,
    jaccard,
    layer_shortfall,
    random_heads_like,
    rank_heads,
    top_heads,
)

#: Factored and materialised pursuits differ only in the order of float64 sums (E Z^T vs
#: (Z W^T) D^T): rounding of ~eps * d per entry, far below this.
EV_ATOL = 1e-9
CONCEPT = (3, 7, 11, 19, 23)


@st.composite
def factored_heads(draw):
    n = draw(st.integers(1, 15))
    d_head = draw(st.integers(1, 6))
    d_model = draw(st.integers(d_head, 20))
    v = draw(st.integers(1, 25))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    z = rng.standard_normal((n, d_head)) + rng.standard_normal(d_head) * draw(
        st.sampled_from([0.0, 3.0])
    )
    o_proj_head = rng.standard_normal((d_model, d_head))
    D = rng.standard_normal((v, d_model))
    return z, o_proj_head, D


@given(factored_heads(), st.integers(1, 12), st.booleans(), st.sampled_from(["l1", "l2"]))
def test_factored_somp_equals_somp_on_materialised_head(case, n_atoms, center, criterion):
    z, o_proj_head, D = case
    H = z @ o_proj_head.T
    factored = head_somp(z, o_proj_head, D, n_atoms, center=center, criterion=criterion)
    direct = somp(H, D, n_atoms, center=center, criterion=criterion)
    prefix = assert_same_selection(
        factored.support, direct.support, H - direct.mean, D, criterion=criterion
    )
    assert_allclose(factored.mean, direct.mean, rtol=1e-12, atol=1e-12 * np.abs(H).max())
    if prefix == factored.n_selected == direct.n_selected:
        assert_allclose(
            factored.explained_variance, direct.explained_variance, rtol=0, atol=EV_ATOL
        )
        scale = max(np.abs(direct.coef).max(initial=0.0), 1e-300)
        assert_allclose(factored.coef, direct.coef, rtol=0, atol=1e-7 * scale)


def test_head_somp_rejects_mismatched_factors():
    with pytest.raises(ValueError, match=r"o_proj_head must have d_head=3 columns like z"):
        head_somp(np.ones((4, 3)), np.ones((5, 2)), np.ones((6, 5)))
    with pytest.raises(ValueError, match=r"o_proj_head must have d_model=4 rows like D"):
        head_somp(np.ones((4, 3)), np.ones((5, 3)), np.ones((6, 4)))


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory):
    return write_planted_store(tmp_path_factory.mktemp("store") / "s", concept=CONCEPT)


def test_planted_concept_heads_rank_first(planted_store):
    scores = rank_heads(planted_store, list(CONCEPT), 5, show_progress=False)
    assert set(top_heads(scores, 2)) == {(1, 2), (2, 0)}
    assert set(scores.supports[1, 2].tolist()) == set(CONCEPT)


def test_rank_scores_are_somp_and_ll_of_each_materialised_head(planted_store):
    ids = [3, 7, 11, 40, 41, 42]
    D = np.asarray(planted_store.unembed()[ids], np.float64)
    ranked = rank_heads(planted_store, ids, 4, show_progress=False)
    ll = rank_heads(planted_store, ids, 4, "ll", show_progress=False)
    for layer in range(planted_store.n_layers):
        for head in range(planted_store.n_heads):
            H = planted_store.head_output(layer, head)
            expected = somp(H, D, 4)
            assert abs(ranked.score[layer, head] - expected.explained_variance[-1]) <= EV_ATOL
            assert ranked.details["explained_variance"][layer, head] == ranked.score[layer, head]
            # The mean logit: a sum of n * v * d products, each exact to ~eps of |H| |D|.
            scale = np.abs(H).max() * np.abs(D).max() * D.shape[1]
            assert abs(ll.score[layer, head] - ll_head_score(H, D)) <= 1e-13 * scale
            logits = (H @ D.T).mean(axis=0)
            assert ll.supports[layer, head].tolist() == [ids[i] for i in np.argsort(-logits)[:4]]


def test_excluded_layers_are_nan_and_never_selected(planted_store):
    scores = rank_heads(planted_store, list(CONCEPT), 3, exclude_layers=[1], show_progress=False)
    assert np.isnan(scores.score[1]).all()
    assert not np.isnan(scores.score[[0, 2]]).any()
    assert all(layer != 1 for layer, _ in top_heads(scores, 12))
    assert scores.params["exclude_layers"] == [1]


def test_rank_rejects_bad_token_ids(planted_store):
    with pytest.raises(ValueError, match=r"token_ids must be in \[0, 60\)"):
        rank_heads(planted_store, [1, 60], show_progress=False)
    with pytest.raises(ValueError, match=r"non-empty 1-D"):
        rank_heads(planted_store, [], show_progress=False)
    with pytest.raises(ValueError, match=r"method must be one of 'somp', 'll', 'specificity'"):
        rank_heads(planted_store, [1], method="pca", show_progress=False)


def test_duplicate_token_ids_are_dropped_keeping_order(planted_store):
    scores = rank_heads(planted_store, [7, 3, 7, 11, 3], 2, show_progress=False)
    assert scores.token_ids.tolist() == [7, 3, 11]
    assert scores.tokens == ["green", "red", "blue"]


def test_scores_round_trip_through_json_and_csv(planted_store, tmp_path):
    scores = rank_heads(planted_store, list(CONCEPT), 3, exclude_layers=[0], show_progress=False)
    scores.to_json(tmp_path / "s.json")
    back = HeadScores.from_json(tmp_path / "s.json")
    assert np.array_equal(back.score, scores.score, equal_nan=True)
    assert np.array_equal(
        back.details["explained_variance"], scores.details["explained_variance"], equal_nan=True
    )
    assert back.supports.keys() == scores.supports.keys()
    for key in scores.supports:
        assert np.array_equal(back.supports[key], scores.supports[key])
        assert np.array_equal(back.increments[key], scores.increments[key])
    assert back.params == scores.params and back.tokens == scores.tokens
    scores.to_csv(tmp_path / "s.csv")
    from_csv = HeadScores.from_csv(tmp_path / "s.csv")
    assert np.array_equal(from_csv.score, scores.score, equal_nan=True)  # repr() keeps every bit
    assert top_heads(from_csv, 5) == top_heads(scores, 5)


def test_head_signature_lists_the_tokens_a_planted_head_writes(planted_store):
    rows = head_signature(planted_store, 1, 2, n_atoms=5)
    assert {text for _, text, _ in rows} == {"red", "green", "blue", "yellow", "purple"}
    gains = [gain for *_, gain in rows]
    assert all(g >= 0 for g in gains) and sum(gains) > 0.99


# ------------------------------------------------------------------ selection


def scores_from(values: np.ndarray) -> HeadScores:
    return HeadScores(values, {}, {}, "somp", {}, np.zeros(0, dtype=np.int64))


def test_top_heads_orders_best_first_ties_by_position_and_skips_nan():
    values = np.array([[0.5, np.nan, 0.9], [0.9, 0.1, 0.5]])
    assert top_heads(scores_from(values), 4) == [(0, 2), (1, 0), (0, 0), (1, 2)]
    assert top_heads(scores_from(values), 0) == []
    assert len(top_heads(scores_from(values), 99)) == 5
    with pytest.raises(ValueError, match=r"k must be an integer >= 0, got -1"):
        top_heads(scores_from(values), -1)


heads_strategy = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 7)), max_size=20, unique=True)


def count(heads, layer):
    return sum(1 for lay, _ in heads if lay == layer)


@given(heads_strategy, st.integers(0, 2**31))
def test_random_heads_like_is_disjoint_and_keeps_the_count_per_layer(heads, seed):
    drawn = random_heads_like(heads, 6, 8, seed)
    assert len(set(drawn)) == len(drawn) == len(heads)
    assert not set(drawn) & set(heads)  # the paper's control never reuses a selected head
    short = layer_shortfall(heads, 8)
    for layer in range(6):
        if layer in short:  # every free head of the layer, the rest from its neighbours
            assert count(drawn, layer) == 8 - count(heads, layer)
        elif not short:
            assert count(drawn, layer) == count(heads, layer)
    assert drawn == random_heads_like(heads, 6, 8, seed)  # reproducible


@given(heads_strategy, st.integers(0, 2**31))
def test_random_heads_like_without_disjointness_keeps_every_count(heads, seed):
    drawn = random_heads_like(heads, 6, 8, seed, disjoint=False)
    assert all(count(drawn, layer) == count(heads, layer) for layer in range(6))


def test_a_full_layer_borrows_from_its_nearest_neighbours():
    heads = [(2, h) for h in range(6)]  # 6 of 8: only 2 free heads left in layer 2
    assert layer_shortfall(heads, 8) == {2: 4}
    drawn = random_heads_like(heads, 5, 8, seed=0)
    assert count(drawn, 2) == 2 and {lay for lay, _ in drawn} <= {1, 2, 3}


def test_random_heads_like_varies_with_seed_and_checks_bounds():
    heads = [(0, 0), (0, 1), (2, 3)]
    assert len({tuple(random_heads_like(heads, 3, 8, s)) for s in range(20)}) > 1
    with pytest.raises(ValueError, match=r"head \(3, 0\) is outside 3 x 8"):
        random_heads_like([(3, 0)], 3, 8, 0)


@given(heads_strategy, heads_strategy)
def test_jaccard_is_a_symmetric_similarity(a, b):
    value = jaccard(a, b)
    assert 0.0 <= value <= 1.0
    assert value == jaccard(b, a)
    assert jaccard(a, a) == 1.0
    union = set(a) | set(b)
    assert value == (1.0 if not union else len(set(a) & set(b)) / len(union))


def test_jaccard_examples():
    assert jaccard([(0, 1), (2, 3)], [(2, 3), (4, 5)]) == 1 / 3
    assert jaccard([(0, 1)], [(1, 0)]) == 0.0
    assert jaccard([], []) == 1.0


@pytest.mark.parametrize("block", [None, 2])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_ranking_a_store_altered_to_hold_non_finite_values_is_an_error(
    tmp_path, monkeypatch, bad, block
):
    import hashlib
    import json
    import struct

    from somp_ref.store import ActivationStore, StoreError, layer_file

    store = write_planted_store(tmp_path / "s")
    path = store.path / layer_file(1)
    raw = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    start = 8 + length + json.loads(raw[8 : 8 + length])["z"]["data_offsets"][0]
    # z is (n_samples, n_heads, d_head) float32: sample 5, head 2, first coordinate.
    where = start + 4 * (5 * store.n_heads * store.d_head + 2 * store.d_head)
    raw[where : where + 4] = struct.pack("<f", bad)
    # As if written so by other code: meta.json records the altered file, so its content
    # checks out and only the ranking's own check can tell.
    path.write_bytes(bytes(raw))
    meta_path = store.path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"][layer_file(1)] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    meta_path.write_text(json.dumps(meta))
    store = ActivationStore.open(store.path)
    if block is not None:  # the layer is checked a block of samples at a time
        monkeypatch.setattr(layer_reads, "_FINITE_BLOCK", block)
    where = r"layer 1, head 2: z \(sample, d_head\) holds .* at \(5, 0\)"
    with pytest.raises(StoreError, match=where):
        rank_heads(store, list(CONCEPT), 4, show_progress=False)


@pytest.mark.parametrize("factor", [1e160, 1e-160])
def test_head_somp_is_scale_free(factor):
    # The factored energy squares z and W_O entries: at 1e160 it overflowed to inf and the
    # zero-signal rule reported an empty, "converged" support.
    rng = np.random.default_rng(3)
    z, w, D = (
        rng.standard_normal((20, 4)),
        rng.standard_normal((12, 4)),
        rng.standard_normal((9, 12)),
    )
    base = head_somp(z, w, D, 5)
    for args in ((z * factor, w, D), (z, w * factor, D), (z, w, D * factor)):
        scaled = head_somp(*args, 5)
        assert scaled.support.tolist() == base.support.tolist() and scaled.n_selected == 5
        assert_allclose(scaled.explained_variance, base.explained_variance, rtol=0, atol=EV_ATOL)
    scaled = head_somp(z * factor, w, D, 5)
    assert_allclose(scaled.coef, base.coef * factor, rtol=1e-8)
    assert_allclose(scaled.mean, base.mean * factor, rtol=1e-12, atol=1e-12 * factor)


def test_ranking_a_float64_store_of_extreme_values(tmp_path):
    from somp_ref.store import ActivationStore

    base = write_planted_store(tmp_path / "base", dtype="float64")
    ids = list(CONCEPT)
    path = tmp_path / "huge"
    with ActivationStore.create(
        path, n_layers=3, n_heads=4, d_head=6, d_model=24, dtype="float64"
    ) as store:
        for layer in range(3):
            z, w = base.layer(layer)
            store.write_layer(layer, z=np.asarray(z) * 1e155, o_proj=np.asarray(w) * 1e150)
        store.write_unembed(np.asarray(base.unembed()), vocab=base.vocab())
        store.write_samples(base.samples())
    huge = ActivationStore.open(path)
    expected = rank_heads(base, ids, 4, show_progress=False)
    got = rank_heads(huge, ids, 4, show_progress=False)
    assert_allclose(got.score, expected.score, rtol=0, atol=EV_ATOL)
    assert all(np.array_equal(got.supports[k], expected.supports[k]) for k in expected.supports)
    # The mean logit is not scale-free: 1e305 per head is a real value, past float64 a clear
    # error, never a number computed from inf.
    ll = rank_heads(huge, ids, 4, "ll", show_progress=False)
    plain = rank_heads(base, ids, 4, "ll", show_progress=False)
    assert_allclose(ll.score, plain.score * 1e305, rtol=1e-9)


@pytest.mark.parametrize("factor", [1e-200, 1e200, 1e300])
def test_a_heads_score_does_not_depend_on_its_neighbours_scale(tmp_path, factor):
    """Scaling one head's o_proj columns leaves every other head's ranking as it was (bit
    for bit: their columns are not touched) and its own explained variance to rounding."""
    from somp_ref.store import ActivationStore

    base = write_planted_store(tmp_path / "base", dtype="float64")
    ids = list(CONCEPT)
    path = tmp_path / "one_head_scaled"
    d_head = base.d_head
    with ActivationStore.create(
        path, n_layers=3, n_heads=4, d_head=d_head, d_model=24, dtype="float64"
    ) as store:
        for layer in range(3):
            z, w = base.layer(layer)
            w = np.array(w)
            w[:, d_head : 2 * d_head] *= factor  # head 1 of every layer
            store.write_layer(layer, z=np.asarray(z), o_proj=w)
        store.write_unembed(np.asarray(base.unembed()), vocab=base.vocab())
        store.write_samples(base.samples())
    scaled = ActivationStore.open(path)
    for method in ("somp", "ll"):
        expected = rank_heads(base, ids, 4, method, show_progress=False)
        got = rank_heads(scaled, ids, 4, method, show_progress=False)
        others = [0, 2, 3]
        assert np.array_equal(got.score[:, others], expected.score[:, others]), method
        for layer in range(3):
            for head in others:
                key = (layer, head)
                assert np.array_equal(got.supports[key], expected.supports[key]), (method, key)
        if method == "somp":  # scale-free
            assert_allclose(got.score[:, 1], expected.score[:, 1], rtol=0, atol=EV_ATOL)
        else:  # the mean logit scales with the weights
            assert_allclose(got.score[:, 1], expected.score[:, 1] * factor, rtol=1e-9)


def test_ranking_with_every_layer_excluded_is_an_error(planted_store):
    with pytest.raises(ValueError, match="no layer left to rank"):
        rank_heads(planted_store, list(CONCEPT), exclude_layers=[0, 1, 2], show_progress=False)


def test_a_mean_logit_past_float64_is_a_clear_error(tmp_path):
    from somp_ref.store import ActivationStore, StoreError

    base = write_planted_store(tmp_path / "base", dtype="float64")
    path = tmp_path / "huge"
    with ActivationStore.create(
        path, n_layers=3, n_heads=4, d_head=6, d_model=24, dtype="float64"
    ) as store:
        for layer in range(3):
            z, w = base.layer(layer)
            store.write_layer(layer, z=np.asarray(z) * 1e300, o_proj=np.asarray(w) * 1e300)
        store.write_unembed(np.asarray(base.unembed()), vocab=base.vocab())
        store.write_samples(base.samples())
    with pytest.raises(StoreError, match="a mean logit overflows float64"):
        rank_heads(ActivationStore.open(path), list(CONCEPT), 4, "ll", show_progress=False)


def test_scores_as_a_pandas_table(planted_store):
    pd = pytest.importorskip("pandas")
    scores = rank_heads(planted_store, list(CONCEPT), 4, show_progress=False)
    table = scores.to_pandas()
    assert isinstance(table, pd.DataFrame)
    assert list(table[["layer", "head"]].itertuples(index=False, name=None)) == scores.ranked()
    assert table["score"].is_monotonic_decreasing
    assert table.loc[0, "support"] == [scores.token_string(t) for t in scores.supports[1, 2]] or (
        table.loc[0, "support"] == [scores.token_string(t) for t in scores.supports[2, 0]]
    )
    assert np.array_equal(table["explained_variance"], table["score"])


# ------------------------------------------------- non-finite values met while ranking


def _word_store(path):
    """The planted store with word-like vocabulary strings of 3 to 7 letters, so that every
    ranking method has null dictionaries to draw (``tokN`` strings are not words)."""
    from somp_ref.store import ActivationStore

    base = write_planted_store(path.parent / f"{path.name}-base")
    words = [
        "".join(chr(97 + (7 * i + 3 * k) % 26) for k in range(3 + i % 5))
        for i in range(base.unembed().shape[0])
    ]
    vocab = base.vocab()
    for token in CONCEPT:
        words[token] = vocab[token]  # red, green, ...
    with ActivationStore.create(
        path, n_layers=3, n_heads=4, d_head=6, d_model=24, meta={"model_id": "synthetic"}
    ) as store:
        for layer in range(3):
            z, o_proj = base.layer(layer)
            store.write_layer(layer, z=z, o_proj=o_proj)
        store.write_unembed(base.unembed(), base.final_norm(), vocab=words)
        store.write_samples(base.samples())
    return path


def _alter(path, name: str, tensor: str, places, value: float) -> None:
    """Set ``tensor``'s entries at ``places`` (index tuples) in the store file ``name`` to
    ``value``, and record the file in meta.json as if written so: its hash checks out, and
    only the ranking's own checks can tell."""
    import hashlib
    import json
    import struct

    file = path / name
    raw = bytearray(file.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    entry = json.loads(raw[8 : 8 + length])[tensor]
    dtype = np.dtype({"F16": "<f2", "F32": "<f4", "F64": "<f8"}[entry["dtype"]])
    for place in places:
        flat = int(np.ravel_multi_index(place, entry["shape"]))
        at = 8 + length + entry["data_offsets"][0] + flat * dtype.itemsize
        raw[at : at + dtype.itemsize] = np.array(value, dtype=dtype).tobytes()
    file.write_bytes(bytes(raw))
    meta = json.loads((path / "meta.json").read_text())
    meta["files"][name] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (path / "meta.json").write_text(json.dumps(meta))


ALL_METHODS = ("somp", "ll", "specificity", "excess", "share")
NON_FINITE = pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])


def _ranks(path, method):
    from somp_ref.store import ActivationStore

    store = ActivationStore.open(path)
    return rank_heads(store, list(CONCEPT), 4, method, n_null=2, show_progress=False)


def _inspect_fails(path, head: str, match: str, capsys) -> None:
    """``somp-ref inspect STORE --head L.H``: one line, exit status 2, naming the value."""
    import re

    from somp_ref.cli import main

    assert main(["inspect", str(path), "--head", head, "--atoms", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("somp-ref inspect: error: "), err
    assert re.search(match, err), err


def test_the_word_store_ranks_by_every_method(tmp_path):
    path = _word_store(tmp_path / "s")
    for method in ALL_METHODS:
        assert np.isfinite(_ranks(path, method).score).all(), method


@NON_FINITE
def test_a_non_finite_o_proj_value_is_an_error_for_every_method_and_inspect(tmp_path, capsys, bad):
    from somp_ref.store import StoreError, layer_file

    path = _word_store(tmp_path / "s")
    _alter(path, layer_file(1), "o_proj", [(5, 13)], bad)  # head 2's columns: 12-17
    where = rf"layer 1: o_proj holds {bad} at \(5, 13\); the store is corrupt"
    for method in ALL_METHODS:
        with pytest.raises(StoreError, match=where):
            _ranks(path, method)
    _inspect_fails(path, "1.2", rf"layer 1: o_proj holds {bad} at \(5, 1\)", capsys)


@NON_FINITE
def test_a_non_finite_value_in_a_concept_row_is_an_error_for_every_method_and_inspect(
    tmp_path, capsys, bad
):
    from somp_ref.store import UNEMBED_FILE, StoreError

    path = _word_store(tmp_path / "s")
    _alter(path, UNEMBED_FILE, "unembed", [(CONCEPT[1], 3)], bad)
    where = rf"unembed row {CONCEPT[1]} \(token id, d_model\) holds {bad} at \(3,\); the store"
    for method in ALL_METHODS:
        with pytest.raises(StoreError, match=where):
            _ranks(path, method)
    # The signature pursues over the whole vocabulary: the row is found by its token id.
    _inspect_fails(path, "0.0", rf"unembed row {CONCEPT[1]} .*holds {bad} at \(3,\)", capsys)


@NON_FINITE
def test_a_non_finite_value_in_a_null_dictionarys_row_is_an_error(tmp_path, capsys, bad):
    """Every row outside the concept holds one: the concept's own rankings ("somp", "ll")
    read the concept's rows only and are right to succeed; every null dictionary meets
    one, and no score is computed from it."""
    import re

    from somp_ref.store import UNEMBED_FILE, StoreError

    path = _word_store(tmp_path / "s")
    others = [token for token in range(60) if token not in CONCEPT]
    _alter(path, UNEMBED_FILE, "unembed", [(token, 0) for token in others], bad)
    for method in ("somp", "ll"):
        assert np.isfinite(_ranks(path, method).score).all(), method
    where = rf"unembed row (\d+) \(token id, d_model\) holds {bad} at \(0,\); the store is"
    for method in ("specificity", "excess", "share"):
        with pytest.raises(StoreError, match=where) as raised:
            _ranks(path, method)
        assert int(re.search(where, str(raised.value))[1]) in others, method
    _inspect_fails(path, "1.2", rf"unembed row {others[0]} .*holds {bad} at \(0,\)", capsys)


@NON_FINITE
def test_a_non_finite_z_value_is_an_error_for_inspect(tmp_path, capsys, bad):
    from somp_ref.store import layer_file

    path = _word_store(tmp_path / "s")
    _alter(path, layer_file(2), "z", [(7, 0, 4)], bad)
    _inspect_fails(path, "2.0", rf"layer 2: z holds {bad} at \(7, 4\)", capsys)
    from somp_ref.cli import main

    assert main(["inspect", str(path), "--head", "2.1", "--atoms", "3"]) == 0  # another head
