"""Zero loss at the collector and scale-out collectors, against a real Mosquitto.

The broker runs with the settings of the shipped fleet/mosquitto.example.conf
(queue and in-flight limits, session expiry), except where a test shows what
Mosquitto's defaults do. Devices are the fleet simulator's messages published
over MQTT (QoS 1); every check is the simulator's delivery report: the message
ids published against the message ids in the fleet store.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from fleet.collect import (Collector, bad_messages, broker_settings, resolve_client_id, routes,
                           subscription_filters)
from fleet.config import FleetConfigError, config_from_dict
from fleet.simulate import SimParams, delivery_report, publish_mqtt, simulate_fleet
from fleet.store import open_store
from tests.conftest import wait_until
from tests.fleet_helpers import Running

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parents[1]
BATCH = 24          # samples per telemetry message: two telemetry messages per simulated device


def small_fleet(devices: int, seed: int = 0) -> Any:
    """Two days at one sample an hour: two telemetry messages a device plus its anomaly events."""
    return simulate_fleet(SimParams(devices=devices, days=2, step_s=3600.0, seed=seed))


def collector_config(tmp_path: Path, broker: Any, client_id: str, **mqtt: Any) -> Any:
    return config_from_dict({"fleet": {"state_dir": str(tmp_path / "fleet")},
                             "mqtt": {"host": broker.host, "port": broker.port, "client_id": client_id,
                                      "keepalive_s": 5, **mqtt},
                             "collect": {"flush_interval_s": 0.05}}, {})


def subscribed(broker: Any, client_id: str, topic_filter: str) -> bool:
    """The broker logged the SUBSCRIBE (log_type subscribe)."""
    return f"{client_id} 1 {topic_filter}" in broker.log_text()


# -- unit ----------------------------------------------------------------------------------------
def test_shared_filters_client_ids_and_prefix_errors() -> None:
    table = routes()
    assert subscription_filters(table, "fleet")[0] == "$share/fleet/devices/+/telemetry"
    assert subscription_filters(table)[0] == "devices/+/telemetry"
    for bad in ("a/b", "a+", "#", ""):
        if bad:
            with pytest.raises(FleetConfigError):
                subscription_filters(table, bad)
    with pytest.raises(FleetConfigError, match="shared_group"):
        routes("$share/fleet/devices/{device_id}")
    assert resolve_client_id("edge-fleet-collector-{hostname}", "cloud 1") == "edge-fleet-collector-cloud-1"
    assert resolve_client_id("collector-a", "x") == "collector-a"


# -- zero loss -----------------------------------------------------------------------------------
def test_a_thousand_devices_every_published_message_is_stored(tmp_path: Path, mosquitto_factory: Any) -> None:
    broker = mosquitto_factory(extra_config=broker_settings())
    config = collector_config(tmp_path, broker, "collector-1k")
    running = Running(config)
    reader = open_store(config.store_url)
    try:
        fleet = small_fleet(1000)
        acked = publish_mqtt(fleet, broker.host, broker.port, batch=BATCH, timeout_s=60)
        report = delivery_report(fleet, reader, wait_s=90, batch=BATCH)
        assert acked >= report["published"] > 2000
        assert report["lost"] == 0 and report["stored"] == report["published"], report
        assert reader.counters()["stored"] == report["published"]
        assert running.collector.stats.broker_dropped == 0
    finally:
        running.close()
        reader.close()


def test_mosquitto_default_queue_limit_drops_and_the_collector_reports_them(tmp_path: Path,
                                                                            mosquitto_factory: Any) -> None:
    """A session queue of 100 (Mosquitto's default is 1000) while the collector is away: the broker
    drops the rest, and the collector's count of broker drops is exactly what the store misses."""
    broker = mosquitto_factory(extra_config=["max_queued_messages 100", "sys_interval 1"])
    config = collector_config(tmp_path, broker, "collector-drops")
    Running(config).close()                      # its persistent session now exists on the broker
    reader = open_store(config.store_url)
    fleet = small_fleet(100)
    publish_mqtt(fleet, broker.host, broker.port, batch=BATCH)
    running = Running(config)
    try:
        report = delivery_report(fleet, reader, wait_s=10, batch=BATCH)
        assert report["lost"] > 0
        assert wait_until(lambda: reader.counters().get("broker.dropped", 0) >= report["lost"], 30), \
            reader.counters()
        assert reader.counters()["broker.dropped"] == report["lost"] == running.collector.stats.broker_dropped
    finally:
        running.close()
        reader.close()


# -- bad input is kept, not acknowledged and dropped -------------------------------------------------
def test_unparseable_and_unroutable_messages_are_kept_as_bad(tmp_path: Path, mqtt_broker: Any,
                                                             mqtt_sink: Any) -> None:
    config = collector_config(tmp_path, mqtt_broker, "collector-bad", shared_group="fleet")
    running = Running(config)
    reader = open_store(config.store_url)
    try:
        sink = mqtt_sink(mqtt_broker, ["nothing/here"])
        sink.publish("devices/pi-01/telemetry", b"\xffgarbage")
        running.collector.submit("devices/pi-01/unknown", b'{"x": 1}')       # a topic no route knows
        assert wait_until(lambda: len(bad_messages(reader)) == 2, 20)
        kept = {b["reason"]: b for b in bad_messages(reader)}
        assert kept["json"]["payload"] == b"\xffgarbage" and kept["json"]["topic"] == "devices/pi-01/telemetry"
        assert kept["topic"]["payload"] == b'{"x": 1}' and kept["topic"]["size_bytes"] == 8
        assert reader.counters()["bad.json"] == 1 and reader.counters()["bad.topic"] == 1
        # and a good message through the shared subscription is routed by its real topic and stored
        fleet = small_fleet(3)
        publish_mqtt(fleet, mqtt_broker.host, mqtt_broker.port, batch=BATCH)
        assert delivery_report(fleet, reader, wait_s=20, batch=BATCH)["lost"] == 0
    finally:
        running.close()
        reader.close()


def test_a_second_collector_with_the_same_client_id_is_reported(tmp_path: Path, mqtt_broker: Any,
                                                               caplog: Any) -> None:
    config = collector_config(tmp_path, mqtt_broker, "collector-twin", protocol="5")
    first = Running(config)
    caplog.set_level(logging.ERROR, logger="fleet.collect")
    second = Running(config)
    try:
        assert wait_until(lambda: any("same client id" in r.getMessage() and r.levelno == logging.ERROR
                                      for r in caplog.records), 20)
    finally:
        first.close()
        second.close()


# -- scale-out ---------------------------------------------------------------------------------------
class CollectorProcess:
    """``edge-fleet collect`` in its own process, as a member of a shared subscription group."""

    def __init__(self, conf: Path, client_id: str, log_dir: Path) -> None:
        env = {**os.environ, "EDGE_FLEET_MQTT_CLIENT_ID": client_id, "PYTHONPATH": str(REPO)}
        self.client_id = client_id
        self.stderr = open(log_dir / f"{client_id}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "collect", "--config", str(conf), "--json"],
                                     env=env, stdout=subprocess.PIPE, stderr=self.stderr, cwd=str(REPO))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(20)
        self.stderr.close()

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out = self.proc.communicate(timeout=60)[0].decode()
        self.stderr.close()
        return json.loads(out.strip().splitlines()[-1])


def test_three_shared_collectors_one_killed_mid_run_nothing_lost(tmp_path: Path, mosquitto_factory: Any) -> None:
    """Mosquitto 2.0 keeps handing a killed member its share (into its persistent session), so the
    killed collector comes back with its own client id and drains what its session held."""
    broker = mosquitto_factory(extra_config=broker_settings() + ["log_type subscribe"])
    conf = tmp_path / "fleet.toml"
    conf.write_text(f'[fleet]\nstate_dir = "{tmp_path / "fleet"}"\n[mqtt]\nhost = "{broker.host}"\n'
                    f'port = {broker.port}\nshared_group = "fleet"\n[collect]\nflush_interval_s = 0.05\n')
    ids = [f"collector-{i}" for i in range(3)]
    procs = [CollectorProcess(conf, cid, tmp_path) for cid in ids]
    reader = None
    try:
        assert wait_until(lambda: all(subscribed(broker, cid, "$share/fleet/devices/+/telemetry") for cid in ids),
                          60), broker.log_text()[-2000:]
        reader = open_store(f"sqlite:///{tmp_path / 'fleet' / 'fleet.db'}")
        fleet = small_fleet(400, seed=3)
        publisher = threading.Thread(target=publish_mqtt, args=(fleet, broker.host, broker.port),
                                     kwargs={"batch": BATCH, "timeout_s": 120})
        publisher.start()
        assert wait_until(lambda: reader.message_count() >= 300, 60)
        procs[1].kill()                                   # mid-run, messages in flight and queued for it
        publisher.join(180)
        assert not publisher.is_alive()
        procs[1] = CollectorProcess(conf, ids[1], tmp_path)   # restarted with its own id: resumes its session
        report = delivery_report(fleet, reader, wait_s=120, batch=BATCH)
        assert report["lost"] == 0 and report["stored"] == report["published"], report
        # stored once each: the store's count of new messages is the number published
        assert reader.counters()["stored"] == report["published"]
        stats = [p.stop() for p in procs]
        assert all(s["stored"] > 0 for s in stats), stats       # the broker split the load
        assert sum(s["bad_total"] for s in stats) == 0
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.kill()
        if reader is not None:
            reader.close()
