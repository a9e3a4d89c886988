"""The MQTT reporter against a real Mosquitto: delivery, outages, restarts, TLS, last will."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from agent import payloads
from agent.outbox import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL
from agent.store import connect
from agent.transport import Backoff, MqttParams, MqttReporter, params_from_sections
from conftest import Mosquitto

HELPER = Path(__file__).parent / "helpers" / "mqtt_publisher.py"
TS = 1_700_000_000.0


def make_reporter(db: Path, broker: Mosquitto, *, device_id: str = "dev-1", port: int | None = None,
                  groups: tuple[str, ...] = (), **overrides: Any) -> MqttReporter:
    settings: dict[str, Any] = {"keepalive_s": 2, "reconnect_min_s": 0.05, "reconnect_max_s": 0.3}
    params = MqttParams(host=broker.host, port=port or broker.port, **{**settings, **overrides})
    rep = MqttReporter(params, device_id=device_id, groups=groups, conn=connect(db),
                       rng=random.Random(7))
    rep.start()
    return rep


def run_until(rep: MqttReporter, predicate: Callable[[], Any], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rep.tick(time.monotonic())
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def test_backoff_grows_exponentially_with_jitter_and_resets() -> None:
    b = Backoff(1.0, 30.0, random.Random(5))
    delays = [b.next_delay() for _ in range(8)]
    ceilings = [1, 2, 4, 8, 16, 30, 30, 30]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings)), delays
    assert len({round(d, 6) for d in delays[5:]}) == 3  # jittered, not lockstep at the cap
    b.reset()
    assert 0.5 <= b.next_delay() <= 1.0


def sample_messages(device_id: str) -> list[tuple[str, dict, int]]:
    """One real message of each kind, as the agent's components would emit them."""
    metrics = {"system.cpuUsage": 23.5, "system.memoryUsed": 612_000_000.0,
               "system.memoryTotal": 3_900_000_000.0, "system.diskUsed": 9_100_000_000.0,
               "system.diskTotal": 31_000_000_000.0, "system.uptime": 86_400.0,
               "network.bytesReceived": 123_456_789.0, "network.bytesSent": 98_765_432.0,
               "system.load1": 0.42}
    return [
        ("twin", payloads.twin_reported(
            device_id, TS, metrics, health={"status": "healthy", "detectors": "ok"},
            models=[{"kind": "forest", "version": 4}, {"kind": "forecaster", "version": 2}],
            agent_version="0.1.0"), PRIORITY_LOW),
        ("telemetry", payloads.telemetry_batch(
            device_id, TS, [(TS - 5, {"system.cpuUsage": 21.0, "system.memoryPercent": 15.7}),
                            (TS, {"system.cpuUsage": 23.5, "system.memoryPercent": 15.7,
                                  "network.bytesSentPerSec": 1830.2})], interval_s=5.0), PRIORITY_LOW),
        ("anomaly", payloads.anomaly_event(
            device_id, TS, event_id="ep-1700000000-cpu", severity="warning", metrics=["system.cpuUsage"],
            value=91.2, expected_low=3.0, expected_high=55.0, deviation=3.7, detector="zscore",
            model_version=4, started_ts_s=TS - 15, score=0.81,
            explanation="system.cpuUsage 91.2 is 3.7 sd above its rolling mean"), PRIORITY_HIGH),
        ("forecast", payloads.forecast(
            device_id, TS, metric="system.diskPercent", origin_ts_s=TS, step_s=300,
            values=[29.4, 29.6, 29.9], intervals={"80": ([29.1, 29.2, 29.4], [29.7, 30.0, 30.4]),
                                                  "95": ([28.9, 29.0, 29.1], [29.9, 30.3, 30.7])},
            model="lstm-tflite", model_version=2, eta_threshold=90.0, eta_ts_s=TS + 30 * 86400),
         PRIORITY_NORMAL),
        ("model", payloads.model_event(device_id, TS, event="installed", model_kind="forest",
                                       version=4, previous_version=3, target="group:lab",
                                       reason="signature ok, health check passed"), PRIORITY_NORMAL),
    ]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_each_payload_type_reaches_a_subscriber(tmp_path, mqtt_broker, mqtt_sink, protocol) -> None:
    sink = mqtt_sink(mqtt_broker, ["devices/#"], protocol=protocol)
    rep = make_reporter(tmp_path / "agent.db", mqtt_broker, protocol=protocol)
    sent = sample_messages("dev-1")
    ids = [rep.enqueue(kind, doc, prio) for kind, doc, prio in sent]
    assert ids == [doc["messageId"] for _, doc, _ in sent]
    assert run_until(rep, lambda: rep.connected and rep.outbox.depth == 0)
    topics = {"twin": "devices/dev-1/twin/reported", "telemetry": "devices/dev-1/telemetry",
              "anomaly": "devices/dev-1/anomalies", "forecast": "devices/dev-1/forecasts",
              "model": "devices/dev-1/model-events"}
    for kind, doc, _ in sent:
        got = sink.wait_count(topics[kind], 1)
        assert [m.json() for m in got] == [doc], kind
        if protocol == "3.1.1":
            print(f"--- {kind} on {topics[kind]}\n{json.dumps(got[0].json(), indent=2)}")
    assert sink.wait_count("devices/dev-1/status", 1)[0].payload == b"online"
    # Twin and status are retained: a late subscriber still gets the latest.
    late = mqtt_sink(mqtt_broker, ["devices/dev-1/twin/reported", "devices/dev-1/status"])
    assert late.wait_for(lambda ms: len(ms) == 2)
    assert all(m.retain for m in late.messages())
    assert late.messages("devices/dev-1/twin/reported")[0].json() == sent[0][1]
    st = rep.status()
    assert st["mqtt"]["acked"] == 5 and st["outbox"]["depth"] == 0 and st["mqtt"]["protocol"] == protocol
    rep.stop()
    assert sink.wait_for(lambda ms: ms[-1].topic == "devices/dev-1/status" and ms[-1].payload == b"offline")


