"""The collector against a real Mosquitto, fed by the agent's real MQTT publisher.

Devices are ``agent.transport.MqttReporter`` instances with their own SQLite
outbox, sending the agent's real payloads; the collector runs in a thread on its
own SQLite store and the test reads through a second connection. Also: the
message parser on bad input, the persistent session (messages sent while the
collector is down arrive when it comes back), and ``alerts`` listing/following.
"""
from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from agent import payloads
from agent.outbox import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL
from agent.store import connect
from agent.transport import MqttParams, MqttReporter
from fleet import alerts
from fleet.collect import BadMessage, Collector, parse_message, routes
from fleet.config import config_from_dict
from fleet.store import open_store
from tests.conftest import wait_until
from tests.fleet_helpers import Running, fleet_main

pytestmark = pytest.mark.timeout(90)
TS = 1_700_000_000.0
ROUTES = routes()


def make_device(tmp: Path, broker: Any, device_id: str) -> MqttReporter:
    params = MqttParams(host=broker.host, port=broker.port, keepalive_s=2, reconnect_min_s=0.05,
                        reconnect_max_s=0.3)
    rep = MqttReporter(params, device_id=device_id, conn=connect(tmp / f"{device_id}.db"), rng=random.Random(1))
    rep.start()
    return rep


def drive(devices: list[MqttReporter], predicate: Callable[[], Any], timeout_s: float = 15.0) -> bool:
    def step() -> Any:
        for d in devices:
            d.tick(time.monotonic())
        return predicate()
    return wait_until(step, timeout_s, 0.01)


@pytest.fixture
def config(tmp_path: Path, mqtt_broker: Any) -> Any:
    return config_from_dict({"fleet": {"state_dir": str(tmp_path / "fleet")},
                             "mqtt": {"host": mqtt_broker.host, "port": mqtt_broker.port,
                                      "client_id": f"collector-{tmp_path.name}", "keepalive_s": 5},
                             "collect": {"flush_interval_s": 0.05, "max_message_bytes": 64 * 1024}}, {})


def batch(device: str, start: float, n: int, message_id: str | None = None) -> dict:
    rows = [(start + i, {"system.cpuUsage": 10.0 + i % 5, "system.memoryPercent": 40.0}) for i in range(n)]
    return payloads.telemetry_batch(device, start + n, rows, interval_s=1.0, message_id=message_id)


def episode(device: str, event_id: str, severity: str, ended: bool = False) -> dict:
    return payloads.anomaly_event(device, TS + 60, event_id=event_id, severity=severity,
                                  metrics=["system.cpuUsage"], value=97.0, expected_low=5.0, expected_high=40.0,
                                  deviation=5.2, detector="forest", model_version=3, started_ts_s=TS,
                                  ended_ts_s=TS + 90 if ended else None, explanation="cpu far above normal")


# -- parsing ---------------------------------------------------------------------------------------------
def test_routes_cover_every_device_topic_and_the_origin_twin_topic() -> None:
    subs = {r.kind: r.subscription for r in ROUTES if not r.subscription.startswith("$")}
    assert subs == {"telemetry": "devices/+/telemetry", "anomaly": "devices/+/anomalies",
                    "forecast": "devices/+/forecasts", "twin": "devices/+/twin/reported",
                    "model": "devices/+/model-events"}
    assert "$iot/device/+/shadow/name/device-state/update" in [r.subscription for r in ROUTES]
    custom = routes("site/{device_id}")
    assert "site/+/telemetry" in [r.subscription for r in custom]


