"""Bootstrap intervals and the random control's spread."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from somp_ref.statistics import bootstrap, mean_ci, median_iqr, ratio_ci


@given(st.integers(0, 2**32 - 1), st.integers(2, 60))
def test_the_interval_holds_the_figure_and_lies_within_the_data(seed, n):
    values = np.random.default_rng(seed).standard_normal(n)
    estimate = mean_ci(values, seed=seed)
    assert estimate.value == pytest.approx(values.mean())
    # A resample's mean may round past the data by n eps of its largest value (a resample
    # of one value repeated: three -1.8850786884477349 average to -1.885078688447735).
    slack = n * np.finfo(float).eps * np.abs(values).max()
    assert values.min() - slack <= estimate.low <= estimate.value
    assert estimate.value <= estimate.high <= values.max() + slack
    assert estimate.n == n


def test_the_interval_covers_the_true_mean_about_95_percent_of_the_time():
    # 400 experiments of 40 normal samples: coverage is binomial(400, 0.95) -> 0.95 +- 0.02;
    # the percentile bootstrap undercovers slightly at n = 40 (~0.93). A broken interval
    # (e.g. the standard deviation instead of the standard error) lands far outside.
    rng = np.random.default_rng(0)
    covered = sum(not mean_ci(rng.standard_normal(40), seed=i).excludes(0.0) for i in range(400))
    assert 0.88 * 400 <= covered <= 0.99 * 400


def test_a_ratio_resamples_prompts_in_pairs():
    baseline = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    estimate = ratio_ci(baseline * 0.5, baseline)
    # Every resample keeps each prompt's pair: the ratio is exactly 0.5 every time.
    assert estimate.value == estimate.low == estimate.high == 0.5


def test_degenerate_inputs():
    single = mean_ci(np.array([3.0]))
    assert single.value == 3.0 and np.isnan(single.low) and np.isnan(single.high)
    with pytest.raises(ValueError, match="same prompts"):
        bootstrap([np.ones(3), np.ones(4)], lambda a, b: 0.0)
    with pytest.raises(ValueError, match="at least one prompt"):
        mean_ci(np.array([]))


def test_median_iqr():
    spread = median_iqr([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (spread.median, spread.q1, spread.q3, spread.n_sets) == (3.0, 2.0, 4.0, 5)
