"""Models tolerate features a device does not have (issue #24).

Rule (models.bundle.missing_features): a forest, maintenance or cluster bundle installs on a
device that lacks some of its features; the forest scores with the training median in place of
each missing metric, the install logs one info line and the model event names the missing
features. Refused: a bundle whose features the device samples none of, one holding an LSTM, and
a forest without training medians.
"""
from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from agent.model_manager import event_payload
from agent.updates import ModelUpdater
from fleet.keys import generate, load_signing_key
from models.bundle import BundleError, Target, build_bundle, missing_features
from models.detect import DetectParams, Detector
from models.forest import forest_stand_ins, load_forest_model
from tests.fakes import FakeClock

TRAINED_ON = ["system.cpuUsage", "system.memoryPercent", "system.temperature"]
DEVICE_HAS = {"system.cpuUsage", "system.memoryPercent", "system.load1"}   # no temperature sensor


@pytest.fixture(scope="module")
def forest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.training.forest import ForestParams, train_forest_from_matrix

    rng = np.random.default_rng(3)
    X = np.column_stack([rng.normal(20, 3, 500), rng.normal(40, 2, 500), rng.normal(55, 1, 500)])
    out = tmp_path_factory.mktemp("forest") / "model"
    train_forest_from_matrix(X, TRAINED_ON, ForestParams(n_estimators=20, min_samples=50), out, version=1)
    return out


def signed(tmp_path: Path, forest_dir: Path, version: int, **meta_changes: object) -> tuple[bytes, Path]:
    key, pub, _ = generate(tmp_path / "keys", "fleet")
    meta = {**json.loads((forest_dir / "model.json").read_text()), "version": version, **meta_changes}
    files = {"forest/forest.npz": (forest_dir / "forest.npz").read_bytes(),
             "forest/model.json": json.dumps(meta).encode()}
    data = build_bundle(private_key=load_signing_key(key).private_key, files=files, version=version,
                        target=Target("fleet", "all"), feature_names=TRAINED_ON, interval_s=1.0,
                        created_at_s=FakeClock().time() - 60)
    return data, pub


def updater(tmp_path: Path, pub: Path) -> ModelUpdater:
    conn = sqlite3.connect(tmp_path / "agent.db", isolation_level=None)
    return ModelUpdater(tmp_path / "state", conn, [pub], "pi-01", (), available_metrics=DEVICE_HAS,
                        clock=FakeClock(), loaders={"forest": load_forest_model})


def test_a_fleet_forest_with_an_absent_sensor_installs_and_scores_with_the_training_median(
        tmp_path: Path, forest_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    data, pub = signed(tmp_path, forest_dir, 1)
    with caplog.at_level(logging.INFO, logger="agent.updates"):
        decision = updater(tmp_path, pub).offer(data, "fleet/all/models")
    assert decision.accepted, decision.reason
    assert decision.reason.endswith("(not sampled here, scored without: system.temperature)")
    lines = [r.getMessage() for r in caplog.records if "scored without" in r.getMessage()]
    assert len(lines) == 1 and "system.temperature" in lines[0]
    msg = event_payload("pi-01", decision.event)
    assert msg["event"] == "installed" and msg["missingFeatures"] == ["system.temperature"]

    model = load_forest_model(next((tmp_path / "state" / "models" / "forest").glob("v1-*")))
    median = model.meta["baseline"]["median"][2]
    assert forest_stand_ins(model)[2] == (2, "system.temperature", median)
    det = Detector(DetectParams(features=("system.cpuUsage", "system.memoryPercent")), forest=model)
    rng = np.random.default_rng(5)
    rows = [(float(rng.normal(20, 3)), float(rng.normal(40, 2))) for _ in range(60)] + [(95.0, 90.0)]
    results = [det.update(1_700_000_000.0 + i, {"system.cpuUsage": c, "system.memoryPercent": m})[0]
               for i, (c, m) in enumerate(rows)]
    assert det.detector_name == "zscore+forest"
    # every row is scored by the forest, exactly as with the temperature at its training median
    assert [r.forest_score for r in results] == [model.forest.score_one(np.array([c, m, median])) for c, m in rows]
    # and an outlier in the metrics the device has still stands out
    assert results[-1].forest_score > max(r.forest_score for r in results[:-1])
    assert results[-1].forest_score >= model.thresholds["warning"]


def test_refused_when_nothing_can_stand_in(tmp_path: Path, forest_dir: Path) -> None:
    data, pub = signed(tmp_path, forest_dir, 1, baseline=None)
    decision = updater(tmp_path, pub).offer(data, "fleet/all/models")
    assert not decision.accepted and decision.stage == "features"
    assert "system.temperature" in decision.reason and "no training medians" in decision.reason
    with pytest.raises(BundleError, match="lstm needs every feature"):
        missing_features(("forest", "lstm"), TRAINED_ON, DEVICE_HAS, json.loads((forest_dir / "model.json").read_text()))
    with pytest.raises(BundleError, match="none of the model's features"):
        missing_features(("cluster",), ["sensor.humidity|mean"], DEVICE_HAS)
    assert missing_features(("maintenance",), ["system.temperature|max1h", "system.cpuUsage|mean6h"],
                            DEVICE_HAS) == ["system.temperature"]
    assert missing_features(("lstm",), ["system.cpuUsage"], DEVICE_HAS) == []
