"""Training, the registry and champion vs challenger, with real sklearn forests on a real SQLite store.

Devices are synthetic but the pipeline is the real one: rows go through the
store, ``run_training`` builds the dataset, trains, scores on the held-out
slice with the device's compact forest engine, compares with the champion on
the same rows and promotes (or not). Publishing goes to a real Mosquitto with a
real ed25519 key, and the published bundle is verified like a device would.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet.config import PromoteSection, config_from_dict
from fleet.keys import generate
from fleet.registry import Registry, compare, verdict, Criterion
from fleet.store import Incoming, open_store
from fleet.train import run_training
from models.bundle import Target, load_trusted_keys, verify_bundle
from models.features import build_matrix
from models.forest import load_forest_model
from tests.fleet_helpers import fleet_main, ingest, rows

pytestmark = pytest.mark.timeout(90)
T0 = 1_700_000_000.0
DEV = Target("device", "pi-01")
QUIET = {"system.cpuUsage": (20, 3), "system.memoryPercent": (40, 2), "system.load1": (0.5, 0.1)}
BUSY = {"system.cpuUsage": (60, 3), "system.memoryPercent": (70, 2), "system.load1": (2.0, 0.2)}


def make_config(tmp: Path, **sections: Any) -> Any:
    doc = {"fleet": {"state_dir": str(tmp / "fleet")},
           "train": {"min_samples": 100, "n_estimators": 40, "lstm": False}}
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return config_from_dict(doc, {})


@pytest.fixture
def store(tmp_path: Path):
    s = open_store(f"sqlite:///{tmp_path / 'fleet' / 'fleet.db'}")
    yield s
    s.close()


# -- the decision (pure) ----------------------------------------------------------------------------
def test_verdicts_use_relative_and_absolute_margins() -> None:
    mase = Criterion("forecast_mase", True, 0.05, True)
    assert verdict(mase, 0.90, 1.00) == "better"       # 10 % lower
    assert verdict(mase, 0.97, 1.00) == "same"         # 3 % is inside the margin
    assert verdict(mase, 1.10, 1.00) == "worse"
    rate = Criterion("clean_anomaly_rate", True, 0.01, False)
    assert verdict(rate, 0.02, 0.05) == "better" and verdict(rate, 0.055, 0.05) == "same"
    precision = Criterion("precision", False, 0.05, False)
    assert verdict(precision, 0.9, 0.7) == "better" and verdict(precision, 0.6, 0.7) == "worse"
    assert verdict(precision, 0.9, None) == "new" and verdict(precision, None, 0.7) == "missing"
    assert verdict(precision, None, None) == "n/a"


def test_promotion_needs_a_win_and_no_loss() -> None:
    p = PromoteSection(mase_margin=0.02, coverage_margin=0.02, anomaly_rate_margin=0.005)
    champ = {"kinds": ["forest", "lstm"], "forecast_mase": 1.0, "coverage_error": 0.05, "clean_anomaly_rate": 0.02}
    better_fc = {**champ, "forecast_mase": 0.9}
    assert compare(better_fc, champ, p)["promote"]
    tradeoff = {**better_fc, "clean_anomaly_rate": 0.05}
    out = compare(tradeoff, champ, p)
    assert not out["promote"] and "clean_anomaly_rate" in out["reason"]
    assert not compare(dict(champ), champ, p)["promote"]
    no_lstm = {"kinds": ["forest"], "clean_anomaly_rate": 0.001}
    assert not compare(no_lstm, champ, p)["promote"]          # would lose the forecaster's criteria
    # first model: sanity gates only
    assert compare({"kinds": ["forest"], "clean_anomaly_rate": 0.01}, None, p)["promote"]
    first = compare({"kinds": ["forest"], "clean_anomaly_rate": 0.3}, None, p)
    assert not first["promote"] and "max_clean_anomaly_rate" in first["reason"]
    assert not compare({"kinds": ["forest", "lstm"], "clean_anomaly_rate": 0.0, "forecast_mase": None},
                       None, p)["promote"]


# -- real training ------------------------------------------------------------------------------------
def test_challenger_that_fits_the_new_regime_replaces_the_champion_and_a_copy_does_not(
        tmp_path: Path, store: Any) -> None:
    cfg = make_config(tmp_path)
    quiet = rows(T0, 600, QUIET, 1)
    ingest(store, "pi-01", quiet, "q")
    first = run_training(store, cfg, DEV, publish=False, now_s=quiet[-1][0] + 60)
    assert first.promoted and first.record.version == 1 and first.record.status == "champion"
    assert first.record.metrics["clean_anomaly_rate"] <= 0.05

    busy = rows(quiet[-1][0] + 60, 600, BUSY, 2)      # the device's workload changed
    ingest(store, "pi-01", busy, "b")
    now = busy[-1][0] + 60
    second = run_training(store, cfg, DEV, publish=False, now_s=now)
    crit = {c["name"]: c for c in second.comparison["criteria"]}
    # the champion flags the new normal everywhere; the challenger learnt it
    assert crit["clean_anomaly_rate"]["champion"] > 0.9 > 0.05 > crit["clean_anomaly_rate"]["candidate"]
    assert crit["clean_anomaly_rate"]["verdict"] == "better" and second.promoted
    reg = Registry(store)
    assert reg.champion(DEV).version == 2 and reg.require(DEV, 1).status == "retired"
    assert reg.require(DEV, 2).parent_version == 1 and reg.require(DEV, 2).comparison["champion_version"] == 1

    # the same data again gives the same model: not better, so no promotion
    third = run_training(store, cfg, DEV, publish=False, now_s=now)
    assert not third.promoted and third.record.status == "candidate"
    assert "not better" in third.comparison["reason"] and reg.champion(DEV).version == 2

    # a badly tuned challenger (flags a fifth of the rows) loses on clean data
    loose = make_config(tmp_path, train={"contamination": 0.2})
    fourth = run_training(store, loose, DEV, publish=False, now_s=now)
    assert not fourth.promoted and "worse than the champion on clean_anomaly_rate" in fourth.comparison["reason"]
    assert [r.status for r in reg.list(DEV)] == ["retired", "champion", "candidate", "candidate"]
    rec = reg.require(DEV, 2)
    assert rec.data_from_s == quiet[0][0] and rec.data_to_s == busy[-1][0] and rec.n_train + rec.n_holdout == 1200
    assert rec.params["features"] == ["system.cpuUsage", "system.memoryPercent", "system.load1"]
    assert rec.holdout_from_s == busy[-240][0]                     # the most recent 20 %


def test_precision_and_recall_on_labelled_events(tmp_path: Path, store: Any) -> None:
    data = rows(T0, 800, QUIET, 3)
    spikes = [700, 701, 702, 750, 751, 780]                          # in the held-out slice
    for i in spikes:
        data[i][1]["system.cpuUsage"] = 99.0
        data[i][1]["system.load1"] = 6.0
    ingest(store, "pi-01", data, "d")
    store.add_label("pi-01", data[700][0], data[702][0])
    store.add_label("pi-01", data[750][0], data[751][0])
    store.add_label("pi-01", data[780][0], data[780][0])
    out = run_training(store, make_config(tmp_path), DEV, publish=False, now_s=data[-1][0] + 60)
    m = out.record.metrics
    # independent check with the exported forest on the same held-out rows
    model = load_forest_model(Path(out.record.artefact_dir) / "forest")
    X = build_matrix([v for _, v in data], model.feature_names)[640:]
    flag = -model.forest.score_samples(X) >= model.thresholds["warning"]
    labelled = np.isin(np.arange(640, 800), spikes)
    assert m["labelled_events"] == 3 and m["event_recall"] == 1.0
    assert m["precision"] == pytest.approx(flag[labelled].sum() / flag.sum())
    assert m["clean_anomaly_rate"] == pytest.approx(flag[~labelled].mean())
    assert m["precision"] > 0.5


# -- registry commands and publishing -------------------------------------------------------------------
def test_models_commands_publish_promote_and_roll_back(tmp_path: Path, store: Any, mqtt_broker: Any,
                                                       mqtt_sink: Any, capsys: Any) -> None:
    keys = tmp_path / "keys"
    key, pub, _ = generate(keys, "fleet")
    conf = tmp_path / "fleet.toml"
    conf.write_text(f'[fleet]\nstate_dir = "{tmp_path / "fleet"}"\nsigning_key = "{key}"\n'
                    f'[mqtt]\nhost = "{mqtt_broker.host}"\nport = {mqtt_broker.port}\n'
                    '[train]\nmin_samples = 100\nn_estimators = 30\nlstm = false\n')
    sink = mqtt_sink(mqtt_broker, ["devices/pi-01/models"])
    trusted = load_trusted_keys([pub])
    quiet = rows(time.time() - 60.0 * 1100, 500, QUIET, 4)     # the CLI trains on the last 14 days
    ingest(store, "pi-01", quiet, "q")

    def bundles() -> list[Any]:
        return [verify_bundle(m.payload, trusted).manifest for m in sink.messages("devices/pi-01/models")]

    assert fleet_main(["train", "--config", str(conf), "--device", "pi-01", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["promoted"] and out["published"]["topic"] == "devices/pi-01/models"
    assert sink.wait_count("devices/pi-01/models", 1) and bundles()[0].version == 1
    assert bundles()[0].target == DEV and bundles()[0].kinds == ("forest",)

    ingest(store, "pi-01", rows(quiet[-1][0] + 60, 500, BUSY, 5), "b")
    assert fleet_main(["train", "--config", str(conf), "--device", "pi-01"]) == 0
    assert "PROMOTED" in capsys.readouterr().out
    assert sink.wait_count("devices/pi-01/models", 2) and bundles()[-1].version == 2

    assert fleet_main(["models", "list", "--config", str(conf), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["status"]) for r in listed] == [(1, "retired"), (2, "champion")]
    assert fleet_main(["models", "show", "--config", str(conf), "device:pi-01"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 2 and shown["metrics"]["clean_anomaly_rate"] is not None

    # rollback: v1's model goes out again, as v3, because devices only accept growing versions
    assert fleet_main(["models", "rollback", "--config", str(conf), "device:pi-01"]) == 0
    assert "v3 is the champion (rollback to v1 from v2)" in capsys.readouterr().out
    reg = Registry(store)
    v1, v3 = reg.require(DEV, 1), reg.require(DEV, 3)
    assert v3.status == "champion" and v3.parent_version == 1 and reg.require(DEV, 2).status == "retired"
    assert (Path(v3.artefact_dir) / "forest" / "forest.npz").read_bytes() == \
        (Path(v1.artefact_dir) / "forest" / "forest.npz").read_bytes()
    assert json.loads((Path(v3.artefact_dir) / "forest" / "model.json").read_text())["version"] == 3
    assert sink.wait_count("devices/pi-01/models", 3) and bundles()[-1].version == 3
    assert sink.messages("devices/pi-01/models")[-1].payload == (Path(v3.artefact_dir) / "bundle.tar").read_bytes()

    # promoting v2 again by hand: published as a new version (v4) too
    assert fleet_main(["models", "promote", "--config", str(conf), "device:pi-01", "2"]) == 0
    assert reg.champion(DEV).version == 4 and reg.champion(DEV).note == "re-promotion of v2"
    assert sink.wait_count("devices/pi-01/models", 4) and bundles()[-1].version == 4

    assert fleet_main(["models", "show", "--config", str(conf), "device:pi-01", "9"]) == 2
    assert "no model version 9" in capsys.readouterr().err
    assert fleet_main(["train", "--config", str(conf), "--device", "ghost"]) == 1
    assert "no device has data" in capsys.readouterr().err


def test_publishing_needs_a_signing_key_and_retrain_publishes_later(tmp_path: Path, store: Any,
                                                                    mqtt_broker: Any, mqtt_sink: Any) -> None:
    from fleet.retrain import run_once

    cfg = make_config(tmp_path, mqtt={"host": mqtt_broker.host, "port": mqtt_broker.port},
                      fleet={"signing_key": str(tmp_path / "keys" / "fleet.key")})
    data = rows(T0, 400, QUIET, 6)
    ingest(store, "pi-01", data, "q")
    out = run_training(store, cfg, DEV, now_s=data[-1][0] + 60)
    assert out.promoted and out.published is None and "no signing key" in out.publish_error
    generate(tmp_path / "keys", "fleet")
    sink = mqtt_sink(mqtt_broker, ["devices/pi-01/models"])
    reports = run_once(store, cfg, now_s=data[-1][0] + 120)
    assert [(r["target"], r["outcome"], r.get("version")) for r in reports] == [("device:pi-01", "published", 1)]
    assert sink.wait_count("devices/pi-01/models", 1)
    assert Registry(store).champion(DEV).published_s is not None


def test_groups_from_twins_and_versions_above_what_devices_report(tmp_path: Path, store: Any) -> None:
    from fleet.dataset import target_devices

    def twin(device: str, reported: dict) -> Incoming:
        return Incoming(f"t-{device}", device, "twin", T0, {"state": {"reported": reported}})

    store.ingest([twin("a", {"groups": ["lab", "eu"]}), twin("b", {"groups": ["eu"]}),
                  twin("c", {"models": [{"kind": "forest", "version": 7, "target": "group:lab"},
                                        {"kind": "forest", "version": 9, "target": "device:c"}]})])
    cfg = make_config(tmp_path, groups={"lab": ["z"]})
    assert target_devices(store, cfg, Target("group", "lab")) == ["a", "z"]
    assert target_devices(store, cfg, Target("group", "eu")) == ["a", "b"]
    # a bundle published by hand as group:lab v7 is installed: the registry continues above it
    assert Registry(store).next_version(Target("group", "lab")) == 8
    assert Registry(store).next_version(Target("group", "eu")) == 1
