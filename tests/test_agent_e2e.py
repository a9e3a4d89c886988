"""The whole agent loop with a fake machine, a real SQLite file and a real mosquitto."""
import json
import sqlite3
import threading

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
    # Acknowledged messages were deleted; what is left is the last partial telemetry batch, queued at
    # shutdown for the next start (nothing is lost, nothing else waits).
    assert {k for (k,) in db.execute("SELECT kind FROM outbox")} <= {"telemetry"}
    assert db.execute("SELECT count(*) FROM outbox WHERE kind = 'anomaly'").fetchone()[0] == 0
    sink.close()
