"""Telemetry survives kill -9: the real daemon (`-m agent.cli run`) against a real mosquitto.

Twenty runs are killed with SIGKILL at random moments, most of them while the broker is down;
a last run is stopped with SIGTERM.  Every sample the SQLite file holds must then have reached
the subscriber exactly once after dropping duplicate messageIds (delivery is at least once).
"""
from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import connect_before_first_sample, wait_until

REPO = Path(__file__).resolve().parents[1]
DEVICE = "kill9"
CYCLES = 20
OUTAGE = range(4, 16)  # runs 4..15 see no broker


def _write_config(tmp_path: Path, port: int) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[agent]
device_id = "{DEVICE}"
state_dir = "{tmp_path / 'state'}"
interval_s = 0.05
[store]
commit_interval_s = 0.1
[mqtt]
host = "127.0.0.1"
port = {port}
keepalive_s = 5
reconnect_min_s = 0.1
reconnect_max_s = 0.4
telemetry_interval_s = 0.3
shutdown_timeout_s = 5.0
[detect]
forest_bootstrap = false
[forecast]
enabled = false
[clusters]
enabled = false
[maintenance]
enabled = false
""")
    return cfg


def _stored(db_path: Path) -> dict[int, float]:
    if not db_path.exists():
        return {}
    db = sqlite3.connect(db_path)
    try:
        return dict(db.execute("SELECT seq, ts_s FROM samples ORDER BY seq"))
    except sqlite3.Error:
        return {}
    finally:
        db.close()


def _unique_batches(messages: list) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for m in messages:
        doc = json.loads(m.payload)
        out.setdefault(doc["messageId"], doc)
    return out


def _delivered(batches: dict[str, dict]) -> list[tuple[int, float]]:
    """(seq, ts_s) of every sample carried, one entry per carrying message."""
    out = []
    for doc in batches.values():
        seqs = range(doc["firstSeq"], doc["lastSeq"] + 1)
        assert len(seqs) == len(doc["rows"]), doc["messageId"]  # a batch is a contiguous run of seqs
        out += [(seq, row[0]) for seq, row in zip(seqs, doc["rows"])]
    return out


def _start(cfg: Path, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=log)


def test_kill_9_loop_during_a_broker_outage_delivers_every_stored_sample_once(tmp_path, mqtt_broker, mqtt_sink):
    broker = mqtt_broker
    cfg = _write_config(tmp_path, broker.port)
    db_path = tmp_path / "state" / "agent.db"
    sink = mqtt_sink(broker, [f"devices/{DEVICE}/telemetry"])
    rng = random.Random(26)
    log_path = tmp_path / "agent.log"
    with log_path.open("w") as log:
        for cycle in range(CYCLES):
            if cycle in OUTAGE and broker.running:
                broker.stop()
            elif cycle not in OUTAGE and not broker.running:
                broker.start()
            before = len(_stored(db_path))
            proc = _start(cfg, log)
            try:
                assert wait_until(lambda: len(_stored(db_path)) >= before + 3, 30), log_path.read_text()[-3000:]
                time.sleep(rng.uniform(0.0, 0.8))  # anywhere: mid-commit, mid-batch, mid-publish
            finally:
                proc.kill()
                proc.wait(timeout=10)
        killed = _stored(db_path)
        if not broker.running:
            broker.start()
        proc = _start(cfg, log)
        try:
            # everything the killed runs stored arrives while the last run samples on
            assert sink.wait_for(lambda msgs: set(killed) <= {s for s, _ in _delivered(_unique_batches(msgs))}, 60), \
                log_path.read_text()[-3000:]
            time.sleep(rng.uniform(0.2, 0.6))
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    stored = _stored(db_path)
    assert len(stored) > len(killed) > 100
    # SIGTERM flushed the final batch to the broker: nothing waits for a next start
    db = sqlite3.connect(db_path)
    assert db.execute("SELECT count(*) FROM outbox WHERE kind = 'telemetry'").fetchone()[0] == 0
    cursor = json.loads(db.execute("SELECT value FROM agent_state WHERE key = 'telemetry_cursor'").fetchone()[0])
    db.close()
    assert cursor == max(stored)
    assert sink.wait_for(lambda msgs: len(_delivered(_unique_batches(msgs))) >= len(stored), 10)
    batches = _unique_batches(sink.messages())
    delivered = _delivered(batches)
    seqs = [s for s, _ in delivered]
    assert len(seqs) == len(set(seqs)), "a sample arrived in two different messages"
    assert sorted(seqs) == sorted(stored), (len(seqs), len(stored))  # every stored sample, once
    assert all(stored[s] == ts for s, ts in delivered)  # with its own timestamp
    raw, unique = len(sink.messages()), len(batches)
    print(f"\n{CYCLES} kill -9 runs ({len(OUTAGE)} during the broker outage) + 1 SIGTERM run: "
          f"{len(stored)} samples stored ({len(killed)} by the killed runs), {len(seqs)} delivered exactly once "
          f"in {unique} batches ({raw - unique} duplicate deliveries dropped by messageId)")
    assert "Traceback" not in log_path.read_text()


def test_a_clean_stop_publishes_the_final_batch_split_to_fit_the_outbox(tmp_path, mqtt_broker, mqtt_sink):
    """Telemetry every hour, stop after 90 samples: the stop itself commits them, queues them in
    messages no larger than outbox.max_message_bytes, and the publisher drains them before it leaves."""
    from agent import config
    from agent.daemon import Daemon, build_components
    from tests.fakes import FakeClock, FakeSource
    from tests.test_daemon import StopAfter

    cfg = config.parse({
        "agent": {"device_id": "stop-1", "state_dir": str(tmp_path / "state"), "interval_s": 1.0},
        "store": {"commit_interval_s": 600.0},  # nothing committed before the stop
        "mqtt": {"host": mqtt_broker.host, "port": mqtt_broker.port, "telemetry_interval_s": 3600.0,
                 "shutdown_timeout_s": 10.0},
        "outbox": {"max_message_bytes": 8192},
        "detect": {"forest_bootstrap": False}, "forecast": {"enabled": False},
    }, {})
    sink = mqtt_sink(mqtt_broker, ["devices/stop-1/telemetry"])
    clock = FakeClock()
    daemon = Daemon(cfg, source=FakeSource(clock), clock=clock, sleep=clock.sleep)
    daemon.components = build_components(cfg, daemon) + [StopAfter(90)]
    connect_before_first_sample(daemon)
    assert daemon.run() == 0
    db = sqlite3.connect(cfg.db_path)
    assert db.execute("SELECT count(*) FROM samples").fetchone()[0] == 90
    assert db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0  # drained before disconnecting
    assert db.execute("SELECT count(*) FROM outbox_counters WHERE name = 'dropped'").fetchone()[0] == 0
    assert sink.wait_for(lambda m: sum(len(d["rows"]) for d in _unique_batches(m).values()) >= 90, 10), \
        [(d["firstSeq"], d["lastSeq"], len(d["rows"])) for d in _unique_batches(sink.messages()).values()]
    docs = sorted(_unique_batches(sink.messages()).values(), key=lambda d: d["firstSeq"])
    assert len(docs) > 1 and all(len(m.payload) <= 8192 for m in sink.messages())
    assert [d["firstSeq"] for d in docs] == [1] + [d["lastSeq"] + 1 for d in docs[:-1]]  # chained, no gap
    assert docs[-1]["lastSeq"] == 90
