import csv
import json
import logging
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from agent.replay import OUT_COLUMNS, ReplayParams, parse_timestamp, replay
from models.detect import Detector, DetectParams
from models.training.forest import ForestParams, train_forest_from_rows

NAB = Path(os.environ.get("EDGE_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets")) / "nab"
SEVERITIES = {"normal", "warning", "critical"}


def _nab(rel):
    path = NAB / "data" / rel
    if not path.exists():
        pytest.skip(f"NAB data absent: {path}")
    windows = json.loads((NAB / "labels" / "combined_windows.json").read_text())[rel]
    utc = lambda s: datetime.fromisoformat(s).replace(tzinfo=timezone.utc).timestamp()  # noqa: E731
    return path, [(utc(a), utc(b)) for a, b in windows]


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_timestamps():
    assert parse_timestamp("1700000000.5") == 1700000000.5
    assert parse_timestamp("2014-04-10 00:00:00") == parse_timestamp("2014-04-10T00:00:00Z") == 1397088000.0
    assert parse_timestamp("2014-04-10T02:00:00+02:00") == 1397088000.0


def test_replay_real_nab_series_end_to_end(tmp_path):
    path, windows = _nab("realKnownCause/ec2_request_latency_system_failure.csv")
    out = tmp_path / "out.csv"
    summary = replay(path, out, params=ReplayParams(forest_min_metrics=1))
    inp, res = _read(path), _read(out)
    assert len(res) == len(inp) == summary.rows == 4032
    assert tuple(res[0].keys()) == OUT_COLUMNS
    assert [r["timestamp"] for r in res] == [r["timestamp"] for r in inp]
    assert summary.detector == "zscore+forest" and summary.train_rows == 604     # 15 % of the rows
    a = np.array([float(r["anomaly_score"]) for r in res])
    assert ((a >= 0) & (a <= 1)).all() and all(math.isfinite(float(r["score"])) for r in res)
    assert {r["severity"] for r in res} <= SEVERITIES
    # episode ids: contiguous runs, only on abnormal-or-inside rows, count matches the summary
    ids = [r["episode_id"] for r in res]
    runs = [k for i, k in enumerate(ids) if k and (i == 0 or ids[i - 1] != k)]
    assert len(runs) == len(set(runs)) == summary.episodes >= 1
    # the detector finds the labelled incident: an episode inside a labelled window, and
    # episode rows fall in windows far more often than the windows' share of the series (10 %)
    ts = np.array([parse_timestamp(r["timestamp"]) for r in res])
    in_win = np.zeros(len(ts), bool)
    for lo, hi in windows:
        in_win |= (ts >= lo) & (ts <= hi)
    ep_rows = np.array([bool(k) for k in ids])
    assert (ep_rows & in_win).any()
    assert (ep_rows & in_win).sum() / ep_rows.sum() > 2 * in_win.mean()


def test_replay_jsonl_and_zscore_only_fallback(tmp_path, caplog):
    path, _ = _nab("realAWSCloudwatch/rds_cpu_utilization_cc0c53.csv")
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.INFO, logger="agent.replay"):
        summary = replay(path, out, params=ReplayParams(train_rows=50, forest_min_metrics=1))  # < min_samples
    assert summary.detector == "zscore"
    assert "min_samples=100" in caplog.text and "z-score only" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="agent.replay"):
        assert replay(path, tmp_path / "default.csv").detector == "zscore"      # one value column
    assert "no forest for 1 value column" in caplog.text
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == summary.rows and set(lines[0]) == set(OUT_COLUMNS)


def _device_csv(path, n=900, seed=0):
    rng = np.random.default_rng(seed)
    t0 = 1_700_000_000
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "system.cpuUsage", "system.memoryPercent", "network.bytesSentPerSec"])
        for i in range(n):
            cpu, mem, tx = rng.normal(20, 3), rng.normal(45, 0.5), rng.exponential(2e4)
            if 700 <= i < 720:                                   # a runaway process
                cpu, mem = 97.0, 80.0
            w.writerow([t0 + i, f"{cpu:.3f}", f"{mem:.3f}", "" if i == 0 else f"{tx:.1f}"])
    return t0


def test_replay_with_model_dir_multi_metric_epoch(tmp_path):
    src = tmp_path / "in.csv"
    t0 = _device_csv(src)
    names = ("system.cpuUsage", "system.memoryPercent", "network.bytesSentPerSec")
    rows = [{k: float(v) for k, v in r.items() if k != "timestamp" and v} for r in _read(src)[:600]]
    train_forest_from_rows(rows, names, ForestParams(), tmp_path / "model", version=7)
    out = tmp_path / "out.csv"
    summary = replay(src, out, model_dir=tmp_path / "model")
    assert summary.detector == "zscore+forest" and summary.model_version == 7
    res = _read(out)
    flagged = [int(r["timestamp"]) - t0 for r in res if r["episode_id"]]
    assert flagged and min(flagged) >= 690 and 700 <= max(flagged) < 730
    a = [float(r["anomaly_score"]) for r in res]
    # the onset is a novel transition (1, the top score); noise reaching new bins can tie it elsewhere
    assert a[700] == max(a) == 1.0 and max(a[701:720]) == 0.0   # then the rest gate: one alarm
    assert res[705]["severity"] == "critical"


def test_detector_events_and_explanation():
    det = Detector(DetectParams(features=("system.cpuUsage", "system.memoryPercent")))
    rng = np.random.default_rng(3)
    events = []
    for i in range(400):
        cpu = 97.0 if 300 <= i < 310 else rng.normal(20, 3)
        row, ev = det.update(1000.0 + i, {"system.cpuUsage": cpu, "system.memoryPercent": rng.normal(45, 0.5)})
        events += ev
        if i == 305:
            assert row.severity == "critical" and row.episode_id is not None
            assert row.explanation[0]["feature"].startswith("system.cpuUsage")
            assert row.explanation[0]["expected_high"] < 97.0
    assert [e["action"] for e in events] == ["open", "close"]
    assert events[0]["start_ts_s"] == 1300.0 and events[1]["end_ts_s"] >= 1309.0
    assert events[1]["features"][0].startswith("system.cpuUsage") and events[1]["detector"] == "zscore"