def test_origin_preset_sends_the_twin_to_the_named_shadow(tmp_path, mqtt_broker, mqtt_sink) -> None:
    shadow = "$iot/device/dev-9/shadow/name/device-state/update"
    sink = mqtt_sink(mqtt_broker, [shadow])
    rep = make_reporter(tmp_path / "agent.db", mqtt_broker, device_id="dev-9", preset="origin")
    doc = payloads.twin_reported("dev-9", TS, {"system.cpuUsage": 5.0}, health={"status": "healthy"},
                                 models=[], agent_version="0.1.0")
    rep.enqueue("twin", doc, 0)
    assert run_until(rep, lambda: rep.outbox.depth == 0)
    got = sink.wait_count(shadow, 1)
    assert got[0].json()["state"]["reported"]["system.cpuUsage"] == 5.0
    rep.stop()


def test_broker_outage_loses_nothing(tmp_path, mqtt_broker, mqtt_sink) -> None:
    sink = mqtt_sink(mqtt_broker, ["devices/dev-1/telemetry", "devices/dev-1/anomalies"])
    rep = make_reporter(tmp_path / "agent.db", mqtt_broker)
    assert run_until(rep, lambda: rep.connected)
    seq = 0

    def produce(n: int) -> None:
        nonlocal seq
        for _ in range(n):
            kind = "anomaly" if seq % 10 == 0 else "telemetry"
            rep.enqueue(kind, {"seq": seq}, PRIORITY_HIGH if kind == "anomaly" else PRIORITY_LOW)
            seq += 1
            rep.tick(time.monotonic())
            time.sleep(0.02)

    produce(20)
    mqtt_broker.stop()
    produce(60)  # about 2 s without a broker
    assert not rep.connected and rep.outbox.depth > 0
    assert rep.status()["mqtt"]["disconnects"] == 1
    mqtt_broker.start()
    produce(20)
    assert run_until(rep, lambda: rep.connected and rep.outbox.depth == 0, 15)
    received = lambda: {m.json()["seq"] for m in sink.messages()}  # noqa: E731
    assert sink.wait_for(lambda _: received() == set(range(seq)), 15), sorted(set(range(seq)) - received())
    ids = [m.json()["messageId"] for m in sink.messages()]
    assert len(set(ids)) == seq  # duplicates (at least once) collapse to exactly one per event
    assert rep.status()["mqtt"]["connects"] == 2
    assert rep.session_present  # clean session false: the broker kept our session
    # What queued up during the outage drains by priority: its anomalies go out first.
    outage = [m.json() for m in sink.messages() if 20 <= m.json()["seq"] < 80]
    kinds = ["a" if m.topic.endswith("anomalies") else "t" for m in sink.messages()
             if 20 <= m.json()["seq"] < 80]
    assert kinds[:6] == ["a"] * 6 and "a" not in kinds[6:], outage
    rep.stop()


