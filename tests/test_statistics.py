"""Bootstrap intervals and the random control's spread."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from somp_ref.statistics import (
    Estimate,
    bootstrap,
    estimate,
    mean_ci,
    median_iqr,
    nan_mean,
    paired_ci,
    point,
)


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
    estimate = paired_ci(baseline * 0.5, baseline, "ratio")
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


def test_an_interval_excludes_only_values_outside_it_and_only_when_it_exists():
    assert Estimate(1.0, 0.5, 1.5, 9).excludes(2.0)
    assert not Estimate(1.0, 0.5, 1.5, 9).excludes(1.5)
    nan = float("nan")
    assert not Estimate(1.0, nan, nan, 1).excludes(5.0)  # one prompt: no claim either way
    assert not Estimate(1.0, 0.5, 1.5, 9).excludes(nan)  # nothing to compare with
    entry = Estimate(1.0, 0.5, 1.5, 9).as_dict()
    assert Estimate.from_dict(entry) == Estimate(1.0, 0.5, 1.5, 9)


@given(st.integers(0, 2**32 - 1), st.sampled_from(["mean", "ratio", "difference"]))
def test_a_figure_drops_prompts_missing_on_either_side_and_its_point_is_its_value(seed, how):
    rng = np.random.default_rng(seed)
    values, reference = rng.uniform(0.1, 1.0, 30), rng.uniform(0.1, 1.0, 30)
    values[rng.integers(0, 30, 3)] = np.nan
    reference[rng.integers(0, 30, 3)] = np.nan
    keep = np.isfinite(values) & np.isfinite(reference)
    figure = estimate(values, reference, how, seed=seed)
    if how == "mean":
        expected = mean_ci(values[keep], seed=seed)
    else:
        expected = paired_ci(values[keep], reference[keep], how, seed=seed)
    assert figure == expected and figure.n == keep.sum()
    assert point(values, reference, how) == figure.value  # bit for bit: one computation


def test_a_paired_difference_of_a_uniform_shift_is_exact():
    reference = np.array([0.0, 1.0, 0.0, 1.0, 1.0])
    shifted = paired_ci(reference + 0.25, reference, "difference")
    assert shifted.value == shifted.low == shifted.high == 0.25


def test_nothing_left_to_measure():
    nan = np.full(3, np.nan)
    empty = estimate(nan, np.ones(3), "ratio")
    assert np.isnan(empty.value) and empty.n == 0
    assert np.isnan(point(nan, np.ones(3), "mean"))
    assert np.isinf(point(np.ones(2), np.zeros(2), "ratio"))  # over a zero reference
    assert np.isnan(nan_mean([np.nan, np.nan])) and nan_mean([1.0, np.nan, 3.0]) == 2.0
