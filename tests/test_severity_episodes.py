import math

import numpy as np
import pytest

from models.episodes import EpisodeParams, EpisodeTracker
from models.severity import (CalibratorParams, SeverityParams, SurpriseCalibrator, combine, explain,
                             forest_severity, forest_z, gate, z_severity)

P = SeverityParams(z_warning=4.0, z_critical=6.0)
TH = {"median": 0.40, "warning": 0.55, "critical": 0.65}


def test_z_thresholds():
    assert z_severity(3.99, P) == "normal"
    assert z_severity(4.0, P) == "warning"
    assert z_severity(6.0, P) == "critical"


def test_forest_thresholds_and_z_scale():
    assert forest_severity(0.54, TH) == "normal"
    assert forest_severity(0.55, TH) == "warning"
    assert forest_severity(0.70, TH) == "critical"
    assert forest_z(0.40, TH, P) == 0.0
    assert forest_z(0.55, TH, P) == pytest.approx(4.0)


def test_combine_is_the_union_of_both_detectors():
    assert combine(1.0, None, None, P) == (1.0, "normal")
    assert combine(5.0, 0.41, TH, P) == (5.0, "warning")          # z alone
    score, sev = combine(1.0, 0.66, TH, P)                        # forest alone, critical
    assert sev == "critical" and score == pytest.approx(forest_z(0.66, TH, P))
    assert combine(7.0, 0.56, TH, P)[1] == "critical"             # worst of the two


def test_likelihood_gate():
    g = SeverityParams(anomaly_gate=0.5)
    assert gate("critical", 0.49, g) == "normal"
    assert gate("warning", 0.5, g) == "warning"
    assert gate("warning", 0.0, P) == "warning"                   # gate off by default


def test_explanation_names_the_deviating_feature_with_range():
    names = ("system.cpuUsage", "system.memoryPercent", "disk.writeBytesPerSec")
    values = np.array([95.0, 41.0, math.log1p(1e6)])
    z = np.array([9.0, 0.5, -4.5])
    center = np.array([20.0, 40.0, math.log1p(1e3)])
    scale = np.array([5.0, 2.0, 0.5])
    ex = explain(names, values, z, center, scale, P)
    assert [e["feature"] for e in ex] == ["system.cpuUsage", "disk.writeBytesPerSec", "system.memoryPercent"]
    assert ex[0]["value"] == 95.0 and ex[0]["expected_low"] == 5.0 and ex[0]["expected_high"] == 35.0
    assert ex[1]["value"] == pytest.approx(1e6)                   # rates reported in their units
    assert ex[1]["expected_low"] < 1e3 < ex[1]["expected_high"]
    ex = explain(("disk.writeBytesPerSec|mean10", "disk.writeBytesPerSec|diff1"), np.array([math.log1p(99.0), 2.0]),
                 np.array([5.0, 4.0]), np.array([0.0, 0.0]), np.array([1.0, 0.5]), P)
    assert ex[0]["value"] == pytest.approx(99.0) and ex[1]["value"] == 2.0


def _reference_calibration(S, p):
    """Direct restatement of the calibrator's rule, for comparison."""
    n, c = S.shape
    S = np.minimum(np.abs(S), p.clip)
    out = []
    for t in range(n):
        start = (t // p.block - p.history // p.block) * p.block    # history advances per block
        past = S[max(start, 0):t]
        prev = past.max(axis=0) if len(past) else np.full(c, -np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(S[t] > 0, S[t] / np.where(prev > 0, prev, 1e-12), 0.0)
        ratio = min(r.max(), 1e3) if t >= p.warmup else 0.0
        out.append(ratio / (1 + ratio))
    out = np.array(out)
    final = out.copy()
    for t in range(n):
        recent = out[max(0, t - p.refractory):t]
        if p.refractory and len(recent) and not out[t] > recent.max():
            final[t] = out[t] * p.damp
    return final


def test_calibrator_matches_its_rule():
    rng = np.random.default_rng(0)
    S = np.abs(rng.standard_t(3, size=(700, 3)))
    S[400, 1] = 80.0                                              # beyond clip
    S[:300, 2] = 0.0                                              # a column that only starts moving later
    p = CalibratorParams(history=200, block=20, refractory=30, damp=0.5, warmup=25)
    cal = SurpriseCalibrator(3, p)
    got = np.array([cal.update(s) for s in S])
    np.testing.assert_allclose(got, _reference_calibration(S, p), rtol=0, atol=1e-12)
    assert ((got >= 0) & (got < 1)).all()


def test_calibrator_gives_one_high_score_per_incident():
    rng = np.random.default_rng(1)
    cal = SurpriseCalibrator(1, CalibratorParams(history=500, block=10, refractory=50, warmup=20))
    quiet = [cal.update([abs(v)]) for v in rng.normal(0, 1, 600)]
    assert max(quiet[:20]) == 0.0
    incident = [cal.update([12.0 + 0.01 * i]) for i in range(20)]     # a lasting shift
    assert incident[0] > 0.75 and max(quiet[100:]) < 0.7
    assert max(incident[1:]) < incident[0]                             # no plateau of alarms


def _feed(tracker, sevs, t0=100.0):
    events = []
    for i, s in enumerate(sevs):
        score = {"normal": 1.0, "warning": 5.0, "critical": 8.0}[s] + i * 0.01
        events += tracker.update(t0 + i, s, score, ["system.cpuUsage"] if s != "normal" else [],
                                 [{"feature": "system.cpuUsage", "z": score}], "zscore", None)
    return events


def test_short_bursts_do_not_open_an_episode():
    tr = EpisodeTracker(EpisodeParams(open_after=3, close_after=2))
    assert _feed(tr, ["warning", "warning", "normal", "critical", "normal"] * 3) == []
    assert tr.current is None


def test_episode_lifecycle():
    ids = iter(["e1", "e2"])
    tr = EpisodeTracker(EpisodeParams(open_after=3, close_after=2), new_id=lambda: next(ids))
    sevs = ["normal", "warning", "warning", "warning", "critical", "normal", "warning", "normal", "normal",
            "normal", "warning", "warning", "warning", "normal", "normal"]
    ev = _feed(tr, sevs)
    assert [(e["action"], e["id"]) for e in ev] == [("open", "e1"), ("update", "e1"), ("close", "e1"),
                                                     ("open", "e2"), ("close", "e2")]
    op, up, cl = ev[0], ev[1], ev[2]
    assert op["kind"] == "anomaly" and op["start_ts_s"] == 101.0 and op["end_ts_s"] is None
    assert op["severity"] == "warning" and up["severity"] == "critical"
    assert cl["start_ts_s"] == 101.0 and cl["end_ts_s"] == 106.0     # last abnormal sample
    assert cl["severity"] == "critical" and cl["peak_score"] == pytest.approx(8.04)
    assert cl["features"] == ["system.cpuUsage"] and cl["detector"] == "zscore" and cl["state"] == "closed"
    assert set(cl) >= {"id", "kind", "start_ts_s", "end_ts_s", "severity", "peak_score", "features",
                       "explanation", "detector", "model_version"}


def test_flush_closes_open_episode():
    tr = EpisodeTracker(EpisodeParams(open_after=1, close_after=10))
    _feed(tr, ["warning", "warning"])
    (ev,) = tr.flush()
    assert ev["action"] == "close" and ev["end_ts_s"] == 101.0
    assert tr.flush() == [] and tr.current is None