def test_in_flight_messages_survive_a_dropped_connection_without_duplicates(tmp_path, mqtt_broker,
                                                                           mqtt_sink) -> None:
    sink = mqtt_sink(mqtt_broker, ["devices/dev-1/telemetry"])
    rep = make_reporter(tmp_path / "agent.db", mqtt_broker, keepalive_s=1, ack_timeout_s=60)
    assert run_until(rep, lambda: rep.connected)
    mqtt_broker.pause()  # publishes reach the socket, no PUBACK comes back
    try:
        for i in range(8):
            rep.enqueue("telemetry", {"seq": i}, 0)
        rep.tick(time.monotonic())
        assert rep.status()["mqtt"]["inflight"] == 8
        assert run_until(rep, lambda: not rep.connected, 6)  # keepalive expires
        assert rep.status()["mqtt"]["inflight"] == 8
    finally:
        mqtt_broker.resume()
    assert run_until(rep, lambda: rep.connected and rep.outbox.depth == 0)
    assert sink.wait_for(lambda ms: {m.json()["seq"] for m in ms} == set(range(8)))
    # paho re-sent them under their original mids after reconnecting: no second publish.
    assert rep.status()["mqtt"]["requeued"] == 0 and rep.status()["mqtt"]["acked"] == 8
    rep.stop()


def test_unacknowledged_messages_are_requeued_after_the_ack_timeout(tmp_path, mqtt_broker, mqtt_sink) -> None:
    sink = mqtt_sink(mqtt_broker, ["devices/dev-1/telemetry"])
    rep = make_reporter(tmp_path / "agent.db", mqtt_broker, keepalive_s=10, ack_timeout_s=0.3)
    assert run_until(rep, lambda: rep.connected)
    mqtt_broker.pause()
    try:
        ids = [rep.enqueue("telemetry", {"seq": i}, 0) for i in range(5)]
        assert run_until(rep, lambda: rep.status()["mqtt"]["requeued"] >= 5, 3)
        assert rep.connected and rep.outbox.depth == 5
    finally:
        mqtt_broker.resume()
    assert run_until(rep, lambda: rep.outbox.depth == 0)
    assert sink.wait_for(lambda ms: {m.json()["messageId"] for m in ms} == set(ids))
    rep.stop()


def _spawn(db: Path, broker: Mosquitto, count: int, device_id: str = "dev-proc",
           run: str = "r1", *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HELPER), "--db", str(db), "--port", str(broker.port), "--count", str(count),
         "--device-id", device_id, "--run", run, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=Path(__file__).parent.parent)


