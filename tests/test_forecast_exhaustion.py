"""Time-to-limit on a synthetic memory leak, through the engine the daemon runs."""
from __future__ import annotations

import numpy as np
import pytest

from models.forecast import ExhaustionParams, ForecastEngine, ForecastParams
from models.forecast.exhaustion import exhaustion_eta, limit_for, parse_limits, theil_sen

T0 = 1_700_000_000.0
RATE_PER_S = 0.5 / 60.0            # +0.5 % per minute
LIMIT = 95.0
START = 40.0
TRUE_CROSS_S = (LIMIT - START) / RATE_PER_S      # 6600 s after T0


def leak_engine(until_s: float, seed: int = 0) -> ForecastEngine:
    params = ForecastParams(metrics=("system.memoryPercent",), step_s=60.0,
                            limits=("system.memoryPercent=95",),
                            exhaustion=ExhaustionParams(warning_eta_s=7200.0, critical_eta_s=900.0))
    eng = ForecastEngine(params)
    rng = np.random.default_rng(seed)
    for t in np.arange(0.0, until_s, 10.0):      # a sample every 10 s
        eng.observe(T0 + t, {"system.memoryPercent": START + RATE_PER_S * t + rng.normal(0, 0.3),
                             "system.cpuUsage": 10.0})
        eng.maintain(T0 + t)
    return eng


def eta_of(eng: ForecastEngine, now_s: float) -> dict:
    (res,) = [r for r in eng.forecast(now_s) if r["metric"] == "system.memoryPercent"]
    return res["exhaustion"]


def test_leak_far_from_limit_uses_the_trend():
    now = 3600.0
    eng = leak_engine(now)
    eta = eta_of(eng, T0 + now)
    true_eta = TRUE_CROSS_S - now
    assert eta["status"] == "trend" and eta["method"] == "trend" and not eta["within_horizon"]
    assert eta["eta_s"] == pytest.approx(true_eta, rel=0.1)
    assert eta["eta_lower_s"] <= true_eta <= eta["eta_upper_s"]
    assert eta["severity"] == "warning"                 # 50 min: under the 2 h warning threshold
    assert eta["trend"]["slope_per_s"] == pytest.approx(RATE_PER_S, rel=0.05)


def test_leak_close_to_limit_uses_the_forecast_and_its_band():
    now = 6120.0                                       # 8 minutes before the crossing
    eng = leak_engine(now, seed=1)
    eta = eta_of(eng, T0 + now)
    true_eta = TRUE_CROSS_S - now
    assert eta["status"] == "within_horizon" and eta["within_horizon"]
    assert eta["eta_s"] == pytest.approx(true_eta, rel=0.2)
    assert eta["eta_lower_s"] is not None and eta["eta_lower_s"] <= eta["eta_s"]
    assert eta["eta_upper_s"] is None or eta["eta_upper_s"] >= eta["eta_s"]
    assert eta["severity"] == "critical"               # under 15 minutes
    # and the result re-bases on the time of asking
    later = eta_of(eng, T0 + now + 30.0)
    assert later["eta_s"] == pytest.approx(eta["eta_s"] - 30.0)


def test_flat_metric_is_not_within_horizon_and_exceeded_is_critical():
    rng = np.random.default_rng(2)
    flat = 50.0 + rng.normal(0, 0.5, 12)
    res = exhaustion_eta("system.diskPercent", 95.0, T0, T0, 60.0, 50.0, flat, (flat - 2, flat + 2))
    assert res["status"] == "not_within_horizon" and res["eta_s"] is None and res["severity"] == "normal"
    over = exhaustion_eta("system.diskPercent", 95.0, T0, T0, 60.0, 96.0, flat, None)
    assert over["status"] == "exceeded" and over["eta_s"] == 0.0 and over["severity"] == "critical"


def test_theil_sen_ignores_outliers():
    rng = np.random.default_rng(3)
    t = np.arange(200.0)
    y = 3.0 + 0.25 * t + rng.normal(0, 0.5, 200)
    y[rng.choice(200, 40, replace=False)] += 100.0        # 20 % gross outliers (log rotations, spikes)
    slope, lo, hi, intercept = theil_sen(t, y)
    assert lo <= slope <= hi
    assert slope == pytest.approx(0.25, abs=0.02)


def test_limits_parse_and_match_globs():
    limits = parse_limits(("system.diskPercent*=90", "system.memoryPercent=95", "system.diskPercent=80"))
    assert limit_for("system.diskPercent", limits) == 80.0           # exact name before globs
    assert limit_for("system.diskPercent:/data", limits) == 90.0
    assert limit_for("system.cpuUsage", limits) is None
    with pytest.raises(ValueError):
        parse_limits(("system.memoryPercent",))
