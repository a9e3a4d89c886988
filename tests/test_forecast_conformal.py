"""Conformal intervals on synthetic data whose noise is known."""
from __future__ import annotations

import numpy as np
import pytest

from models.forecast import ForecastEngine, ForecastParams
from models.forecast.conformal import ConformalCalibrator, ConformalParams, conformal_offsets

H = 12


def run_calibrator(noise: np.ndarray, params: ConformalParams, snapshots: list | None = None
                   ) -> tuple[ConformalCalibrator, list[np.ndarray]]:
    """Forecast 0 for every step of a series that is pure noise; learn online."""
    cal = ConformalCalibrator(H, params)
    issued: list[dict | None] = []
    widths = []
    for t, y in enumerate(noise):
        # forecasts made k steps ago for this step meet their actual
        for k in range(1, H + 1):
            if t - k >= 0:
                b = issued[t - k]
                cal.observe(k, float(y), 0.0, {lv: (float(lo[k - 1]), float(hi[k - 1])) for lv, (lo, hi) in b.items()}
                            if b else None)
        b = cal.bands(np.zeros(H))
        issued.append(b)
        if b:
            widths.append(b[0.95][1] - b[0.95][0])
        if snapshots is not None:
            snapshots.append((cal.coverage[0.95].hits, cal.coverage[0.95].total))
    return cal, widths


@pytest.mark.parametrize("aci_gamma", [0.0, 0.005])
def test_coverage_near_nominal_with_gaussian_noise(aci_gamma):
    rng = np.random.default_rng(0)
    sigma = 2.0
    cal, widths = run_calibrator(rng.normal(0, sigma, 3000), ConformalParams(aci_gamma=aci_gamma))
    cov = {lv: t.summary()["coverage"] for lv, t in cal.coverage.items()}
    assert cov[0.8] == pytest.approx(0.8, abs=0.03)
    assert cov[0.95] == pytest.approx(0.95, abs=0.02)
    # the band of known noise is +-1.96 sigma wide (not a loose over-cover)
    assert np.median(np.array(widths[-500:])) == pytest.approx(2 * 1.96 * sigma, rel=0.15)


def test_bands_are_asymmetric_for_skewed_noise():
    rng = np.random.default_rng(1)
    noise = rng.exponential(1.0, 3000) - 1.0          # mean 0, long upper tail
    cal, _ = run_calibrator(noise, ConformalParams())
    lo, hi = cal.bands(np.zeros(H))[0.95]
    assert np.all(hi > 2.0 * np.abs(lo))
    assert cal.coverage[0.95].summary()["coverage"] == pytest.approx(0.95, abs=0.02)


def test_adaptive_alpha_recovers_coverage_after_a_variance_jump():
    rng = np.random.default_rng(3)
    noise = np.concatenate([rng.normal(0, 1, 1500), rng.normal(0, 3, 1500)])
    transition = {}
    for gamma in (0.0, 0.01):
        snaps: list = []
        run_calibrator(noise, ConformalParams(aci_gamma=gamma, window=1500), snaps)
        (h0, n0), (h1, n1) = snaps[1500], snaps[2500]
        transition[gamma] = (h1 - h0) / (n1 - n0)       # coverage in the 1000 steps after the jump
    assert transition[0.0] < 0.85                         # the stale window under-covers for long
    assert transition[0.01] > transition[0.0] + 0.05
    assert transition[0.01] > 0.88


def test_finite_sample_offsets():
    r = np.arange(1.0, 20.0)          # 19 residuals: (n+1)(1 - 0.1/2) = 19 -> the maximum
    assert conformal_offsets(r, 0.1) == (1.0, 19.0)
    lo, hi = conformal_offsets(np.arange(1.0, 101.0), 0.2)
    assert (lo, hi) == (10.0, 91.0)


def test_engine_reports_realised_coverage_on_a_random_walk():
    rng = np.random.default_rng(4)
    y = 100.0 + np.cumsum(rng.normal(0, 1.0, 2000))
    eng = ForecastEngine(ForecastParams(metrics=("v",), step_s=0, limits=()), step_s=60.0)
    for i, v in enumerate(y):
        eng.observe_step(1.7e9 + 60.0 * i, {"v": float(v)})
        eng.maintain(max_fits=None)
    res = eng.forecast()[0]
    cov = res["coverage"]
    assert cov["95"]["n"] > 10000
    assert cov["95"]["coverage"] == pytest.approx(0.95, abs=0.02)
    assert cov["80"]["coverage"] == pytest.approx(0.80, abs=0.03)
    lo95, lo80, hi80, hi95 = (np.array(res[k]) for k in ("lower_95", "lower_80", "upper_80", "upper_95"))
    assert np.all(lo95 <= lo80) and np.all(lo80 <= hi80) and np.all(hi80 <= hi95)
    # a random walk's uncertainty grows with the step
    assert (hi95 - lo95)[-1] > 2.0 * (hi95 - lo95)[0]
