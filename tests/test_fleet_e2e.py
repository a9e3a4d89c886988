"""The fleet loop end to end: a real agent and the fleet around one real Mosquitto.

The device is the real daemon (``agent.daemon.Daemon``) with a fake psutil
source (a noisy machine sampled every 25 ms), the agent's telemetry/twin
reporter, its MQTT publisher with its SQLite outbox, and the model manager that
verifies and installs bundles. The fleet side is the real collector in a thread,
then ``run_training`` (Isolation Forest + a small LSTM) which promotes the first
version, signs it and publishes it retained; the device installs it and reports
the new versions in its twin and model events, which the collector stores.

The daemon's component wiring is assembled here (Reporter + MqttReporter +
ModelManager) the way the agent's CLI will; detectors are not needed to install
and report a model.
"""
from __future__ import annotations

import dataclasses
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import config as agent_config
from agent.daemon import Daemon
from agent.model_manager import ManagerParams, ModelManager
from agent.reporter import Reporter
from agent.sampling import SystemClock
from agent.store import Store as AgentStore
from agent.transport import MqttParams, MqttReporter
from fleet.collect import Collector
from fleet.config import config_from_dict
from fleet.keys import generate
from fleet.registry import Registry
from fleet.store import open_store
from fleet.train import run_training
from models.bundle import Target, load_trusted_keys, verify_bundle
from tests.conftest import wait_until
from tests.fakes import FakeSource

pytestmark = pytest.mark.timeout(150)
DEVICE = "pi-01"
INTERVAL_S = 0.025


def noisy(i: int, reading: Any) -> Any:
    """A machine with a CPU cycle and some noise (a constant one would teach the forest nothing)."""
    rng = np.random.default_rng(i)
    cpu = 25.0 + 10.0 * math.sin(2 * math.pi * i / 40) + rng.normal(0, 1.5)
    return dataclasses.replace(reading, cpu_percent=cpu, memory_percent=40.0 + rng.normal(0, 0.5),
                               load=(0.5 + rng.normal(0, 0.05), 0.4, 0.3))


class Device:
    def __init__(self, state: Path, broker: Any, pub: Path) -> None:
        cfg = agent_config.parse({"agent": {"device_id": DEVICE, "state_dir": str(state), "interval_s": INTERVAL_S},
                                  "store": {"commit_interval_s": 0.5}}, {})
        self.manager = ModelManager(ManagerParams(trusted_keys=(str(pub),), health_samples=20, poll_interval_s=0.5))
        self.mqtt = MqttReporter(MqttParams(host=broker.host, port=broker.port, reconnect_min_s=0.2,
                                            reconnect_max_s=1.0, keepalive_s=5),
                                 device_id=DEVICE, model_handler=self.manager.handle_bundle)
        self.reporter = Reporter(telemetry_interval_s=0.5, twin_interval_s=0.5, models=self.manager.models)
        self.daemon = Daemon(cfg, source=FakeSource(SystemClock(), hook=noisy),
                             components=[self.mqtt, self.manager, self.reporter])
        self.thread = threading.Thread(target=self.daemon.run, daemon=True)
        self.thread.start()
        assert wait_until(lambda: self.mqtt.connected, 10), self.mqtt.last_error

    def stop(self) -> None:
        self.daemon.request_stop()
        self.thread.join(15)
        assert not self.thread.is_alive()


