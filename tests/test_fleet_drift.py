"""Drift and accuracy monitoring, the retraining pass, and the fleet configuration.

Synthetic devices with a known shift: PSI/KS on arrays whose answer is known
analytically, then the whole check (store -> champion's training range vs
recent rows -> verdicts -> retraining of the drifting target only) with real
forests.
"""
from __future__ import annotations

import argparse
import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet.commands import register
from fleet.config import FleetConfigError, config_from_dict, describe, load_config
from fleet.drift import check_target, ks_statistic, psi, recent_reports, reported_coverage, score_forecasts
from fleet.registry import Registry
from fleet.retrain import history, plan, run_loop, run_once
from fleet.store import open_store
from fleet.train import run_training
from models.bundle import Target
from tests.fleet_helpers import fleet_main, ingest, rows

pytestmark = pytest.mark.timeout(90)
T0 = 1_700_000_000.0
LAB = Target("group", "lab")
CALM = {"system.cpuUsage": (20, 3), "system.memoryPercent": (40, 2)}
HOT = {"system.cpuUsage": (35, 3), "system.memoryPercent": (40, 2)}     # cpu up 5 sd, memory unchanged
REPO = Path(__file__).resolve().parents[1]


# -- statistics ------------------------------------------------------------------------------------------
def test_psi_and_ks_on_known_distributions() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, 20000)
    same = rng.normal(0, 1, 20000)
    shifted = rng.normal(1, 1, 20000)
    assert psi(ref, ref) == 0.0 and ks_statistic(ref, ref) == 0.0
    assert psi(ref, same) < 0.01 and ks_statistic(ref, same) < 0.02
    # KS of N(0,1) vs N(1,1) is 2*Phi(1/2) - 1 = 0.3829
    expected_d = 2 * (0.5 * (1 + math.erf(0.5 / math.sqrt(2)))) - 1
    assert ks_statistic(ref, shifted) == pytest.approx(expected_d, abs=0.02)
    assert psi(ref, shifted) > 0.25
    # a constant reference still bins: anything else is all in another bucket
    assert psi(np.full(100, 5.0), np.full(100, 5.0)) == 0.0 and psi(np.full(100, 5.0), np.full(100, 7.0)) > 1
    assert math.isnan(psi(np.array([]), same))


def test_forecasts_are_scored_against_the_telemetry_of_their_steps() -> None:
    samples = [(T0 + t, {"m": v}) for t, v in ((1, 10.0), (2, 12.0), (3, 20.0), (4, 22.0))]
    forecasts = [{"metric": "m", "origin": "2023-11-14T22:13:20Z", "stepSeconds": 2,   # origin = T0
                  "values": [11.0, 30.0],
                  "intervals": {"80": {"lower": [10.0, 25.0], "upper": [12.0, 35.0]}}}]
    got = score_forecasts(forecasts, samples)
    # step 1 covers (T0, T0+2]: mean 11; step 2 covers (T0+2, T0+4]: mean 21
    assert got == {"m": {"n": 2, "mae": (0.0 + 9.0) / 2, "coverage_80": 0.5}}
    assert reported_coverage({"forecastCoverage": [{"metric": "m", "level": 0.8, "coverage": 0.4}]}) == \
        {"m": {"coverage_80": 0.4}}


# -- the whole check and the retraining pass ------------------------------------------------------------
@pytest.fixture
def lab(tmp_path: Path):
    """A group champion trained on calm data from two devices, then one device runs hot."""
    cfg = config_from_dict({"fleet": {"state_dir": str(tmp_path)}, "groups": {"lab": ["d1", "d2"]},
                            "train": {"min_samples": 100, "n_estimators": 30, "lstm": False},
                            "drift": {"recent_s": 86400.0, "min_samples": 50}, "promote": {"publish": False},
                            "retrain": {"targets": ["group:lab", "device:d3"]}}, {})
    store = open_store(cfg.store_url)
    for i, dev in enumerate(("d1", "d2", "d3")):
        ingest(store, dev, rows(T0, 400, CALM, i), "calm")
    trained_at = T0 + 400 * 60
    assert run_training(store, cfg, LAB, publish=False, now_s=trained_at).promoted
    assert run_training(store, cfg, Target("device", "d3"), publish=False, now_s=trained_at).promoted
    later = trained_at + 200 * 60
    ingest(store, "d1", rows(trained_at, 200, HOT, 10), "hot")
    ingest(store, "d2", rows(trained_at, 200, CALM, 11), "calm2")
    ingest(store, "d3", rows(trained_at, 200, CALM, 12), "calm2")
    yield cfg, store, trained_at, later
    store.close()


