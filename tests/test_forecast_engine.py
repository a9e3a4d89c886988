"""The engine's plumbing: buckets, gaps, metric selection, warm start, result shape."""
from __future__ import annotations

import math

import numpy as np
import pytest

from models.forecast import ForecastEngine, ForecastParams
from models.forecast.engine import RingBuffer
from models.forecast.fallback import fit_fallback

T0 = 1_700_000_040.0          # a multiple of 60


def test_ring_buffer_keeps_order_across_wraps():
    rb = RingBuffer(5)
    assert len(rb.last(3)) == 0
    for i in range(12):
        rb.append(float(i))
    assert rb.last(3).tolist() == [9.0, 10.0, 11.0]
    assert rb.values().tolist() == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert len(rb) == 5


def test_steps_are_bucket_means_stamped_with_the_bucket_end():
    eng = ForecastEngine(ForecastParams(metrics=("system.cpuUsage",), step_s=60.0, limits=()))
    closed = []
    for i in range(24):                                   # 4 minutes of 10-s samples
        out = eng.observe(T0 + 10.0 * i, {"system.cpuUsage": float(i)})
        if out:
            closed.append((i, out[0]["origin_ts_s"], out[0]["last_value"]))
    # a bucket closes when the first sample of the next one arrives
    assert [c[0] for c in closed] == [6, 12, 18]
    assert [c[1] for c in closed] == [T0 + 60.0, T0 + 120.0, T0 + 180.0]
    assert [c[2] for c in closed] == [2.5, 8.5, 14.5]      # mean of 0..5, 6..11, 12..17


def test_short_gaps_are_filled_and_long_gaps_restart_history():
    p = ForecastParams(metrics=("m",), step_s=60.0, limits=(), max_gap_steps=5)
    eng = ForecastEngine(p)
    for i in range(10):
        eng.observe(T0 + 60.0 * i, {"m": 1.0})
    steps_before = eng.status()["metrics"]["m"]["steps"]
    eng.observe(T0 + 60.0 * 14, {"m": 2.0})               # 4 missing buckets: forward-filled
    assert eng.status()["metrics"]["m"]["steps"] == steps_before + 5
    eng.observe(T0 + 60.0 * 40, {"m": 3.0})               # 25 missing: restart
    eng.observe(T0 + 60.0 * 41, {"m": 3.0})
    assert eng.status()["metrics"]["m"]["steps"] == 1


def test_metric_patterns_limits_and_forward_fill():
    p = ForecastParams(metrics=("system.diskPercent*",), step_s=0, limits=("system.memoryPercent=95",))
    eng = ForecastEngine(p, step_s=60.0)
    eng.observe(T0, {"system.diskPercent": 50.0, "system.diskPercent:/data": 10.0, "system.cpuUsage": 3.0,
                     "system.memoryPercent": 40.0})
    out = eng.observe(T0 + 60, {"system.diskPercent": 50.5, "system.memoryPercent": 41.0})
    names = sorted(r["metric"] for r in out)
    assert names == ["system.diskPercent", "system.diskPercent:/data", "system.memoryPercent"]
    data = [r for r in out if r["metric"] == "system.diskPercent:/data"][0]
    assert data["last_value"] == 10.0                      # absent in the second sample: carried forward


def test_warm_start_fits_and_results_have_the_documented_shape():
    rng = np.random.default_rng(0)
    p = ForecastParams(metrics=("system.cpuUsage",), step_s=60.0)
    eng = ForecastEngine(p)
    hist = [(T0 + 10.0 * i, {"system.cpuUsage": 30.0 + 5 * math.sin(i / 200.0) + rng.normal(0, 1)})
            for i in range(3 * 360)]                         # 3 hours at 10 s
    assert eng.warm_start(hist) == len(hist)
    assert eng.status()["metrics"]["system.cpuUsage"]["fallback"]["kind"] != "none"
    assert eng.forecast() == []                              # warm start publishes nothing
    t = hist[-1][0]
    out = []
    while not out:
        t += 10.0
        out = eng.observe(t, {"system.cpuUsage": 30.0})
    (res,) = out
    assert res["horizon"] == 12 and len(res["forecast"]) == 12 and res["step_s"] == 60.0
    assert res["model"].startswith("fallback:")
    for key in ("lower_80", "upper_80", "lower_95", "upper_95"):
        assert len(res[key]) == 12 and all(v is not None for v in res[key])   # seeded by the fit
    assert res["exhaustion"] is None                          # no limit on CPU
    assert set(res["coverage"]) == {"80", "95"}
    st = eng.status()
    assert st["lstm"] is None and st["metrics"]["system.cpuUsage"]["selector"]["current"] == "fallback"