def test_device_sends_fleet_collects_trains_publishes_and_the_device_installs(tmp_path: Path, mqtt_broker: Any,
                                                                              mqtt_sink: Any) -> None:
    key, pub, _ = generate(tmp_path / "keys", "fleet")
    cfg = config_from_dict({
        "fleet": {"state_dir": str(tmp_path / "fleet"), "signing_key": str(key)},
        "mqtt": {"host": mqtt_broker.host, "port": mqtt_broker.port, "client_id": "e2e-collector"},
        "collect": {"flush_interval_s": 0.1},
        "train": {"min_samples": 150, "n_estimators": 30, "seq_len": 8, "horizon": 2, "units": 4, "epochs": 2,
                  "step_s": 0.0, "time_features": False, "max_eval_origins": 40,
                  "forecast_metrics": ["system.cpuUsage"]},
    }, {})
    stop = threading.Event()
    collector = Collector(open_store(cfg.store_url), cfg)
    collecting = threading.Thread(target=collector.run, args=(stop,), daemon=True)
    collecting.start()
    assert collector.connected.wait(10)
    fleet = open_store(cfg.store_url)
    sink = mqtt_sink(mqtt_broker, [f"devices/{DEVICE}/telemetry", f"devices/{DEVICE}/models"])
    device = Device(tmp_path / "device", mqtt_broker, pub)
    try:
        # 1. the device reports; the fleet stores what it sends
        assert wait_until(lambda: fleet.sample_range(DEVICE)[0] >= 500, 60), fleet.sample_range(DEVICE)
        assert fleet.twin(DEVICE)["system.cpuUsage"] is not None and fleet.twin(DEVICE)["models"] == []

        # 2. at-least-once delivery: a telemetry message delivered twice is stored once
        first = sink.messages(f"devices/{DEVICE}/telemetry")[0]
        n_before, dup_before = len(fleet.samples(DEVICE)), fleet.counters().get("duplicates", 0)
        sink.publish(first.topic, first.payload)
        assert wait_until(lambda: fleet.counters().get("duplicates", 0) == dup_before + 1, 10)
        assert len({ts for ts, _ in fleet.samples(DEVICE)}) == len(fleet.samples(DEVICE)) >= n_before

        # 3. train, evaluate on the recent held-out slice, promote the first version, sign and publish it
        outcome = run_training(fleet, cfg, Target("device", DEVICE))
        assert outcome.promoted and outcome.published and not outcome.publish_error, outcome.as_dict()
        rec = outcome.record
        assert rec.version == 1 and rec.status == "champion" and rec.kinds == ("forest", "lstm")
        assert rec.metrics["origins_scored"] > 0 and math.isfinite(rec.metrics["forecast_mase"])
        assert rec.metrics["clean_anomaly_rate"] <= cfg.promote.max_clean_anomaly_rate
        retained = sink.wait_count(f"devices/{DEVICE}/models", 1)[-1]
        manifest = verify_bundle(retained.payload, load_trusted_keys([pub])).manifest
        assert (manifest.version, manifest.kinds, manifest.target) == (1, ("forest", "lstm"), Target("device", DEVICE))

        # 4. the device verifies and installs both models and reports them; the fleet stores the report
        def reported() -> dict[str, int]:
            twin = fleet.twin(DEVICE) or {}
            return {m["kind"]: m["version"] for m in twin.get("models") or []}

        assert wait_until(lambda: reported() == {"forest": 1, "lstm": 1}, 30), (reported(), device.manager.status())
        events = fleet.model_events(DEVICE)
        assert {(e["event"], e["version"]) for e in events} >= {("installed", 1)}
        assert all(e["target"] == f"device:{DEVICE}" for e in events if e["event"] == "installed")

        # 5. a challenger on more data meets the champion on the same held-out rows (both kinds scored)
        second = run_training(fleet, cfg, Target("device", DEVICE), publish=False)
        champ = second.champion_metrics
        assert champ and math.isfinite(champ["forecast_mase"]) and champ["clean_anomaly_rate"] is not None
        assert champ["n_holdout"] == second.record.metrics["n_holdout"]
        assert second.comparison["champion_version"] == 1
        assert Registry(fleet).champion(Target("device", DEVICE)).version == (2 if second.promoted else 1)
    finally:
        device.stop()
        stop.set()
        collecting.join(10)
    assert device.daemon.component_errors == 0

    # 6. everything the fleet stored is exactly what the device sampled
    dev_store = AgentStore(tmp_path / "device" / "agent.db")
    try:
        device_rows = dict(dev_store.samples())
    finally:
        dev_store.close()
    fleet_rows = fleet.samples(DEVICE)
    assert fleet_rows and all(device_rows[ts] == values for ts, values in fleet_rows)
    assert collector.stats.bad == {}
    fleet.close()