def test_drift_is_found_on_the_shifted_device_and_feature_only(lab: Any) -> None:
    cfg, store, trained_at, later = lab
    health = check_target(store, cfg, LAB, now_s=later)
    assert health.drifting_devices == ["d1"] and health.needs_retraining
    flagged = {(v.device_id, v.name) for v in health.verdicts if v.flagged}
    assert flagged == {("d1", "system.cpuUsage")}
    checked = {(v.device_id, v.name) for v in health.verdicts}
    assert checked == {(d, f) for d in ("d1", "d2") for f in ("system.cpuUsage", "system.memoryPercent")}
    d1_cpu = next(v for v in health.verdicts if (v.device_id, v.name) == ("d1", "system.cpuUsage"))
    assert d1_cpu.n_recent == 200 and d1_cpu.n_ref == 320        # the champion's training rows of d1
    assert check_target(store, cfg, Target("device", "d3"), now_s=later).drifting_devices == []
    ks_cfg = config_from_dict({**_doc(cfg), "drift": {"method": "ks", "min_samples": 50}}, {})
    assert check_target(store, ks_cfg, LAB, now_s=later, save=False).drifting_devices == ["d1"]
    stored = recent_reports(store, "group:lab")
    assert {(r["device_id"], r["name"]) for r in stored if r["flagged"]} == {("d1", "system.cpuUsage")}


def _doc(cfg: Any) -> dict:
    return {"fleet": {"state_dir": cfg.fleet.state_dir}, "groups": dict(cfg.groups),
            "train": {"min_samples": 100, "n_estimators": 30, "lstm": False}}


def test_degraded_forecasts_make_a_device_due(lab: Any) -> None:
    cfg, store, trained_at, later = lab
    from agent import payloads
    from fleet.collect import parse_message, routes

    table = routes()
    samples = store.samples("d2", since_s=trained_at)
    msgs = []
    for k in range(0, 150, 5):     # forecasts of cpu whose 80 % band misses the actual level
        origin = samples[k][0]
        msg = payloads.forecast("d2", origin, metric="system.cpuUsage", origin_ts_s=origin, step_s=60.0,
                                values=[50.0] * 3, intervals={"80": ([48.0] * 3, [52.0] * 3)}, model="fallback")
        msgs.append(parse_message("devices/d2/forecasts", payloads.encode(msg), table))
    store.ingest(msgs)
    health = check_target(store, cfg, LAB, now_s=later)
    assert health.degraded_devices == ["d2"]
    cov = next(v for v in health.verdicts if v.name == "system.cpuUsage:coverage_80")
    assert cov.statistic == 0.0 and cov.n_recent == 90 and cov.flagged