def _read_until(proc: subprocess.Popen, predicate: Callable[[str], bool], timeout_s: float = 20.0) -> str:
    """Lines from the helper until one matches (a reader thread keeps this from hanging)."""
    found: list[str] = []
    done = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if predicate(line):
                found.append(line)
                done.set()
                return
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    done.wait(timeout_s)
    assert found, "helper did not report in time"
    return found[0]


def test_kill_9_with_messages_in_the_outbox_then_restart_delivers_all(tmp_path, mqtt_broker, mqtt_sink) -> None:
    db = tmp_path / "agent.db"
    sink = mqtt_sink(mqtt_broker, ["devices/dev-proc/telemetry"])
    # 1: broker down, the publisher queues 300 messages and is killed.
    mqtt_broker.stop()
    proc = _spawn(db, mqtt_broker, 300, run="a")
    _read_until(proc, lambda line: line.startswith("ENQUEUED"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # 2: broker up, the publisher queues 700 more and is killed while draining
    #    (a small window and no drain budget slow it to a few messages per tick).
    mqtt_broker.start()
    proc = _spawn(db, mqtt_broker, 700, "dev-proc", "b", "--max-inflight", "5", "--drain-budget-s", "0")
    _read_until(proc, lambda line: line.startswith("STATUS") and line.split()[2] == "1"
                and 0 < int(line.split()[1]) < 1000)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sqlite3.connect(db).execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    assert left > 0, "nothing was left in the outbox at kill time; the test proves nothing"
    assert sink.wait_for(lambda ms: len(ms) > 0), "nothing was delivered before the kill"
    # 3: restart with nothing new; everything arrives.
    proc = _spawn(db, mqtt_broker, 0, run="c")
    _read_until(proc, lambda line: line.startswith("STATUS") and line.split()[1] == "0")
    expected = {("a", i) for i in range(300)} | {("b", i) for i in range(700)}
    got = lambda: {(d["run"], d["seq"]) for d in sink.json_messages()}  # noqa: E731
    assert sink.wait_for(lambda _: got() == expected, 15), len(expected - got())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_last_will_offline_when_the_process_is_killed(tmp_path, mqtt_broker, mqtt_sink) -> None:
    status = "devices/dev-will/status"
    sink = mqtt_sink(mqtt_broker, [status])
    proc = _spawn(tmp_path / "agent.db", mqtt_broker, 0, device_id="dev-will")
    try:
        assert sink.wait_for(lambda ms: [m.payload for m in ms] == [b"online"])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert sink.wait_for(lambda ms: [m.payload for m in ms] == [b"online", b"offline"])
    retained = mqtt_sink(mqtt_broker, [status])
    assert retained.wait_for(lambda ms: [(m.payload, m.retain) for m in ms] == [(b"offline", True)])


def test_tls_server_authentication(tmp_path, mqtt_broker_tls, mqtt_sink) -> None:
    b = mqtt_broker_tls
    sink = mqtt_sink(b, ["devices/dev-1/anomalies"], tls_ca=b.ca_cert)
    rep = make_reporter(tmp_path / "agent.db", b, tls_ca=b.ca_cert)
    mid = rep.enqueue("anomaly", {"x": 1}, PRIORITY_HIGH)
    assert run_until(rep, lambda: rep.connected and rep.outbox.depth == 0)
    assert sink.wait_count("devices/dev-1/anomalies", 1)[0].json()["messageId"] == mid
    assert rep.status()["mqtt"]["tls"] is True
    rep.stop()


def test_mutual_tls(tmp_path, mqtt_broker_tls) -> None:
    b = mqtt_broker_tls
    rep = make_reporter(tmp_path / "a.db", b, port=b.mtls_port, tls_ca=b.ca_cert,
                        tls_cert=b.client_cert, tls_key=b.client_key)
    rep.enqueue("telemetry", {"x": 1}, 0)
    assert run_until(rep, lambda: rep.connected and rep.outbox.depth == 0)
    rep.stop()
    # Without a client certificate the mutual-TLS listener turns us away.
    anon = make_reporter(tmp_path / "b.db", b, port=b.mtls_port, tls_ca=b.ca_cert)
    assert run_until(anon, lambda: anon.status()["mqtt"]["connect_failures"] >= 2)
    assert anon.status()["mqtt"]["connects"] == 0 and not anon.connected
    assert "CERTIFICATE_REQUIRED" in anon.status()["mqtt"]["last_error"]
    anon.stop()


def test_refuses_a_broker_not_signed_by_the_configured_ca(tmp_path, mqtt_broker_tls) -> None:
    b = mqtt_broker_tls
    rep = make_reporter(tmp_path / "agent.db", b, tls_ca=b.other_ca_cert)
    rep.enqueue("anomaly", {"x": 1}, PRIORITY_HIGH)
    assert run_until(rep, lambda: rep.status()["mqtt"]["connect_failures"] >= 2)
    st = rep.status()
    assert st["mqtt"]["connects"] == 0 and not st["mqtt"]["connected"]
    assert "CERTIFICATE_VERIFY_FAILED" in st["mqtt"]["last_error"]
    assert st["outbox"]["depth"] == 1 and st["mqtt"]["acked"] == 0
    rep.stop()


def test_missing_tls_files_do_not_crash_the_component(tmp_path, mqtt_broker) -> None:
    rep = make_reporter(tmp_path / "agent.db", mqtt_broker, tls_ca=str(tmp_path / "nope.pem"))
    assert rep.enqueue("telemetry", {"x": 1}, 0)
    rep.tick(time.monotonic())
    st = rep.status()
    assert st["mqtt"]["connected"] is False and "nope.pem" in st["mqtt"]["last_error"]
    assert st["outbox"]["depth"] == 1
    rep.stop()


def test_username_and_password(tmp_path, mosquitto_factory) -> None:
    broker = mosquitto_factory(users={"dev-1": "s3cret"})
    good = make_reporter(tmp_path / "a.db", broker, username="dev-1", password="s3cret")
    good.enqueue("telemetry", {"x": 1}, 0)
    assert run_until(good, lambda: good.connected and good.outbox.depth == 0)
    good.stop()
    bad = make_reporter(tmp_path / "b.db", broker, username="dev-1", password="wrong")
    assert run_until(bad, lambda: bad.status()["mqtt"]["connect_failures"] >= 2)
    assert bad.status()["mqtt"]["connects"] == 0
    assert bad.status()["mqtt"]["last_error"] in ("Not authorized", "Bad user name or password")
    bad.stop()


def test_model_topics_are_routed_to_the_handler_on_the_main_thread(tmp_path, mqtt_broker, mqtt_sink) -> None:
    calls: list[tuple[str, bytes, bool]] = []

    def handler(topic: str, payload: bytes) -> None:
        calls.append((topic, payload, threading.current_thread() is threading.main_thread()))

    sink = mqtt_sink(mqtt_broker, ["unused/#"])
    # Retained bundles published before the device connects are delivered on subscribe.
    sink.publish("fleet/all/models", b"bundle-all", retain=True)
    sink.publish("fleet/other/models", b"not-ours", retain=True)
    rep = make_reporter(tmp_path / "agent.db", mqtt_broker, groups=("lab",))
    rep.model_handler = handler
    assert run_until(rep, lambda: len(calls) == 1)
    sink.publish("devices/dev-1/models", b"bundle-device", retain=True)
    sink.publish("fleet/lab/models", b"bundle-lab", retain=True)
    assert run_until(rep, lambda: len(calls) == 3)
    assert sorted(calls) == [("devices/dev-1/models", b"bundle-device", True),
                             ("fleet/all/models", b"bundle-all", True),
                             ("fleet/lab/models", b"bundle-lab", True)]
    # After a reconnect the broker re-sends the retained bundles; unchanged ones are not re-handled,
    # a changed one is.
    mqtt_broker.restart()
    assert run_until(rep, lambda: rep.status()["mqtt"]["inbound"] >= 6)
    assert len(calls) == 3
    sink.publish("fleet/all/models", b"bundle-all-v2", retain=True)
    assert run_until(rep, lambda: len(calls) == 4)
    assert calls[-1] == ("fleet/all/models", b"bundle-all-v2", True)
    rep.stop()


def test_stop_and_ticks_are_quick_without_a_broker(tmp_path, mqtt_broker) -> None:
    mqtt_broker.stop()
    rep = make_reporter(tmp_path / "agent.db", mqtt_broker)
    for i in range(20):
        rep.enqueue("telemetry", {"seq": i}, 0)
        rep.tick(time.monotonic())
    assert rep.status()["outbox"]["depth"] == 20 and not rep.connected
    rep.stop()
    assert os.path.exists(tmp_path / "agent.db")


def test_plugs_into_the_daemon_context(tmp_path, mqtt_broker, mqtt_sink) -> None:
    from agent.config import AgentConfig
    from agent.daemon import Context, Daemon
    from agent.store import Store

    class FakeClock:
        def time(self) -> float:
            return TS

        def monotonic(self) -> float:
            return time.monotonic()

    params = MqttParams(host=mqtt_broker.host, port=mqtt_broker.port, keepalive_s=2,
                        reconnect_min_s=0.05, reconnect_max_s=0.3)
    rep = MqttReporter(params, device_id="dev-d")
    daemon = Daemon(AgentConfig(), components=[rep])
    store = Store(tmp_path / "agent.db")
    ctx = Context(config=daemon.config, store=store, clock=FakeClock(), emit=daemon.emit, daemon=daemon)
    rep.start(ctx)
    sink = mqtt_sink(mqtt_broker, ["devices/dev-d/#"])
    daemon.emit("anomaly", {"id": "ep-1"}, PRIORITY_HIGH)  # ctx.emit reaches the outbox
    assert run_until(rep, lambda: rep.connected)  # subscribed: commands are not retained
    sink.publish("devices/dev-d/commands", json.dumps({"id": "q1", "command": "set-interval",
                                                        "args": {"interval_s": 2}}))
    sink.publish("devices/dev-d/commands", json.dumps({"id": "q2", "command": "status"}))
    assert run_until(rep, lambda: len(sink.messages("devices/dev-d/commands/response")) == 2)
    assert daemon.interval_s == 2.0
    replies = {m.json()["id"]: m.json() for m in sink.messages("devices/dev-d/commands/response")}
    assert replies["q2"]["result"]["interval_s"] == 2.0           # the daemon's runtime status ...
    assert replies["q2"]["result"]["mqtt"]["connected"] is True   # ... merging our own status
    anomaly = sink.wait_count("devices/dev-d/anomalies", 1)[0].json()
    assert anomaly["id"] == "ep-1" and anomaly["deviceId"] == "dev-d"
    assert anomaly["timestamp"] == payloads.iso_utc(TS)  # the injected wall clock
    rep.stop()
    store.close()
    row = sqlite3.connect(tmp_path / "agent.db").execute(
        "SELECT version FROM schema_versions WHERE component = 'outbox'").fetchone()
    assert row == (1,)


def test_params_from_the_agent_config_sections() -> None:
    from agent.config import AgentConfig

    cfg = AgentConfig()
    mqtt, outbox, commands = params_from_sections(cfg.mqtt, getattr(cfg, "outbox", None))
    assert (mqtt.host, mqtt.port, mqtt.topic_prefix, mqtt.preset, mqtt.protocol) == (
        cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.topic_prefix, cfg.mqtt.preset, cfg.mqtt.protocol)
    assert mqtt.keepalive_s == cfg.mqtt.keepalive_s and not mqtt.tls
    assert outbox.max_rows > 0 and commands.max_payload_bytes > 0
