"""The whole agent loop with a fake machine, a real SQLite file and a real mosquitto."""
import json
import sqlite3
import threading

import pytest

from agent import config
from agent.daemon import Daemon, build_components
from agent.sampling import SystemClock
from tests.conftest import MqttSink
from tests.fakes import replace


class ScriptedSource:
    """A calm machine whose CPU jumps to 99 % for a stretch of samples."""

    def __init__(self, spike_from: int, spike_len: int):
        import random

        from tests.fakes import FakeClock, FakeSource

        self._base = FakeSource(FakeClock())
        self._rng = random.Random(3)
        self.calls = 0
        self.spike = range(spike_from, spike_from + spike_len)

    def read(self):
        self.calls += 1
        r = self._base.read()
        cpu = 99.0 if self.calls in self.spike else 10.0 + self._rng.gauss(0, 1.0)
        return replace(r, cpu_percent=cpu, memory_percent=40.0 + self._rng.gauss(0, 0.3),
                       load=(0.5 + self._rng.gauss(0, 0.02), 0.4, 0.3))


def test_spike_becomes_one_critical_episode_on_the_broker(tmp_path, mqtt_broker):
    cfg = config.parse({
        "agent": {"device_id": "e2e-1", "state_dir": str(tmp_path / "state"), "interval_s": 0.02},
        "store": {"commit_interval_s": 0.2},
        "mqtt": {"host": mqtt_broker.host, "port": mqtt_broker.port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
    }, {})
    sink = MqttSink(mqtt_broker.host, mqtt_broker.port, ["devices/e2e-1/#"])
    source = ScriptedSource(spike_from=400, spike_len=15)
    daemon = Daemon(cfg, source=source, clock=SystemClock())
    daemon.components = build_components(cfg, daemon)
    for c in daemon.components:
        if c.name == "detection":
            c.schedule = type(c.schedule)(bootstrap=False)  # z-score only: no training subprocess in this test
    done = threading.Event()

    def stopper():
        while source.calls < 560 and not done.wait(0.05):
            pass
        daemon.request_stop()

    threading.Thread(target=stopper, daemon=True).start()
    try:
        assert daemon.run() == 0
    finally:
        done.set()
    assert sink.wait_for(lambda msgs: any(m.topic.endswith("/anomalies") and m.json()["endedAt"] for m in msgs), 10)
    anomalies = [m.json() for m in sink.messages() if m.topic == "devices/e2e-1/anomalies"]
    episode_ids = {a["id"] for a in anomalies}
    assert len(episode_ids) == 1, anomalies  # one episode for the spike, no false alarms around it
    closing = [a for a in anomalies if a["endedAt"]][-1]
    assert closing["severity"] == "critical"
    assert closing["metric"].startswith("system.cpuUsage") and closing["deviceId"] == "e2e-1"
    assert closing["messageId"] != anomalies[0]["messageId"]
    db = sqlite3.connect(tmp_path / "state" / "agent.db")
    row = db.execute("SELECT severity, state, doc FROM events").fetchall()
    assert len(row) == 1 and row[0][0] == "critical" and row[0][1] == "closed"
    assert json.loads(row[0][2])["explanation"][0]["expected_high"] < 99.0
    # Acknowledged messages were deleted; what is left is what the stopping components queued after the
    # broker connection closed (the last partial telemetry batch, the final forecasts) for the next start:
    # nothing is lost, nothing else waits.
    assert {k for (k,) in db.execute("SELECT kind FROM outbox")} <= {"telemetry", "forecast"}
    assert db.execute("SELECT count(*) FROM outbox WHERE kind = 'anomaly'").fetchone()[0] == 0
    sink.close()


def test_detect_config_reaches_detector_schedule_and_trainer(tmp_path):
    """[detect] keys (file and environment) reach the daemon's detector, its training schedule and the
    `edge-agent train --kind forest` command."""
    from agent import training
    from agent.store import Store
    from agent.sampling import Sample

    cfg = config.parse({
        "agent": {"device_id": "cfg-1", "state_dir": str(tmp_path / "state")},
        "mqtt": {"enabled": False},
        "detect": {"z_warning": 5.0, "z_critical": 9.0, "open_after": 7, "close_after": 2, "zscore_window": 600,
                   "features": ["system.cpuUsage", "system.memoryPercent"], "forest_train_after": 120,
                   "forest_retrain_every_s": 3600.0, "forest_n_estimators": 7, "explain_top_k": 2},
    }, {"EDGE_AGENT_DETECT_ZSCORE_WARMUP": "44"})
    daemon = Daemon(cfg, clock=SystemClock())
    (det,) = [c for c in build_components(cfg, daemon) if c.name == "detection"]
    p = det.detector.params
    assert (p.severity.z_warning, p.severity.z_critical, p.severity.explain_top_k) == (5.0, 9.0, 2)
    assert (p.episodes.open_after, p.episodes.close_after) == (7, 2)
    assert (p.zscore.window, p.zscore.warmup) == (600, 44)
    assert det.detector.z_names[:2] == ("system.cpuUsage", "system.memoryPercent")
    assert (det.schedule.min_samples, det.schedule.retrain_interval_s) == (120, 3600.0)
    from agent.detection import detect_params
    from models.detect import DetectParams

    assert detect_params(config.parse({}, {}).detect) == DetectParams()  # defaults agree (replay, NAB, daemon)
    with pytest.raises(config.ConfigError, match="z_warning"):
        config.parse({"detect": {"z_warning": 7.0, "z_critical": 6.0}}, {})

    # the trainer: too few samples for forest_train_after=120, then enough; the forest has 7 trees
    store = Store(cfg.db_path)
    for i in range(100):
        store.add_sample(Sample(1000.0 + i, {"system.cpuUsage": 10.0 + (i % 7), "system.memoryPercent": 40.0 + (i % 3),
                                         "system.load1": 0.5}))
    store.flush()
    with pytest.raises(training.TrainingError, match="not enough"):
        training.train_forest(cfg, now_s=1200.0)
    for i in range(100, 130):
        store.add_sample(Sample(1000.0 + i, {"system.cpuUsage": 10.0 + (i % 7), "system.memoryPercent": 40.0 + (i % 3),
                                         "system.load1": 0.5}))
    store.flush()
    store.close()
    result = training.train_forest(cfg, now_s=1200.0)
    assert result["features"] == ["system.cpuUsage", "system.memoryPercent"]  # load1 is not in [detect] features
    from agent.updates import current_model_dir

    meta = json.loads((current_model_dir(cfg.agent.state_dir, "forest") / "model.json").read_text())
    assert meta["n_estimators"] == 7 and meta["params"]["min_samples"] == 120


class NoisyHost:
    """A busy, drifting machine with nothing wrong: CPU bursts, memory creeping up, a load cycle,
    heavy-tailed network and disk traffic."""

    def __init__(self, seed: int):
        import numpy as np

        from tests.fakes import FakeClock, FakeSource

        self._base = FakeSource(FakeClock())
        self._rng = np.random.default_rng(seed)
        self.calls = 0
        self._net = self._disk = 0.0

    def read(self):
        import math

        self.calls += 1
        t, rng = self.calls, self._rng
        self._net += float(rng.lognormal(4, 1.5))
        self._disk += float(0.0 if rng.random() < 0.6 else rng.lognormal(7, 2))
        cpu = min(100.0, float(rng.gamma(2, 4)) + (30.0 * float(rng.random()) if rng.random() < 0.05 else 0.0))
        return replace(self._base.read(), cpu_percent=cpu,
                       memory_percent=40.0 + 0.002 * t + float(rng.normal(0, 0.2)),
                       load=(0.5 + 0.3 * math.sin(t / 60) + abs(float(rng.normal(0, 0.1))), 0.4, 0.3),
                       net_recv_bytes=1e6 + self._net, disk_write_bytes=5e6 + self._disk)


def test_bootstrap_forest_on_a_noisy_host_passes_its_own_health_check(tmp_path):
    """The real daemon trains its first forest in a subprocess on 100 samples of a noisy host; the
    forest runs its 300-sample trial and is confirmed, not rolled back."""
    import time

    from agent.detection import TrainingSchedule
    from agent.updates import read_pointer

    toml = tmp_path / "agent.toml"
    toml.write_text(f'''
[agent]
device_id = "noisy-1"
state_dir = "{tmp_path / 'state'}"
interval_s = 0.02
[store]
commit_interval_s = 0.2
[mqtt]
enabled = false
[models]
health_samples = 300
poll_interval_s = 0.1
[detect]
forest_train_after = 100
''')
    cfg = config.load(str(toml), {})
    source = NoisyHost(seed=7)
    daemon = Daemon(cfg, source=source, clock=SystemClock())
    daemon.components = build_components(cfg, daemon)
    (det,) = [c for c in daemon.components if c.name == "detection"]
    det.schedule = TrainingSchedule(min_samples=100, wait_s=0.5)
    outcome: dict = {}
    done = threading.Event()

    def watcher():
        deadline = time.monotonic() + 50
        while time.monotonic() < deadline and not done.wait(0.1):
            ptr = read_pointer(cfg.agent.state_dir, "forest")
            if ptr and ptr.get("state") == "confirmed":
                break
            outcome["seen"] = outcome.get("seen") or ptr is not None
            if det.trainings["failed"] or (outcome["seen"] and ptr is None):  # training failed / rolled back
                break
        daemon.request_stop()

    threading.Thread(target=watcher, daemon=True).start()
    try:
        assert daemon.run() == 0
    finally:
        done.set()
    assert det.trainings["succeeded"] >= 1, det.trainings
    db = sqlite3.connect(tmp_path / "state" / "agent.db")
    rejected = db.execute("SELECT version, reason FROM model_rejected WHERE kind = 'forest'").fetchall()
    ptr = read_pointer(cfg.agent.state_dir, "forest")
    assert rejected == [] and ptr is not None and ptr.get("state") == "confirmed", (ptr, rejected)
    assert ptr["anomaly_rate"] < 0.05
    assert det.detector.forest is not None and det.detector.forest.version == ptr["version"]
