"""Who ranks: ``workers`` (a pool of processes) and the ``rank`` command's ``--engine``,
``--device`` and ``--workers``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import tempfile

import numpy as np
import pytest
from numpy.testing import assert_allclose
from stores import write_planted_store

from somp_ref import factored, layer_pool
from somp_ref.cli import main
from somp_ref.cli_options import available_cpus, rank_engine_options
from somp_ref.factored import Dictionary
from somp_ref.head_loop import score_heads
from somp_ref.layer_pool import PARALLEL_MIN_VALUES
from somp_ref.layer_reads import checked_atoms
from somp_ref.ranking import rank_heads
from somp_ref.store import ActivationStore, StoreError

CONCEPT = [3, 7, 11, 19, 23]
#: The torch engine in float64 on the CPU differs from numpy's only in the order of its
#: float64 sums (batched products): explained variances agree to rounding, far below this.
TORCH_EV_ATOL = 1e-9

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="needs the hf extra (torch)"
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_planted_store(tmp_path_factory.mktemp("engines") / "store", n_layers=4)


def assert_identical(a, b):
    """Same HeadScores, bit for bit (NaN where unscored)."""
    assert np.array_equal(a.score, b.score, equal_nan=True)
    assert a.supports.keys() == b.supports.keys()
    for head in a.supports:
        assert np.array_equal(a.supports[head], b.supports[head]), head
        assert np.array_equal(a.increments[head], b.increments[head]), head
    assert a.details.keys() == b.details.keys()
    for key in a.details:
        assert np.array_equal(a.details[key], b.details[key], equal_nan=True), key


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_two_workers_give_the_scores_of_one_bit_for_bit(store, criterion):
    one = score_heads(store, CONCEPT, 4, criterion=criterion, show_progress=False)
    two = score_heads(store, CONCEPT, 4, criterion=criterion, workers=2, show_progress=False)
    assert_identical(one, two)


@pytest.fixture(scope="module")
def word_store(tmp_path_factory):
    """Three random layers over a vocabulary of word-like tokens (null dictionaries)."""
    rng = np.random.default_rng(1)
    vocab, d_model, d_head, n_heads, n = 120, 16, 3, 2, 30
    path = tmp_path_factory.mktemp("words") / "store"
    with ActivationStore.create(
        path, n_layers=3, n_heads=n_heads, d_head=d_head, d_model=d_model
    ) as st:
        for layer in range(3):
            z = rng.standard_normal((n, n_heads, d_head))
            st.write_layer(layer, z=z, o_proj=rng.standard_normal((d_model, n_heads * d_head)))
        words = [" " + "".join(chr(97 + int(c)) for c in f"{i:03d}") for i in range(vocab)]
        st.write_unembed(rng.standard_normal((vocab, d_model)), vocab=words)
        st.write_samples([{"prompt": str(i)} for i in range(n)])
    return ActivationStore.open(path)


def test_the_dictionary_files_of_the_workers_are_removed(store, tmp_path, monkeypatch):
    # The workers memory-map the parent's dictionary from a temporary directory: gone
    # afterwards, whether the ranking ends or a worker fails.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    score_heads(store, CONCEPT, 4, workers=2, show_progress=False)
    assert list(tmp_path.iterdir()) == []  # made there, then removed
    broken = write_planted_store(tmp_path / "broken", n_layers=3)
    path = broken.path / "layer_001.safetensors"
    data = bytearray(path.read_bytes())
    data[-8:] = b"\xff" * 8  # the last o_proj values: NaN
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"layer_001|layer 1|corrupt|hash|changed"):
        score_heads(broken, CONCEPT, 4, workers=2, show_progress=False)
    assert list(tmp_path.glob("somp-ref-*")) == []


@pytest.mark.parametrize("with_gram", [True, False])
def test_the_workers_dictionary_files_map_back_to_the_parents_arrays(tmp_path, with_gram):
    rng = np.random.default_rng(2)
    atoms = rng.standard_normal((6, 8))
    atoms[1] *= 2.0**700  # outside the safe range: rescaled, so atom_exp is kept
    built = Dictionary.build(atoms)
    if not with_gram:  # as for a dictionary over MAX_GRAM_ATOMS
        built = dataclasses.replace(built, gram=None)
    layer_pool._write_dictionary(built, tmp_path)
    mapped = layer_pool._mapped_dictionary(tmp_path)
    for name in ("atoms", "sq_norms", "gram", "atom_exp"):
        given, received = getattr(built, name), getattr(mapped, name)
        if given is None:
            assert received is None, name
        else:
            assert isinstance(received, np.memmap) and not received.flags.writeable, name
            assert np.array_equal(received, given), name


def test_workers_without_a_gram_matrix_give_the_scores_of_one(store, monkeypatch):
    monkeypatch.setattr(factored, "MAX_GRAM_ATOMS", 2)  # the parent builds none to send
    one = score_heads(store, CONCEPT, 4, show_progress=False)
    two = score_heads(store, CONCEPT, 4, workers=2, show_progress=False)
    assert_identical(one, two)


def test_workers_rebuild_the_dictionary_where_it_cannot_be_written(store, monkeypatch):
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(layer_pool, "_write_dictionary", full)
    one = score_heads(store, CONCEPT, 4, show_progress=False)
    with pytest.warns(RuntimeWarning, match=r"each ranking worker rebuilds the dictionary"):
        two = score_heads(store, CONCEPT, 4, workers=2, show_progress=False)
    assert_identical(one, two)


@pytest.mark.parametrize("method", ["specificity", "excess", "share"])
def test_workers_reach_the_null_dictionaries_of_a_ranking(word_store, method):
    options = {"n_null": 3, "layers": [0, 2], "show_progress": False}
    one = rank_heads(word_store, CONCEPT, 4, method, **options)
    three = rank_heads(word_store, CONCEPT, 4, method, workers=3, **options)
    assert_identical(one, three)


def test_bad_workers_are_an_error(store):
    with pytest.raises(ValueError, match=r"workers must be >= 1, got 0"):
        score_heads(store, CONCEPT, 4, workers=0)
    with pytest.raises(ValueError, match=r"workers=2 runs the numpy engine in processes"):
        score_heads(store, CONCEPT, 4, engine="torch", workers=2)


def test_the_dictionary_read_from_a_store_is_checked_finite(store, monkeypatch):
    """The ranking and its workers take their atoms from checked_atoms: the concept's rows
    in float64, ids deduplicated in order, a NaN an error naming its row of the vocabulary
    (not its place in the dictionary); rows not asked for are not read."""
    ids, atoms = checked_atoms(store, [7, 3, 7, 11])
    assert ids.tolist() == [7, 3, 11] and atoms.dtype == np.float64
    assert np.array_equal(atoms, store.unembed()[[7, 3, 11]])
    altered = np.array(store.unembed(), dtype=np.float64)
    altered[CONCEPT[1], 2] = np.nan
    monkeypatch.setattr(ActivationStore, "unembed", lambda self: altered)
    where = rf"unembed row {CONCEPT[1]} \(token id, d_model\) holds nan at \(2,\)"
    with pytest.raises(StoreError, match=where):
        score_heads(store, CONCEPT, 4, show_progress=False)
    assert np.isfinite(checked_atoms(store, [CONCEPT[0], CONCEPT[2]])[1]).all()


def test_a_corrupt_layer_in_a_worker_is_the_store_error(tmp_path):
    store = write_planted_store(tmp_path / "s", n_layers=3)
    path = store.path / "layer_001.safetensors"
    data = bytearray(path.read_bytes())
    data[-8:] = b"\xff" * 8  # the last o_proj values: NaN
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"layer_001|layer 1|corrupt|hash|changed") as err:
        score_heads(store, CONCEPT, 4, workers=2, show_progress=False)
    with pytest.raises(type(err.value)):
        score_heads(store, CONCEPT, 4, show_progress=False)


def rank(store, tmp_path, name, *flags):
    out = tmp_path / f"{name}.csv"
    argv = ["rank", str(store.path), "--concept", "colors", "--method", "somp", "--out", str(out)]
    try:
        return main([*argv, "--atoms", "4", *flags]), out
    except SystemExit as usage:  # argparse's own errors: one line, status 2
        return usage.code, out


def test_rank_workers_flag_writes_the_same_ranking(store, tmp_path, capsys):
    status_one, one = rank(store, tmp_path, "one", "--workers", "1")
    status_two, two = rank(store, tmp_path, "two", "--workers", "2")
    assert status_one == status_two == 0
    assert one.read_text() == two.read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "0"], "argument --workers: must be >= 1, got 0"),
        (["--workers", "two"], "argument --workers: expected an integer, got 'two'"),
        (["--engine", "jax"], "argument --engine: invalid choice: 'jax'"),
        (["--device", "bogus:1"], "unknown device type 'bogus'"),
        (["--engine", "numpy", "--device", "cuda"], "the numpy engine runs on the CPU"),
        (["--engine", "torch", "--workers", "2"], "workers=2 runs the numpy engine"),
    ],
)
def test_bad_engine_flags_are_one_line_errors(store, tmp_path, capsys, flags, message):
    if "torch" in flags and importlib.util.find_spec("torch") is None:
        pytest.skip("needs the hf extra (torch)")
    status, out = rank(store, tmp_path, "bad", *flags)
    err = capsys.readouterr().err
    assert status == 2 and not out.exists()
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_device_torch_cannot_use_is_one_line_before_any_layer_is_read(store, tmp_path, capsys):
    pytest.importorskip("torch")
    status, out = rank(store, tmp_path, "bad", "--device", "cuda:99")  # absent on any machine
    err = capsys.readouterr().err
    assert status == 2 and not out.exists()
    assert "--device cuda:99:" in err and len(err.strip().splitlines()) == 1, err
    assert "rank (somp)" not in err  # refused before the ranking started


def engine_args(**flags) -> argparse.Namespace:
    return argparse.Namespace(**({"engine": None, "device": None, "workers": None} | flags))


def test_an_engine_that_cannot_import_says_how_to_install_it(monkeypatch):
    """The engine's hint and the model commands' are one install line."""
    from somp_ref import engines
    from somp_ref.adapters.preflight import INSTALL_LINE

    class Broken:
        name = "gpu"

        def load(self):
            raise ModuleNotFoundError("No module named 'torch'")

    monkeypatch.setattr(engines, "entry_points", lambda group: [Broken()])
    with pytest.raises(ImportError, match="needs the hf extra") as caught:
        engines.load_engine("gpu")
    assert engines.HF_INSTALL in str(caught.value) and engines.HF_INSTALL in INSTALL_LINE


def test_the_engine_flags_defaults():
    small, large = PARALLEL_MIN_VALUES // 16, PARALLEL_MIN_VALUES
    # Only what differs from rank_heads' defaults is passed on.
    assert rank_engine_options(engine_args(), 8, small) == {}
    assert rank_engine_options(engine_args(), 1, large) == {}
    expected = {} if available_cpus() == 1 else {"workers": available_cpus()}
    assert rank_engine_options(engine_args(), 2, large) == expected
    assert rank_engine_options(engine_args(workers=3), 1, small) == {"workers": 3}
    assert rank_engine_options(engine_args(device="cuda"), 32, large) == {
        "engine": "torch",
        "device": "cuda",
    }
    assert rank_engine_options(engine_args(device="cpu"), 2, small) == {"device": "cpu"}
    assert rank_engine_options(engine_args(engine="torch"), 32, large) == {"engine": "torch"}


@needs_torch
@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_the_torch_engine_on_the_cpu_agrees_with_numpy(store, criterion):
    numpy_scores = score_heads(store, CONCEPT, 4, criterion=criterion, show_progress=False)
    torch_scores = score_heads(
        store, CONCEPT, 4, criterion=criterion, engine="torch", show_progress=False
    )
    assert torch_scores.params["engine"] == "torch"
    assert_allclose(torch_scores.score, numpy_scores.score, rtol=0, atol=TORCH_EV_ATOL)
    for head, support in numpy_scores.supports.items():
        assert torch_scores.supports[head].tolist() == support.tolist(), head


@needs_torch
def test_the_batched_torch_pursuit_solves_coefficients_only_when_asked():
    import torch

    from somp_ref.adapters.torch_somp import somp_batched

    rng = np.random.default_rng(4)
    H, D = rng.standard_normal((2, 10, 6)), rng.standard_normal((7, 6))
    Ct = torch.as_tensor(np.einsum("vd,bnd->bvn", D, H))
    gram, energy = torch.as_tensor(D @ D.T), torch.as_tensor(np.einsum("bnd,bnd->b", H, H))
    full = somp_batched(Ct, gram, energy, 3)
    bare = somp_batched(Ct, gram, energy, 3, coefficients=False)
    assert "coef" in full and "coef" not in bare
    for key in bare:
        assert torch.equal(full[key], bare[key]), key


@needs_torch
def test_the_torch_zero_signal_rule_is_the_cores():
    """Equal rows leave only centering's rounding: no atom is pursued, as in numpy's somp,
    and the tensor rule decides as decisions.signal_energy does around its threshold."""
    import torch

    from somp_ref import somp
    from somp_ref.adapters import torch_somp
    from somp_ref.decisions import ZERO_RESIDUAL, signal_energy

    raw = 3.0
    centered = [0.0, 0.5 * ZERO_RESIDUAL * raw, ZERO_RESIDUAL * raw, 2 * ZERO_RESIDUAL * raw, 1.0]
    expected = [signal_energy(value, raw) for value in centered]
    found = torch_somp.signal_energy(torch.tensor(centered, dtype=torch.float64), torch.tensor(raw))
    assert found.tolist() == expected
    H = np.tile(np.random.default_rng(5).standard_normal(6) * 0.1, (8, 1))
    D = np.random.default_rng(6).standard_normal((7, 6))
    reference, port = somp(H, D, 3), torch_somp.somp_torch(H, D, 3)
    assert reference.support.tolist() == port.support.tolist() == []
    assert reference.stop_reason == port.stop_reason


@needs_torch
def test_rank_engine_torch_flag_agrees_with_numpy(store, tmp_path, capsys):
    status_numpy, numpy_csv = rank(store, tmp_path, "numpy", "--engine", "numpy")
    status_torch, torch_csv = rank(store, tmp_path, "torch", "--engine", "torch", "--device", "cpu")
    assert status_numpy == status_torch == 0
    rows = [path.read_text().splitlines() for path in (numpy_csv, torch_csv)]
    assert rows[0][0] == rows[1][0] and len(rows[0]) == len(rows[1])
    # Same heads in the same order (the planted ones first, far apart from the others).
    heads = [[line.split(",")[1:3] for line in lines[1:3]] for lines in rows]
    assert heads[0] == heads[1]