def test_maintain_spreads_fits():
    p = ForecastParams(metrics=("a", "b", "c"), step_s=0, limits=())
    eng = ForecastEngine(p, step_s=60.0)
    for i in range(40):
        eng.observe(T0 + 60.0 * i, {"a": float(i), "b": float(-i), "c": 1.0})
    assert len(eng.refit_due()) == 3
    assert len(eng.maintain(max_fits=1)) == 1
    assert len(eng.maintain(max_fits=None)) == 2
    assert eng.refit_due() == []


def test_detached_refit_catches_up_with_steps_seen_meanwhile():
    rng = np.random.default_rng(1)
    y = 10.0 + np.cumsum(rng.normal(0, 0.1, 300))
    p = ForecastParams(metrics=("a",), step_s=0, limits=())
    eng = ForecastEngine(p, step_s=60.0)
    for i in range(250):
        eng.observe_step(T0 + 60.0 * i, {"a": float(y[i])})
    job = eng.prepare_refit("a")
    assert "a" not in eng.refit_due()                        # in flight: not handed out twice
    for i in range(250, 260):                                # the worker is busy; steps keep coming
        eng.observe_step(T0 + 60.0 * i, {"a": float(y[i])})
    fit = job.run()
    assert eng.apply_refit(job, fit)
    reference = fit_fallback(y[:250], 0, 12).model
    for v in y[250:260]:
        reference.update(float(v))
    np.testing.assert_allclose(fit.model.forecast(12), reference.forecast(12))
    st = eng.status()["metrics"]["a"]
    assert st["fallback"]["kind"] == fit.kind


def test_bad_params_are_rejected():
    with pytest.raises(ValueError):
        ForecastParams(baselines=("arima",))
    with pytest.raises(ValueError):
        ForecastParams(limits=("system.memoryPercent",))


def test_payload_is_compact_json():
    import json

    from models.forecast.payload import forecast_payload
    p = ForecastParams(metrics=("system.memoryPercent",), step_s=0)
    eng = ForecastEngine(p, step_s=60.0)
    for i in range(200):
        eng.observe_step(T0 + 60.0 * i, {"system.memoryPercent": 40.0 + 0.01 * i + 0.1 * math.sin(i)})
        eng.maintain()
    (res,) = eng.forecast(T0 + 60.0 * 200)
    body = forecast_payload(res, digits=4)
    text = json.dumps(body, allow_nan=False)                 # strict JSON: no NaN
    assert set(body) >= {"metric", "model", "forecast", "lower_95", "upper_95", "coverage", "exhaustion"}
    assert body["exhaustion"]["metric"] == "system.memoryPercent" and "trend" not in body["exhaustion"]
    assert len(text) < len(json.dumps(res, default=str))
    assert body["forecast"][0] == float(f"{res['forecast'][0]:.4g}")


def test_flat_config_keys_map_to_nested_params():
    p = ForecastParams.from_flat(step_s=30.0, limits=["system.memoryPercent=90"], aci_gamma=0.0,
                                 selector_margin=0.2, critical_eta_s=600.0, conformal_window=200)
    assert p.step_s == 30.0 and p.limits == ("system.memoryPercent=90",)
    assert p.conformal.aci_gamma == 0.0 and p.conformal.window == 200
    assert p.selector.margin == 0.2 and p.exhaustion.critical_eta_s == 600.0
    with pytest.raises(TypeError):
        ForecastParams.from_flat(stepsize=3)