def test_retrain_pass_trains_what_drifts_or_is_due_and_only_that(lab: Any, tmp_path: Path, capsys: Any) -> None:
    cfg, store, trained_at, later = lab
    plans = {p.target.label: p for p in plan(store, cfg, later)}
    assert plans["group:lab"].reasons == ["drift on d1"] and plans["device:d3"].reasons == []
    assert {r["target"]: r["outcome"] for r in run_once(store, cfg, now_s=later, dry_run=True)} == \
        {"group:lab": "planned", "device:d3": "idle"}
    reports = {r["target"]: r for r in run_once(store, cfg, now_s=later)}
    assert reports["device:d3"]["outcome"] == "idle"
    lab_report = reports["group:lab"]
    assert lab_report["outcome"] == "trained" and lab_report["version"] == 2 and lab_report["promoted"]
    assert "clean_anomaly_rate" in lab_report["reason"]
    assert Registry(store).champion(LAB).version == 2
    # the new champion knows the hot regime: no drift right after, nothing to do
    assert all(not p.reasons for p in plan(store, cfg, later + 60))
    # a day later everything is due
    due = {p.target.label: p.reasons for p in plan(store, cfg, later + 86400, check_drift=False)}
    assert all(r and r[0].startswith("due: last trained") for r in due.values())
    runs = history(store)
    assert [(r["target"], r["outcome"], r["version"]) for r in runs] == [("group:lab", "trained", 2)]

    conf = tmp_path / "f.toml"
    conf.write_text(f'[fleet]\nstate_dir = "{cfg.fleet.state_dir}"\n[retrain]\ntargets = ["group:lab"]\n'
                    '[groups]\nlab = ["d1", "d2"]\n[train]\nlstm = false\n[promote]\npublish = false\n')
    assert fleet_main(["retrain", "--config", str(conf), "--history"]) == 0
    assert "group:lab" in capsys.readouterr().out
    assert fleet_main(["retrain", "--config", str(conf), "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["outcome"] == "planned"     # created long ago in real time
    assert fleet_main(["drift", "--config", str(conf), "--history", "--json"]) == 0
    assert any(r["flagged"] for r in json.loads(capsys.readouterr().out))


def test_retrain_loop_runs_passes_until_stopped(lab: Any) -> None:
    cfg, store, trained_at, later = lab
    stop = threading.Event()
    passes: list[list[dict]] = []

    def on_pass(reports: list[dict]) -> None:
        passes.append(reports)
        stop.set()

    failures = run_loop(lambda: open_store(cfg.store_url), cfg, stop, on_pass=on_pass)
    assert failures == 0 and len(passes) == 1
    assert {r["target"] for r in passes[0]} == {"group:lab", "device:d3"}


# -- configuration -----------------------------------------------------------------------------------------
def test_config_file_environment_and_errors(tmp_path: Path) -> None:
    conf = tmp_path / "fleet.toml"
    conf.write_text('[store]\nurl = "sqlite:///x.db"\n[promote]\nmase_margin = 0.1\n'
                    '[drift]\nmethod = "ks"\n[groups]\nlab = ["a", "b"]\n')
    cfg = load_config(conf, env={"EDGE_FLEET_MQTT_PORT": "8883", "EDGE_FLEET_TRAIN_LSTM": "no",
                                 "EDGE_FLEET_RETRAIN_TARGETS": "group:lab, device:x", "STATE_DIRECTORY": "/srv/f"})
    assert cfg.store_url == "sqlite:///x.db" and cfg.promote.mase_margin == 0.1 and cfg.drift.method == "ks"
    assert cfg.mqtt.port == 8883 and cfg.train.lstm is False and cfg.retrain.targets == ("group:lab", "device:x")
    assert cfg.groups == {"lab": ("a", "b")}
    bad = [({"drift": {"method": "chi2"}}, "drift.method"), ({"mqtt": {"port": 0}}, "mqtt.port"),
           ({"train": {"holdout_fraction": "a lot"}}, "train.holdout_fraction"),
           ({"store": {"uri": "x"}}, "unknown key 'store.uri'"), ({"nope": {}}, "unknown section 'nope'"),
           ({"groups": {"lab": "a"}}, "groups.lab")]
    for doc, needle in bad:
        with pytest.raises(FleetConfigError, match=needle.replace("[", r"\[").replace(".", r"\.")):
            config_from_dict(doc, {})
    with pytest.raises(FleetConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", env={})
    (tmp_path / "broken.toml").write_text("[store\n")
    with pytest.raises(FleetConfigError, match="invalid TOML"):
        load_config(tmp_path / "broken.toml", env={})


def test_defaults_follow_systemd_state_directory_and_the_example_lists_every_key(monkeypatch: Any) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/edge-fleet")
    cfg = config_from_dict({}, {})
    assert cfg.store_url == "sqlite:////var/lib/edge-fleet/fleet.db"
    assert str(cfg.signing_key) == "/var/lib/edge-fleet/keys/bundle-signing.key"
    assert str(cfg.artefact_dir) == "/var/lib/edge-fleet/models"
    example = (REPO / "fleet" / "fleet.example.toml").read_text()
    for key, _, _, _ in describe():
        section, name = key.split(".")
        assert f"[{section}]" in example and f"# {name} = " in example, key
    assert load_config(REPO / "fleet" / "fleet.example.toml", env={}) == config_from_dict(
        {}, {}, str(REPO / "fleet" / "fleet.example.toml"))


def test_retrain_unit_runs_this_cli() -> None:
    unit = (REPO / "systemd" / "edge-fleet-retrain.service").read_text()
    exec_start = next(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = exec_start.split()
    assert argv[0].endswith("/edge-fleet") and argv[1:] == ["retrain"]
    from fleet.cli import GLOBAL_OPTIONS

    parser = argparse.ArgumentParser()
    handlers = register(parser.add_subparsers(dest="command", required=True))
    args = GLOBAL_OPTIONS.parse(GLOBAL_OPTIONS.install(parser), argv[1:])
    assert args.command == "retrain" and not args.loop and args.config is None and "retrain" in handlers
    assert "StateDirectory=edge-fleet" in unit      # where the default store and key live
