"""Transition novelty (models/novelty.py) and its place in the detector and replay."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent import cli
from agent.config import DetectSection
from agent.detection import detect_params
from agent.replay import ReplayParams, replay_rows
from models.detect import DetectParams, Detector
from models.novelty import NoveltyParams, RestGate, TransitionNovelty

REPO = Path(__file__).resolve().parents[1]


def sawtooth(n: int) -> list[float]:
    """0, 1, ..., 9, 0, 1, ...: the only downward move is 9 -> 0."""
    return [float(i % 10) for i in range(n)]


def feed(nov: TransitionNovelty, values: list[float]) -> list[tuple[str, ...]]:
    return [nov.update(np.array([v])) for v in values]


def test_learning_window_is_silent_and_its_transitions_are_remembered():
    nov = TransitionNovelty(["cpu"], NoveltyParams(learn_rows=100))
    out = feed(nov, sawtooth(100))
    assert out == [()] * 100 and not nov.learning
    # the same cycle again: every transition was seen while learning
    assert feed(nov, sawtooth(300)) == [()] * 300
    # width = 0.25 * 9 = 2.25, first edge at -1.125: bins 0 0 1 1 2 2 3 3 4 4, ten transitions
    assert nov.state() == {"learning": False, "transitions": {"cpu": 10}}


def test_a_skipped_part_of_the_cycle_is_novel_once():
    nov = TransitionNovelty(["cpu"], NoveltyParams(learn_rows=100))
    feed(nov, sawtooth(100))
    feed(nov, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    assert nov.update(np.array([0.0])) == ("cpu",)     # 5 -> 0 cuts the tooth short
    feed(nov, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert nov.update(np.array([0.0])) == ()           # now it is known


def test_values_beyond_the_learned_range_get_bins_of_their_own():
    nov = TransitionNovelty(["disk"], NoveltyParams(learn_rows=50))
    feed(nov, sawtooth(50))
    assert nov.update(np.array([40.0])) == ("disk",)   # bin 18: never entered
    assert nov.update(np.array([40.5])) == ("disk",)   # 18 -> 18: first time too
    assert nov.update(np.array([40.2])) == ()


def test_a_range_given_up_front_sets_the_grid_from_row_one():
    p = NoveltyParams(learn_rows=20, bins=4, ranges=(("temp", 0.0, 100.0),))
    nov = TransitionNovelty(["temp", "cpu"], p)
    feed_rows = [nov.update(np.array([v, v])) for v in [10.0, 20.0] * 10]
    assert feed_rows == [()] * 20
    # temp: width 25, so 10 and 20 share bin 0 and 60 is bin 2; cpu: learned width 2.5 around [10, 20]
    assert nov.update(np.array([24.0, 10.0])) == ()
    assert nov.update(np.array([60.0, 20.0])) == ("temp",)


def test_a_missing_metric_is_skipped_and_a_flat_window_gets_a_unit_range():
    nov = TransitionNovelty(["a", "b"], NoveltyParams(learn_rows=10))
    for _ in range(10):
        nov.update(np.array([5.0, math.nan]))
    assert nov.update(np.array([5.1, math.nan])) == ()       # unit range: width 0.25, 5.1 stays in 5's bin
    assert nov.update(np.array([5.4, 3.0])) == ("a",)        # b never had a value: no grid, never novel
    assert nov.state()["transitions"]["b"] == 0


def test_memory_is_bounded_per_metric():
    nov = TransitionNovelty(["x"], NoveltyParams(learn_rows=2, max_transitions=5))
    feed(nov, [0.0, 1.0])     # width 0.25
    novel = feed(nov, [float(v) for v in range(2, 30)])
    assert all(n == ("x",) for n in novel)
    assert nov.state()["transitions"]["x"] == 5
    feed(nov, [1.0])
    assert nov.update(np.array([2.0])) == ()        # among the first five: stored
    feed(nov, [19.0])
    assert nov.update(np.array([20.0])) == ("x",)   # beyond the cap: not stored, still novel


def test_rest_gate_keeps_one_incident_to_one_alarm():
    gate = RestGate(rest_rows=3, threshold=0.3)
    assert [gate.update(s) for s in (0.2, 0.25, 1.0, 1.0, 0.9, 0.5, 0.1, 0.4, 0.4)] == \
        [0.2, 0.25, 1.0, 0.0, 0.0, 0.0, 0.1, 0.4, 0.0]


@pytest.mark.parametrize("kwargs", [dict(learn_rows=0), dict(width_fraction=0.0), dict(calibrated_weight=2.0),
                                    dict(ranges=(("x", 5.0, 5.0),)), dict(rest_rows=-1)])
def test_bad_params_are_refused(kwargs):
    with pytest.raises(ValueError):
        NoveltyParams(**kwargs)


def detector(**novelty) -> Detector:
    return Detector(DetectParams(features=("value",), daily_profile=False,
                                 novelty=NoveltyParams(**{"learn_rows": 200, "rest_rows": 20, **novelty})))


def test_detector_scores_a_shape_anomaly_inside_the_normal_range_as_1():
    det = detector()
    ts = 1_700_000_000.0
    rows = []
    values = sawtooth(600) + [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0] + sawtooth(100)[1:]
    for i, v in enumerate(values):
        r, _ = det.update(ts + i, {"value": v})
        rows.append(r)
    anomaly_at = 606
    assert rows[anomaly_at].novel == ("value",) and rows[anomaly_at].anomaly_score == 1.0
    assert all(not r.novel for r in rows[:anomaly_at])
    # the rest gate: the next 20 rows report 0 whatever the other detectors say
    assert all(r.anomaly_score == 0.0 for r in rows[anomaly_at + 1: anomaly_at + 21])
    # elsewhere the calibrated surprise counts half
    assert max(r.anomaly_score for r in rows[200:anomaly_at]) <= 0.5
    assert det.status()["novelty_learning"] is False


def test_detector_without_novelty_keeps_the_calibrated_score():
    det = Detector(DetectParams(features=("value",), daily_profile=False, novelty=NoveltyParams(enabled=False)))
    rows = [det.update(1_700_000_000.0 + i, {"value": v})[0] for i, v in enumerate(sawtooth(300))]
    assert det.novelty is None and det.status()["novelty_learning"] is None
    assert all(r.novel == () for r in rows)


def test_replay_learns_the_grid_on_its_training_window_or_takes_the_given_range():
    values = sawtooth(600) + [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0] + sawtooth(100)[1:]
    ts = [1_700_000_000.0 + 300 * i for i in range(len(values))]
    rows = [{"value": v} for v in values]
    learned, _, _ = replay_rows(ts, rows, ("value",), ReplayParams(train_rows=100))
    given, _, _ = replay_rows(ts, rows, ("value",),
                              ReplayParams(train_rows=100, value_ranges=(("value", 0.0, 9.0),)))
    for res in (learned, given):
        assert [i for i, r in enumerate(res) if r.novel] == [606]
        assert res[606].anomaly_score == 1.0


def test_config_keys_reach_the_detector():
    p = detect_params(DetectSection(novelty=False, novelty_learn_samples=300, novelty_rest_samples=7))
    assert p.novelty == NoveltyParams(enabled=False, learn_rows=300, rest_rows=7)


def test_replay_cli_takes_value_ranges_and_refuses_bad_ones(tmp_path):
    src, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    values = sawtooth(600) + [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0] + sawtooth(100)[1:]
    src.write_text("timestamp,value\n" + "".join(f"{1_700_000_000 + 60 * i},{v}\n" for i, v in enumerate(values)))
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\ndevice_id = "t"\nstate_dir = "{tmp_path / "state"}"\n[mqtt]\nenabled = false\n')
    assert cli.main(["replay", str(src), "--out", str(out), "--config", str(cfg), "--train-rows", "100",
                     "--value-range", "value=0:9"]) == 0
    scores = [json.loads(line)["anomaly_score"] for line in out.read_text().splitlines()]
    assert scores[606] == 1.0 and len(scores) == len(values)
    for bad in ("value=9:0", "value=a:b", "0:9"):
        proc = subprocess.run([sys.executable, "-m", "agent.cli", "replay", str(src), "--out", str(out),
                               "--config", str(cfg), "--value-range", bad],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "value" in proc.stderr or "range" in proc.stderr
