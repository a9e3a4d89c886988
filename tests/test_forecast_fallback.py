"""Fallback forecasters on synthetic data with a known structure."""
from __future__ import annotations

import numpy as np
import pytest

from models.forecast import ForecastEngine, ForecastParams
from models.forecast.fallback import FallbackParams, HoltWintersModel, HWCoeffs, _filter, fit_fallback
from models.forecast.scoring import mae

M = 288          # 5-minute steps -> daily season
H = 12


def seasonal_trend(n: int, seed: int = 0, noise: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    # sharp daily load (business hours) + slow trend + noise
    day = np.where((t % M) > M * 0.4, 4.0, 0.0) + 2.0 * np.sin(2 * np.pi * t / M)
    return 20.0 + 0.002 * t + day + rng.normal(0, noise, n)


def rolling_origin_mae(y: np.ndarray, start: int, candidate: str) -> float:
    """Run the device engine over y (one row = one 5-minute step) and score ``candidate``."""
    eng = ForecastEngine(ForecastParams(metrics=("v",), step_s=0, horizon=H, limits=(), baselines=("naive",),
                                        refit_every_steps=M), step_s=300.0)
    actual, fc = [], []
    for i, v in enumerate(y):
        eng.observe_step(1.7e9 + 300.0 * i, {"v": float(v)})
        eng.maintain(max_fits=None)
        if start <= i < len(y) - H:
            actual.append(y[i + 1:i + 1 + H])
            fc.append(eng.issued("v")["points"][candidate])
    return mae(np.array(actual), np.array(fc))


def test_fallback_beats_naive_on_seasonal_trend_data():
    y = seasonal_trend(5 * M)
    fb = rolling_origin_mae(y, 3 * M, "fallback")
    naive = rolling_origin_mae(y, 3 * M, "naive")
    assert fb < 0.8 * naive, (fb, naive)


def test_structure_follows_history_length():
    y = seasonal_trend(4 * M)
    assert fit_fallback(y[:10], M, H).kind == "naive"                    # too short for a trend
    short = fit_fallback(y[: M // 2], M, H)                                # no full day: no season
    assert short.kind in ("naive", "damped") and "hw" not in short.criterion
    full = fit_fallback(y, M, H)
    assert "hw" in full.criterion and full.kind in ("hw", "snaive")
    assert full.criterion[full.kind] == min(full.criterion.values())
    assert full.residuals.shape[1] == H and len(full.residuals) > 0


def test_online_update_matches_one_batch_pass():
    y = seasonal_trend(3 * M, seed=1)
    fit = fit_fallback(y[: 2 * M + 50], M, H, FallbackParams(kinds=("naive", "hw")))
    model = fit.model
    assert isinstance(model, HoltWintersModel)
    season0 = list(model.season)
    state0 = (model.level, model.trend, model.pos, model.sigma)
    rest = y[2 * M + 50:]
    for v in rest:
        model.update(float(v))
    level, trend, pos, sigma, _, _, _ = _filter(rest.tolist(), model.coeffs, state0[0], state0[1], season0,
                                                state0[2], state0[3], False)
    assert (level, trend, pos, sigma) == pytest.approx((model.level, model.trend, model.pos, model.sigma))
    assert season0 == pytest.approx(model.season)


def _warm_model(robust: bool) -> HoltWintersModel:
    coeffs = HWCoeffs(alpha=0.5, beta=0.0, phi=0.9, gamma=0.0, m=0, robust=robust, sigma_floor=0.1)
    model = HoltWintersModel(coeffs, level=50.0, trend=0.0, season=None, pos=0, sigma=1.25)
    rng = np.random.default_rng(2)
    for v in 50.0 + rng.normal(0, 1.0, 300):
        model.update(float(v))
    return model


def test_robust_filter_ignores_a_single_spike_but_adopts_a_level_shift():
    robust, plain = _warm_model(True), _warm_model(False)
    for model in (robust, plain):
        model.update(130.0)
    assert abs(robust.forecast(1)[0] - 50.0) < 3.0
    assert abs(plain.forecast(1)[0] - 50.0) > 30.0
    model = _warm_model(True)
    for _ in range(30):
        model.update(70.0)
    assert model.forecast(1)[0] == pytest.approx(70.0, abs=1.0)
