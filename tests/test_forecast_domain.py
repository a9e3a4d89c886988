"""Forecast values and bands stay inside the metric's domain (issue #24: bands below 0 % on the charts)."""
from __future__ import annotations

import math

import numpy as np

from models.features import metric_domain
from models.forecast.engine import ForecastEngine, ForecastParams


def test_metric_domains() -> None:
    assert metric_domain("system.cpuUsage") == (0.0, 100.0) == metric_domain("system.diskPercent:/data")
    assert metric_domain("system.cpuUsage.2") == (0.0, 100.0)
    assert metric_domain("system.load1") == (0.0, math.inf) == metric_domain("network.bytesSentPerSec")
    assert metric_domain("system.temperature") == (-math.inf, math.inf) == metric_domain("value")


def test_a_noisy_cpu_near_zero_never_gets_a_band_below_zero() -> None:
    rng = np.random.default_rng(1)
    engine = ForecastEngine(ForecastParams(metrics=("system.cpuUsage", "value"), horizon=6), step_s=60.0)
    results = []
    for i in range(400):  # a CPU idling at 1-3 % with spikes: symmetric errors would cross 0
        cpu = max(0.0, 2.0 + rng.normal(0, 1.5) + (30.0 if i % 37 == 0 else 0.0))
        results += engine.observe_step(1_700_000_000.0 + 60.0 * i, {"system.cpuUsage": cpu, "value": cpu - 2.0})
    cpu = [r for r in results if r["metric"] == "system.cpuUsage" and r.get("lower_95")]
    assert cpu, "no forecast with intervals was issued"
    lows = [v for r in cpu for v in r["lower_95"] + r["lower_80"] + r["forecast"] if v is not None]
    assert min(lows) == 0.0  # the raw band went below 0 and was clipped there, not shifted
    assert all(v <= 100.0 for r in cpu for v in r["upper_95"] if v is not None)
    other = [v for r in results if r["metric"] == "value" and r.get("lower_95") for v in r["lower_95"]
             if v is not None]
    assert min(other) < 0.0  # an unknown column is not clipped