@pytest.mark.parametrize("topic, payload, reason", [
    ("devices/pi-01/telemetry", b"\xff\xfe not json", "json"),
    ("devices/pi-01/telemetry", b"[1, 2]", "json"),
    ("devices/pi-01/telemetry", json.dumps({"deviceId": "pi-01", "columns": ["ts_s"], "rows": []}).encode(),
     "envelope"),
    ("devices/pi-01/telemetry", json.dumps({**batch("pi-02", TS, 2)}).encode(), "device_mismatch"),
    ("devices/pi-01/telemetry", json.dumps({**batch("pi-01", TS, 2), "rows": [[TS, 1.0]]}).encode(), "telemetry"),
    ("devices/pi-01/telemetry", json.dumps({**batch("pi-01", TS, 2), "rows": [["x", 1.0, 2.0]]}).encode(),
     "telemetry"),
    ("devices/pi-01/telemetry", json.dumps({**batch("pi-01", TS, 2), "kind": "anomaly"}).encode(), "envelope"),
    ("devices/pi-01/anomalies", json.dumps({**episode("pi-01", "e", "warning"), "severity": "meh"}).encode(),
     "anomaly"),
    ("devices/pi-01/twin/reported", json.dumps({"messageId": "m", "deviceId": "pi-01", "state": {}}).encode(),
     "twin"),
    ("devices/pi-01/unknown", b"{}", "topic"),
    ("devices/pi-01/telemetry", b"x" * 100, "too_large"),
])
def test_bad_messages_are_refused_with_a_reason(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(BadMessage) as info:
        parse_message(topic, payload, ROUTES, max_bytes=99 if reason == "too_large" else 1 << 20)
    assert info.value.reason == reason


def test_good_messages_parse_into_rows() -> None:
    msg = batch("pi-01", TS, 3)
    msg["rows"][1][1] = None                               # a metric absent from one sample
    got = parse_message("devices/pi-01/telemetry", payloads.encode(msg), ROUTES)
    assert (got.kind, got.device_id, got.message_id) == ("telemetry", "pi-01", msg["messageId"])
    assert got.samples[1] == (TS + 1, {"system.memoryPercent": 40.0})
    twin = payloads.twin_reported("pi-01", TS, {"system.cpuUsage": 3.0}, health={}, models=[], agent_version="x")
    got = parse_message("$iot/device/pi-01/shadow/name/device-state/update", payloads.encode(twin), ROUTES)
    assert got.kind == "twin" and got.ts_s == TS


# -- with a broker ---------------------------------------------------------------------------------------
def test_collects_every_kind_dedupes_and_survives_bad_messages(tmp_path: Path, mqtt_broker: Any, mqtt_sink: Any,
                                                               config: Any) -> None:
    running = Running(config)
    reader = open_store(config.store_url)
    sink = mqtt_sink(mqtt_broker, ["devices/pi-01/telemetry"])
    devices = [make_device(tmp_path, mqtt_broker, "pi-01"), make_device(tmp_path, mqtt_broker, "pi-02")]
    try:
        a, b = devices
        a.enqueue("telemetry", batch("pi-01", TS, 30), PRIORITY_LOW)
        a.enqueue("telemetry", batch("pi-01", TS + 30, 30), PRIORITY_LOW)
        b.enqueue("telemetry", batch("pi-02", TS, 10), PRIORITY_LOW)
        a.enqueue("anomaly", episode("pi-01", "ep-1", "warning"), PRIORITY_HIGH)
        a.enqueue("anomaly", episode("pi-01", "ep-1", "critical", ended=True), PRIORITY_HIGH)
        b.enqueue("anomaly", episode("pi-02", "ep-7", "warning"), PRIORITY_HIGH)
        a.enqueue("forecast", payloads.forecast("pi-01", TS + 60, metric="system.cpuUsage", origin_ts_s=TS + 59,
                                                step_s=1.0, values=[11.0, 12.0],
                                                intervals={"80": ([9.0, 9.0], [13.0, 13.0])}, model="lstm"),
                  PRIORITY_NORMAL)
        a.enqueue("twin", payloads.twin_reported("pi-01", TS + 60, {"system.cpuUsage": 12.0}, health={"ok": 1},
                                                 models=[{"kind": "forest", "version": 3}], agent_version="0.1"),
                  PRIORITY_LOW)
        a.enqueue("model", payloads.model_event("pi-01", TS + 61, event="installed", model_kind="forest",
                                                version=3), PRIORITY_NORMAL)
        assert drive(devices, lambda: reader.message_count() == 9), reader.message_count()
        assert len(reader.samples("pi-01")) == 60 and len(reader.samples("pi-02")) == 10

        # at-least-once: the broker hands the collector the very same message again
        original = sink.wait_count("devices/pi-01/telemetry", 2)[0]
        sink.publish(original.topic, original.payload)
        # and bad messages: garbage, a spoofed device id, a malformed batch, one too large
        sink.publish("devices/pi-01/telemetry", b"garbage")
        sink.publish("devices/pi-01/telemetry", payloads.encode(batch("pi-02", TS + 100, 3)))
        sink.publish("devices/pi-01/anomalies", json.dumps({"messageId": "x1", "deviceId": "pi-01"}).encode())
        sink.publish("devices/pi-01/telemetry", payloads.encode(batch("pi-01", TS + 200, 4000)))
        # the collector keeps going: a good message after the bad ones is stored
        a.enqueue("telemetry", batch("pi-01", TS + 60, 5), PRIORITY_LOW)
        assert drive(devices, lambda: len(reader.samples("pi-01")) == 65)
        assert wait_until(lambda: sum(v for k, v in reader.counters().items() if k.startswith("bad.")) == 4)
        counters = reader.counters()
        assert {k: v for k, v in counters.items() if k.startswith("bad.")} == \
            {"bad.json": 1, "bad.device_mismatch": 1, "bad.anomaly": 1, "bad.too_large": 1}
        assert counters["duplicates"] == 1 and counters["stored"] == 10
        assert running.thread.is_alive()

        assert reader.twin("pi-01")["models"] == [{"kind": "forest", "version": 3}]
        assert [e["event"] for e in reader.model_events("pi-01")] == ["installed"]
        assert reader.forecasts("pi-01")[0]["values"] == [11.0, 12.0]
        episodes = reader.anomaly_episodes()
        assert sorted((e["deviceId"], e["id"], e["severity"]) for e in episodes) == \
            [("pi-01", "ep-1", "critical"), ("pi-02", "ep-7", "warning")]
        stats = running.collector.stats.as_dict()
        assert stats["duplicates"] == 1 and stats["bad_total"] == 4 and stats["samples"] == 75
    finally:
        for d in devices:
            d.stop()
        running.close()
        reader.close()


def test_messages_sent_while_the_collector_is_down_arrive_when_it_returns(tmp_path: Path, mqtt_broker: Any,
                                                                         config: Any) -> None:
    running = Running(config)
    running.close()                      # the broker now keeps a session for the collector's client id
    device = make_device(tmp_path, mqtt_broker, "pi-03")
    reader = open_store(config.store_url)
    try:
        for k in range(5):
            device.enqueue("telemetry", batch("pi-03", TS + 10 * k, 10), PRIORITY_LOW)
        assert drive([device], lambda: device.outbox.depth == 0)      # acknowledged by the broker
        assert reader.samples("pi-03") == []
        running = Running(config)
        assert wait_until(lambda: len(reader.samples("pi-03")) == 50, 10)
        running.close()
    finally:
        device.stop()
        reader.close()


def test_collect_command_runs_for_a_duration(tmp_path: Path, mqtt_broker: Any, config: Any, capsys: Any) -> None:
    conf = tmp_path / "fleet.toml"
    conf.write_text(f'[fleet]\nstate_dir = "{tmp_path / "cli"}"\n[mqtt]\nhost = "{mqtt_broker.host}"\n'
                    f'port = {mqtt_broker.port}\nclient_id = "cli-collector"\n')
    # a first short run creates the collector's persistent session (its subscriptions)
    assert fleet_main(["collect", "--config", str(conf), "--duration", "0.5"]) == 0
    capsys.readouterr()
    device = make_device(tmp_path, mqtt_broker, "pi-04")
    device.enqueue("telemetry", batch("pi-04", TS, 4), PRIORITY_LOW)
    assert drive([device], lambda: device.outbox.depth == 0)
    result: dict[str, int] = {}
    t = threading.Thread(target=lambda: result.update(rc=fleet_main(["collect", "--config", str(conf),
                                                                      "--duration", "3", "--json"])))
    t.start()
    drive([device], lambda: not t.is_alive(), timeout_s=20)
    t.join(5)
    device.stop()
    assert result["rc"] == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["stored"] == 1 and stats["samples"] == 4
    with open_store(f"sqlite:///{tmp_path / 'cli' / 'fleet.db'}") as s:
        assert len(s.samples("pi-04")) == 4


# -- alerts ----------------------------------------------------------------------------------------------
def test_alerts_list_filter_follow_and_label(tmp_path: Path, capsys: Any) -> None:
    from fleet.collect import parse_message as parse

    conf = tmp_path / "fleet.toml"
    conf.write_text(f'[fleet]\nstate_dir = "{tmp_path}"\n')
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    msgs = [episode("pi-01", "ep-1", "warning"), episode("pi-02", "ep-2", "critical"),
            episode("pi-01", "ep-1", "critical", ended=True)]
    store.ingest([parse(f"devices/{m['deviceId']}/anomalies", payloads.encode(m), ROUTES) for m in msgs[:2]])

    assert fleet_main(["alerts", "--config", str(conf)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and any("pi-02" in line and "critical" in line for line in out)
    assert "system.cpuUsage=97 (expected 5..40)" in out[0] and "[forest v3, open]" in out[0]
    assert fleet_main(["alerts", "--config", str(conf), "--severity", "critical", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [(d["deviceId"], d["id"]) for d in got] == [("pi-02", "ep-2")] and "receivedAt" in got[0]
    assert fleet_main(["alerts", "--config", str(conf), "--device", "pi-01", "--since", "2023-11-14T22:00:00Z"]) == 0
    assert "pi-01" in capsys.readouterr().out
    assert fleet_main(["alerts", "--config", str(conf), "--since", "1h"]) == 0   # TS is long ago
    assert capsys.readouterr().out.strip() == "no anomaly events"

    # follow: only messages stored after it started
    seen: list[dict] = []
    stop = threading.Event()
    reader = open_store(store.url)
    t = threading.Thread(target=alerts.follow, args=(reader, seen.append, stop), kwargs={"poll_s": 0.05})
    t.start()
    time.sleep(0.2)
    store.ingest([parse("devices/pi-01/anomalies", payloads.encode(msgs[2]), ROUTES)])
    assert wait_until(lambda: len(seen) == 1, 5)
    stop.set()
    t.join(5)
    reader.close()
    assert seen[0]["id"] == "ep-1" and seen[0]["endedAt"] and "closed" in alerts.format_alert(seen[0])

    # an operator confirms an episode: it becomes a labelled window for precision
    assert fleet_main(["alerts", "--config", str(conf), "--confirm", "ep-1"]) == 0
    assert store.labels("pi-01") == [(TS, TS + 90, "anomaly")]
    assert fleet_main(["alerts", "--config", str(conf), "--confirm", "nope"]) == 1
    assert fleet_main(["alerts", "--config", str(conf), "--label", "pi-02", str(TS), str(TS + 5)]) == 0
    assert store.labels("pi-02") == [(TS, TS + 5, "anomaly")]
    store.close()


def test_nothing_is_acknowledged_before_it_is_stored(tmp_path: Path, mqtt_broker: Any, config: Any) -> None:
    """A collector whose store is locked keeps messages unacknowledged; after it stops, the broker
    delivers them again to the next collector, which stores them: no loss across a store outage."""
    import sqlite3
    from fleet.config import config_from_dict as cfd

    locked_cfg = cfd({"fleet": {"state_dir": config.fleet.state_dir}, "store": {"busy_timeout_s": 0.1},
                      "mqtt": {"host": mqtt_broker.host, "port": mqtt_broker.port, "client_id": "locked-collector"},
                      "collect": {"flush_interval_s": 0.05}}, {})
    running = Running(locked_cfg)
    blocker = sqlite3.connect(open_store(locked_cfg.store_url).url.replace("sqlite:///", ""), isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")                  # another process holds the database
    device = make_device(tmp_path, mqtt_broker, "pi-05")
    try:
        for k in range(3):
            device.enqueue("telemetry", batch("pi-05", TS + 10 * k, 10), PRIORITY_LOW)
        assert drive([device], lambda: device.outbox.depth == 0)
        assert wait_until(lambda: running.collector.stats.store_errors >= 2, 10), running.collector.stats
        assert running.collector.stats.stored == 0
        running.close()                                 # gives up: the messages were never acknowledged
        blocker.execute("ROLLBACK")
        reader = open_store(locked_cfg.store_url)
        assert reader.samples("pi-05") == []
        running = Running(locked_cfg)                   # same client id: the broker redelivers
        assert wait_until(lambda: len(reader.samples("pi-05")) == 30, 10)
        running.close()
        reader.close()
    finally:
        blocker.close()
        device.stop()
