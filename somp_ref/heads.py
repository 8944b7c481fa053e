"""Rank attention heads by how well a concept's atoms explain what they write.

A head's contribution to the residual stream is low-rank, ``H_h = Z_h W_O[:, h]^T`` with
``Z_h`` (n_samples, d_head). Everything here works on those factors: the correlations with
the atoms are ``E_h Z_h^T`` with ``E_h = D W_O[:, h]`` (one product per layer for all its
heads), so the (n_samples, d_model) matrix is never built.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from somp_ref.inputs import as_matrix, check_choice, check_positive_int, check_tolerance
from somp_ref.lens import best_atoms
from somp_ref.progress import progress
from somp_ref.pursuit import (
    _NORM_ORDER,
    SompResult,
    _pursue,
    _signal_energy,
    pursuit_result,
    solve_factored_coef,
)
from somp_ref.store import ActivationStore, StoreError

Head = tuple[int, int]
METHODS = ("somp", "ll")


@dataclass
class HeadScores:
    """Per-head scores of one ranking.

    Attributes
    ----------
    explained_variance : ndarray of shape (n_layers, n_heads), float64
        The ranking score: SOMP's explained variance after its atoms (method "somp") or the
        Logit Lens head score (method "ll"). NaN for heads not ranked (excluded layers).
    supports : dict of (layer, head) -> ndarray of int64
        Token ids SOMP selected, in order (for "ll": the tokens most often best, most
        frequent first).
    increments : dict of (layer, head) -> ndarray of float64
        Explained variance each support token added (for "ll": the fraction of samples
        where it was best).
    method : str
    params : dict
        Every parameter of the ranking (n_atoms, center, criterion, layers, ...).
    token_ids : ndarray of int64
        The dictionary: unembedding rows used as atoms.
    tokens : list of str, optional
        Strings of ``token_ids`` when the store knows its vocabulary.
    source : dict
        Where the activations came from (store path, model id, positions rule).
    details : dict of str -> ndarray of shape (n_layers, n_heads)
        Method-specific per-head arrays (for "specificity": the concept EV and the null
        distribution's mean and standard deviation).
    """

    explained_variance: np.ndarray
    supports: dict[Head, np.ndarray]
    increments: dict[Head, np.ndarray]
    method: str
    params: dict[str, Any]
    token_ids: np.ndarray
    tokens: list[str] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    details: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.explained_variance.shape[0]

    @property
    def n_heads(self) -> int:
        return self.explained_variance.shape[1]

    def token_string(self, token_id: int) -> str:
        """The string of a dictionary token (its id in brackets when unknown)."""
        if self.tokens is not None:
            where = np.flatnonzero(self.token_ids == token_id)
            if where.size:
                return self.tokens[int(where[0])]
        return f"[{token_id}]"

    # -------------------------------------------------------------- persistence

    def to_json(self, path: str | os.PathLike) -> None:
        """Write everything (full fidelity) as JSON."""
        payload = {
            "format": "somp_ref.head_scores",
            "version": 1,
            "method": self.method,
            "params": self.params,
            "source": self.source,
            "token_ids": self.token_ids.tolist(),
            "tokens": self.tokens,
            "details": {key: _nan_to_none(value) for key, value in self.details.items()},
            "explained_variance": _nan_to_none(self.explained_variance),
            "heads": [
                {
                    "layer": layer,
                    "head": head,
                    "support": self.supports[layer, head].tolist(),
                    "increments": self.increments[layer, head].tolist(),
                }
                for layer, head in sorted(self.supports)
            ],
        }
        from somp_ref.files import write_text_atomically

        write_text_atomically(path, json.dumps(payload, ensure_ascii=False, indent=1))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> HeadScores:
        """Read what :meth:`to_json` wrote; ValueError naming the file and field if it is
        malformed (see :func:`somp_ref.score_files.read_scores_json`)."""
        from somp_ref.score_files import read_scores_json

        return cls(**read_scores_json(path))

    def to_csv(self, path: str | os.PathLike) -> None:
        """One row per head, best first: rank, layer, head, score, method, support tokens."""
        import io

        from somp_ref.files import write_text_atomically
        from somp_ref.score_files import CSV_COLUMNS

        order = top_heads(self, np.count_nonzero(~np.isnan(self.explained_variance)))
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(CSV_COLUMNS)
        for rank, (layer, head) in enumerate(order, start=1):
            support = self.supports.get((layer, head), np.zeros(0, dtype=np.int64))
            writer.writerow(
                [
                    rank,
                    layer,
                    head,
                    repr(float(self.explained_variance[layer, head])),
                    self.method,
                    " ".join(map(str, support.tolist())),
                    json.dumps([self.token_string(t) for t in support], ensure_ascii=False),
                ]
            )
        write_text_atomically(path, text.getvalue())

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> HeadScores:
        """Read the scores (and supports) back from :meth:`to_csv`'s file; ValueError naming
        the file and line if it is malformed (see :func:`somp_ref.score_files.read_scores_csv`)."""
        from somp_ref.score_files import read_scores_csv

        return cls(**read_scores_csv(path))


def _nan_to_none(values: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(x) else float(x) for x in row] for row in values]


def _none_to_nan(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if x is None else x for x in row] for row in rows], dtype=np.float64)


# ------------------------------------------------------------------ per-head pursuit


@dataclass(frozen=True)
class _Dictionary:
    """A dictionary with the products every head reuses: Gram matrix and squared norms."""

    atoms: np.ndarray  # (v, d_model)
    gram: np.ndarray  # (v, v)
    sq_norms: np.ndarray  # (v,)

    @classmethod
    def build(cls, atoms: np.ndarray) -> _Dictionary:
        gram = atoms @ atoms.T
        return cls(atoms, gram, np.diag(gram).copy())


def _factored_somp(
    z: np.ndarray,
    o_proj_head: np.ndarray,
    projected: np.ndarray,
    dictionary: _Dictionary,
    n_atoms: int,
    *,
    center: bool,
    normalize: bool,
    order: int,
    tol: float,
) -> SompResult:
    """SOMP of ``z @ o_proj_head.T`` given ``projected = D @ o_proj_head`` (v, d_head)."""
    mean_z = z.mean(axis=0) if center else np.zeros(z.shape[1])
    zc = z - mean_z
    gram_w = o_proj_head.T @ o_proj_head
    energy = max(float(np.einsum("ij,ij->", zc @ gram_w, zc)), 0.0)
    if center:
        energy = _signal_energy(energy, float(np.einsum("ij,ij->", z @ gram_w, z)))
    Ct = projected @ zc.T
    support, At, U, gains, reason = _pursue(
        Ct,
        dictionary.gram.__getitem__,
        dictionary.sq_norms,
        energy,
        min(n_atoms, Ct.shape[0]),
        order=order,
        normalize=normalize,
        tol=tol,
        refit=True,
    )
    coef = solve_factored_coef(At, U, support)
    energies = energy - np.concatenate([[0.0], np.cumsum(gains)])
    return pursuit_result(support, coef, energies, reason, mean_z @ o_proj_head.T)


def head_somp(
    z,
    o_proj_head,
    D,
    n_atoms: int = 50,
    *,
    center: bool = True,
    normalize: bool = True,
    criterion: str = "l1",
    tol: float = 0.0,
) -> SompResult:
    """SOMP of one head's contribution ``z @ o_proj_head.T`` without forming it.

    Parameters
    ----------
    z : array_like of shape (n_samples, d_head)
        The head's ``hook_z`` rows.
    o_proj_head : array_like of shape (d_model, d_head)
        The head's columns of the o_proj weight.
    D : array_like of shape (n_atoms_total, d_model)
    n_atoms, center, normalize, criterion, tol
        As in :func:`somp_ref.somp`.

    Returns
    -------
    SompResult
        Equal (to rounding) to ``somp(z @ o_proj_head.T, D, ...)``.
    """
    z = as_matrix(z, "z")
    o_proj_head = as_matrix(o_proj_head, "o_proj_head")
    D = as_matrix(D, "D")
    if o_proj_head.shape[1] != z.shape[1]:
        raise ValueError(
            f"o_proj_head must have d_head={z.shape[1]} columns like z, got {o_proj_head.shape}"
        )
    if o_proj_head.shape[0] != D.shape[1]:
        raise ValueError(
            f"o_proj_head must have d_model={D.shape[1]} rows like D, got {o_proj_head.shape}"
        )
    n_atoms = check_positive_int(n_atoms, "n_atoms")
    order = _NORM_ORDER[check_choice(criterion, "criterion", _NORM_ORDER)]
    dictionary = _Dictionary.build(D)
    return _factored_somp(
        z,
        o_proj_head,
        D @ o_proj_head,
        dictionary,
        n_atoms,
        center=center,
        normalize=normalize,
        order=order,
        tol=check_tolerance(tol),
    )


def _factored_ll(
    z: np.ndarray,
    o_proj_head: np.ndarray,
    projected: np.ndarray,
    dictionary: _Dictionary,
    n_atoms: int,
) -> tuple[float, np.ndarray, np.ndarray]:
    """LL head score of ``z @ o_proj_head.T``; also the most frequent best atoms."""
    energy = np.einsum("ij,ij->i", z @ (o_proj_head.T @ o_proj_head), z)
    best, fractions = best_atoms(z @ projected.T, energy, dictionary.sq_norms)
    counts = np.bincount(best[energy > 0], minlength=projected.shape[0])
    ranked = np.argsort(-counts, kind="stable")[: min(n_atoms, np.count_nonzero(counts))]
    return float(np.mean(fractions)), ranked, counts[ranked] / z.shape[0]


# ------------------------------------------------------------------ ranking


def _check_token_ids(token_ids, vocab_size: int) -> np.ndarray:
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D list, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"token_ids must be integers, got dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(
            f"token_ids must be in [0, {vocab_size}) (the unembedding's rows), got {bad[:5]}"
        )
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)].astype(np.int64)  # duplicates dropped, order kept


def _finite(values: np.ndarray, store: ActivationStore, what: str) -> np.ndarray:
    """``values`` unchanged, or a StoreError naming the first NaN/Inf entry.

    Stores refuse non-finite values when written; one that holds them was altered or
    written by other code, and no score computed from it would mean anything.
    """
    bad = ~np.isfinite(values)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise StoreError(
            f"{store.path}: {what} holds {values[index]} at {index}; the store is corrupt"
        )
    return values


def rank_heads(
    store: ActivationStore,
    token_ids: Sequence[int],
    n_atoms: int = 50,
    method: str = "somp",
    *,
    center: bool | None = None,
    normalize: bool = True,
    criterion: str = "l1",
    tol: float = 0.0,
    layers: Iterable[int] | None = None,
    exclude_layers: Iterable[int] = (),
    fold_final_norm: bool = False,
    show_progress: bool = True,
) -> HeadScores:
    """Score every head of a store against a concept's tokens.

    Parameters
    ----------
    store : ActivationStore
    token_ids : sequence of int
        The concept: rows of the unembedding used as atoms (duplicates dropped).
    n_atoms : int, default=50
        SOMP atoms per head (capped by the number of tokens).
    method : {"somp", "ll"}, default="somp"
        "somp": explained variance after ``n_atoms``; "ll": the Logit Lens head score (mean
        over samples of the best single atom's explained fraction).
    center : bool, optional
        Center each head's samples first. Default True for "somp" (as the authors), False
        for "ll" (the paper's per-sample baseline).
    normalize, criterion, tol
        As in :func:`somp_ref.somp`.
    layers : iterable of int, optional
        Layers to rank (default all); ``exclude_layers`` are skipped. Unranked heads get NaN.
    fold_final_norm : bool, default=False
        Multiply the atoms by the final norm's weight (DESIGN.md: raw unembedding rows are
        the default, as the authors).
    show_progress : bool, default=True
        A progress bar over layers on stderr.

    Returns
    -------
    HeadScores
    """
    check_choice(method, "method", METHODS)
    n_atoms = check_positive_int(n_atoms, "n_atoms")
    order = _NORM_ORDER[check_choice(criterion, "criterion", _NORM_ORDER)]
    tol = check_tolerance(tol)
    center = (method == "somp") if center is None else bool(center)
    unembed = store.unembed()
    ids = _check_token_ids(token_ids, unembed.shape[0])
    atoms = _finite(np.asarray(unembed[ids], dtype=np.float64), store, "unembed (token, d_model)")
    if fold_final_norm:
        norm = store.final_norm()
        if norm is None:
            raise ValueError("fold_final_norm=True but the store has no final_norm weight")
        atoms = atoms * np.asarray(norm, dtype=np.float64)
    dictionary = _Dictionary.build(atoms)
    excluded = set(exclude_layers)
    chosen = [
        layer
        for layer in (range(store.n_layers) if layers is None else layers)
        if layer not in excluded
    ]
    for layer in chosen:
        if not 0 <= layer < store.n_layers:
            raise ValueError(f"layers must be in [0, {store.n_layers}), got {layer}")

    scores = np.full((store.n_layers, store.n_heads), np.nan)
    supports: dict[Head, np.ndarray] = {}
    increments: dict[Head, np.ndarray] = {}
    dh = store.d_head
    for layer in progress(chosen, desc=f"rank ({method})", enabled=show_progress):
        z_layer, o_proj = store.layer(layer)
        o_proj = _finite(np.asarray(o_proj, dtype=np.float64), store, f"layer {layer}: o_proj")
        projected = atoms @ o_proj  # (v, n_heads * d_head): E_h for every head at once
        for head in range(store.n_heads):
            cols = slice(head * dh, (head + 1) * dh)
            z = np.asarray(z_layer[:, head], dtype=np.float64)
            _finite(z, store, f"layer {layer}, head {head}: z (sample, d_head)")
            if method == "somp":
                res = _factored_somp(
                    z,
                    o_proj[:, cols],
                    projected[:, cols],
                    dictionary,
                    n_atoms,
                    center=center,
                    normalize=normalize,
                    order=order,
                    tol=tol,
                )
                scores[layer, head] = res.explained_variance[-1]
                supports[layer, head] = ids[res.support]
                increments[layer, head] = np.diff(res.explained_variance)
            else:
                score, best, freq = _factored_ll(
                    z, o_proj[:, cols], projected[:, cols], dictionary, n_atoms
                )
                scores[layer, head] = score
                supports[layer, head] = ids[best]
                increments[layer, head] = freq
    vocab, meta = store.vocab(), store.meta  # meta is a fresh copy each access: read once
    return HeadScores(
        explained_variance=scores,
        supports=supports,
        increments=increments,
        method=method,
        params={
            "n_atoms": n_atoms,
            "center": center,
            "normalize": normalize,
            "criterion": criterion,
            "tol": tol,
            "layers": chosen,
            "exclude_layers": sorted(excluded),
            "fold_final_norm": fold_final_norm,
        },
        token_ids=ids,
        tokens=None if vocab is None else [vocab[i] for i in ids],
        source={key: meta[key] for key in ("model_id", "family", "positions") if key in meta}
        | {"store": str(store.path)},
    )


_WORD_TOKEN = re.compile(r"^ ?[A-Za-z]{3,}$")


def word_token_pool(vocab: list[str] | None, vocab_size: int) -> np.ndarray:
    """Token ids that look like words (an optional leading space, then 3+ ASCII letters);
    all ids when the vocabulary strings are unknown. The null dictionaries of
    :func:`specificity_scores` are drawn from it, so that they resemble concept tokens."""
    if vocab is None:
        return np.arange(vocab_size)
    return np.asarray(
        [i for i, text in enumerate(vocab) if _WORD_TOKEN.match(text)], dtype=np.int64
    )


def specificity_scores(
    store: ActivationStore,
    token_ids: Sequence[int],
    n_atoms: int = 50,
    *,
    n_null: int = 8,
    seed: int = 0,
    exclude_layers: Iterable[int] = (),
    show_progress: bool = True,
    **somp_options: Any,
) -> HeadScores:
    """How much better a concept explains each head than random token sets of its size.

    ``score = (EV_concept - mean(EV_null)) / std(EV_null)``: a z-score of the head's SOMP
    explained variance with the concept's dictionary against ``n_null`` dictionaries of
    the same number of random word-like tokens (see :func:`word_token_pool`, concept tokens
    excluded). Heads that explain *any* token set well, such as layer-0 heads that copy
    input embeddings in a model with tied embeddings, get a high raw EV but a low
    specificity; heads that write the concept stand out.

    Parameters
    ----------
    store : ActivationStore
    token_ids : sequence of int
    n_atoms : int, default=50
    n_null : int, default=8
        Random dictionaries in the null distribution (>= 2).
    seed : int, default=0
    exclude_layers : iterable of int
    show_progress : bool
    **somp_options
        Passed to :func:`rank_heads` (center, normalize, criterion, tol).

    Returns
    -------
    HeadScores
        ``method="specificity"``; ``details`` holds "concept_ev", "null_mean", "null_std".
    """
    if n_null < 2:
        raise ValueError(f"n_null must be >= 2 to estimate a spread, got {n_null}")
    options = dict(exclude_layers=exclude_layers, show_progress=show_progress, **somp_options)
    concept = rank_heads(store, token_ids, n_atoms, "somp", **options)
    pool = word_token_pool(store.vocab(), store.unembed().shape[0])
    pool = np.setdiff1d(pool, concept.token_ids)
    if pool.size < concept.token_ids.size:
        raise ValueError(
            f"only {pool.size} candidate tokens for null dictionaries of {concept.token_ids.size}"
        )
    rng = np.random.default_rng(seed)
    nulls = np.stack(
        [
            rank_heads(
                store,
                rng.choice(pool, concept.token_ids.size, replace=False),
                n_atoms,
                "somp",
                **options,
            ).explained_variance
            for _ in range(n_null)
        ]
    )
    mean, std = nulls.mean(axis=0), nulls.std(axis=0, ddof=1)
    z = (concept.explained_variance - mean) / np.maximum(std, np.finfo(np.float64).tiny)
    return HeadScores(
        explained_variance=z,
        supports=concept.supports,
        increments=concept.increments,
        method="specificity",
        params={**concept.params, "n_null": n_null, "seed": seed},
        token_ids=concept.token_ids,
        tokens=concept.tokens,
        source=concept.source,
        details={"concept_ev": concept.explained_variance, "null_mean": mean, "null_std": std},
    )


# ------------------------------------------------------------------ selection


def top_heads(scores: HeadScores, k: int) -> list[Head]:
    """The ``k`` best heads, best first (ties: lower layer, then lower head). NaN never."""
    values = scores.explained_variance
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    ranked = sorted(
        (
            (layer, head)
            for layer, head in np.ndindex(values.shape)
            if not np.isnan(values[layer, head])
        ),
        key=lambda lh: (-values[lh], lh),
    )
    return ranked[:k]


def random_heads_like(heads: Iterable[Head], n_layers: int, n_heads: int, seed: int) -> list[Head]:
    """Random heads with the same count per layer as ``heads`` (the paper's control).

    Returns
    -------
    list of (layer, head)
        Sorted; drawn without replacement within each layer, reproducible from ``seed``.
    """
    counts: dict[int, int] = {}
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"head {(layer, head)} is outside {n_layers} x {n_heads}")
        counts[layer] = counts.get(layer, 0) + 1
    rng = random.Random(seed)
    drawn = []
    for layer in sorted(counts):
        if counts[layer] > n_heads:
            raise ValueError(f"layer {layer} has {counts[layer]} heads, only {n_heads} exist")
        drawn += [(layer, head) for head in sorted(rng.sample(range(n_heads), counts[layer]))]
    return drawn


def jaccard(heads_a: Iterable[Head], heads_b: Iterable[Head]) -> float:
    """|A ∩ B| / |A ∪ B| of two head sets; 1.0 when both are empty."""
    a, b = set(map(tuple, heads_a)), set(map(tuple, heads_b))
    return 1.0 if not a | b else len(a & b) / len(a | b)


# ------------------------------------------------------------------ reports


def format_top_heads(scores: HeadScores, k: int = 10, tokens_shown: int = 6) -> str:
    """The ``k`` best heads as a table with the first tokens of each support."""
    label = "EV" if scores.method == "somp" else "LL score"
    lines = [f"rank  head (L.H)  {label:>8}  top tokens"]
    for rank, (layer, head) in enumerate(top_heads(scores, k), start=1):
        support = scores.supports.get((layer, head), np.zeros(0, dtype=np.int64))
        shown = " ".join(repr(scores.token_string(t)) for t in support[:tokens_shown])
        lines.append(
            f"{rank:>4}  {f'{layer}.{head}':>11}  "
            f"{scores.explained_variance[layer, head]:>8.4f}  {shown}"
        )
    return "\n".join(lines)


def head_signature(
    store: ActivationStore,
    layer: int,
    head: int,
    n_atoms: int = 20,
    token_ids: Sequence[int] | None = None,
) -> list[tuple[int, str, float]]:
    """A head's SOMP signature: the tokens it writes, with the explained variance each adds.

    Parameters
    ----------
    store : ActivationStore
    layer, head : int
    n_atoms : int, default=20
    token_ids : sequence of int, optional
        Restrict the dictionary (default: the whole vocabulary).

    Returns
    -------
    list of (token_id, token_string, explained_variance_increment)
        In selection order, as in the paper's head-signature tables.
    """
    if not 0 <= head < store.n_heads:
        raise ValueError(f"head must be in [0, {store.n_heads}), got {head}")
    unembed = store.unembed()
    ids = (
        np.arange(unembed.shape[0])
        if token_ids is None
        else _check_token_ids(token_ids, unembed.shape[0])
    )
    z_layer, o_proj = store.layer(layer)
    cols = slice(head * store.d_head, (head + 1) * store.d_head)
    res = head_somp(
        np.asarray(z_layer[:, head], dtype=np.float64),
        np.asarray(o_proj[:, cols], dtype=np.float64),
        np.asarray(unembed[ids], dtype=np.float64),
        n_atoms,
    )
    vocab = store.vocab()
    chosen = ids[res.support]
    return [
        (int(t), vocab[t] if vocab else f"[{t}]", float(gain))
        for t, gain in zip(chosen, np.diff(res.explained_variance), strict=True)
    ]
