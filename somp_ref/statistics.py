"""The statistics the experiments report: bootstrap confidence intervals over prompts and
the median and interquartile range of the random control."""

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
        """Whether ``value`` lies outside the interval."""
        return not self.low <= value <= self.high

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


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


def mean_ci(values: np.ndarray, *, seed: int = 0) -> Estimate:
    """The mean of per-prompt values with its 95 % bootstrap interval."""
    return bootstrap([values], np.mean, seed=seed)


def ratio_ci(values: np.ndarray, baseline: np.ndarray, *, seed: int = 0) -> Estimate:
    """``mean(values) / mean(baseline)`` over the same prompts, paired resampling."""
    return bootstrap([values, baseline], lambda x, b: x.mean() / b.mean(), seed=seed)


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
