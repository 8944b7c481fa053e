"""The statistics the experiments report: bootstrap confidence intervals over prompts and
the median and interquartile range of the random control.

Every figure of the experiments and its interval is computed here, once: the report,
``somp-ref compare``, the alpha sweep and the selection study all call :func:`estimate`,
:func:`point`, :func:`nan_mean` or :func:`mean_ci` (the random control's median over its
sets is a plain median).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

#: Bootstrap resamples: the 2.5 % and 97.5 % quantiles of 2000 resampled means move by
#: about 1 % of the interval's width from one seed to another.
N_RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A figure with its 95 % bootstrap confidence interval.

    Attributes
    ----------
    value : float
        The figure computed on all prompts.
    low, high : float
        The 2.5 % and 97.5 % percentiles of the figure over resampled prompt sets.
    n : int
        Prompts it was computed on.
    """

    value: float
    low: float
    high: float
    n: int

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interval: False when there is no interval
        (NaN bounds: one prompt, no claim either way) or ``value`` is not a number."""
        bounds = np.isfinite(self.low) and np.isfinite(self.high)
        return bool(bounds and np.isfinite(value) and not self.low <= value <= self.high)

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}

    @classmethod
    def from_dict(cls, entry: dict[str, float]) -> Estimate:
        """The inverse of :meth:`as_dict` (``n`` 0 where a record has none)."""
        return cls(entry["value"], entry["low"], entry["high"], int(entry.get("n", 0)))


def bootstrap(
    samples: Sequence[np.ndarray],
    statistic: Callable[..., float],
    *,
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
) -> Estimate:
    """A statistic of paired per-prompt arrays with its 95 % percentile bootstrap interval.

    Parameters
    ----------
    samples : sequence of ndarray of shape (n,)
        Per-prompt values, all over the same n prompts (e.g. the intervened and the
        baseline value of each prompt); resampling draws the same prompts from each.
    statistic : callable
        ``statistic(*arrays) -> float``, e.g. ``lambda x, b: x.mean() / b.mean()``.
    seed : int, default=0
    n_resamples : int, default=N_RESAMPLES

    Returns
    -------
    Estimate
        NaN bounds when n < 2 (no spread to estimate).
    """
    arrays = [np.asarray(s, dtype=np.float64) for s in samples]
    n = arrays[0].shape[0]
    if any(a.shape != (n,) for a in arrays):
        raise ValueError("bootstrap samples must be 1-D arrays over the same prompts")
    if n == 0:
        raise ValueError("bootstrap needs at least one prompt")
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0: NaN, printed as '-'
        value = float(statistic(*arrays))
    if n < 2:
        return Estimate(value, float("nan"), float("nan"), n)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_resamples, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.array([statistic(*(a[idx] for a in arrays)) for idx in draws])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Estimate(value, float("nan"), float("nan"), n)
    low, high = np.percentile(values, [2.5, 97.5])
    return Estimate(value, float(low), float(high), n)


def ratio_of_means(values: np.ndarray, reference: np.ndarray) -> float:
    """``mean(values) / mean(reference)``: a figure relative to the unmodified model's (or
    one run's to another's) over the same prompts; inf or NaN over a zero reference."""
    return values.mean() / reference.mean()


def difference_of_means(values: np.ndarray, reference: np.ndarray) -> float:
    """``mean(values) - mean(reference)``: for proportions that may be 0 in the reference."""
    return values.mean() - reference.mean()


#: The figures of paired per-prompt arrays (values, reference), by name; "mean" is the mean
#: of the values alone.
PAIRED: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "ratio": ratio_of_means,
    "difference": difference_of_means,
}


def mean_ci(values: np.ndarray, *, seed: int = 0) -> Estimate:
    """The mean of per-prompt values with its 95 % bootstrap interval."""
    return bootstrap([values], np.mean, seed=seed)


def paired_ci(values: np.ndarray, reference: np.ndarray, how: str, *, seed: int = 0) -> Estimate:
    """``PAIRED[how]`` of two arrays over the same prompts, paired resampling."""
    return bootstrap([values, reference], PAIRED[how], seed=seed)


def finite_pairs(values: Sequence[float], reference: Sequence[float]) -> tuple[np.ndarray, ...]:
    """Both per-prompt arrays (float64) on the prompts where both are numbers."""
    x, b = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(b)
    return x[keep], b[keep]


def estimate(
    values: Sequence[float], reference: Sequence[float], how: str, *, seed: int = 0
) -> Estimate:
    """One figure of per-prompt values with its 95 % bootstrap interval, on the prompts
    where both ``values`` and ``reference`` are numbers.

    Parameters
    ----------
    values, reference : sequence of float, same length
        E.g. an intervention's per-prompt figure and the unmodified model's.
    how : {"mean", "ratio", "difference"}
        The mean of ``values``, or the ratio or difference of the two means (:data:`PAIRED`).
    seed : int, default=0

    Returns
    -------
    Estimate
        All NaN and n = 0 when no prompt is left.
    """
    x, b = finite_pairs(values, reference)
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    if how == "mean":
        return mean_ci(x, seed=seed)
    return paired_ci(x, b, how, seed=seed)


def point(values: Sequence[float], reference: Sequence[float], how: str) -> float:
    """The figure of :func:`estimate` without its interval (NaN when no prompt is left)."""
    x, b = finite_pairs(values, reference)
    if x.size == 0:
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0: NaN, printed as '-'
        return float(x.mean() if how == "mean" else PAIRED[how](x, b))


def nan_mean(values: Sequence[float]) -> float:
    """The mean of per-prompt values over the prompts measured (NaN: not measured), without
    an interval; NaN when no value is a finite number."""
    array = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(array)) if np.isfinite(array).any() else float("nan")


@dataclass(frozen=True)
class Spread:
    """The random control's figure over its head sets: median and interquartile range."""

    median: float
    q1: float
    q3: float
    n_sets: int

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "q1": self.q1, "q3": self.q3, "n_sets": self.n_sets}


def median_iqr(values: Sequence[float]) -> Spread:
    """Median and quartiles of one figure over the random head sets."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("median_iqr needs at least one value")
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return Spread(float(median), float(q1), float(q3), int(values.size))
