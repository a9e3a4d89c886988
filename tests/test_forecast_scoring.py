"""Scores of past forecasts: MAE, MASE (naive-scaled), coverage, per-model tables."""
from __future__ import annotations

import math

import numpy as np
import pytest

from models.forecast.scoring import coverage, mae, mase, naive_scale, score_table


def test_mase_is_mae_over_the_in_sample_naive_error():
    insample = np.array([1.0, 3.0, 2.0, 5.0])              # |diffs| = 2, 1, 3 -> 2
    assert naive_scale(insample) == pytest.approx(2.0)
    assert naive_scale(np.array([1.0, 5.0, 1.0, 7.0]), season=2) == pytest.approx(1.0)   # |0|, |2|
    actual, fc = np.array([4.0, 6.0, np.nan]), np.array([5.0, 3.0, 1.0])
    assert mae(actual, fc) == pytest.approx(2.0)           # NaN pairs are ignored
    assert mase(actual, fc, 2.0) == pytest.approx(1.0)
    assert math.isnan(mase(actual, fc, 0.0))               # a constant training series has no scale


def test_coverage_counts_only_rows_with_a_band():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    lo = np.array([0.0, 2.5, np.nan, 3.0])
    hi = np.array([2.0, 3.0, np.nan, 4.0])
    assert coverage(a, lo, hi) == pytest.approx(2 / 3)


def test_score_table_splits_by_model():
    rows = [
        {"actual": 1.0, "forecast": 2.0, "lower_80": 0.0, "upper_80": 3.0, "lower_95": -1, "upper_95": 4, "model": "a"},
        {"actual": 5.0, "forecast": 2.0, "lower_80": 0.0, "upper_80": 3.0, "lower_95": -1, "upper_95": 4, "model": "b"},
        {"actual": 2.0, "forecast": 2.0, "lower_80": "", "upper_80": "", "lower_95": "", "upper_95": "", "model": "b"},
    ]
    t = score_table(rows, scale=2.0)
    assert t["a"]["mae"] == 1.0 and t["a"]["coverage_95"] == 1.0
    assert t["b"]["mae"] == 1.5 and t["b"]["coverage_80"] == 0.0 and t["b"]["n"] == 2
    assert t["all"]["mase"] == pytest.approx((1 + 3 + 0) / 3 / 2.0)
