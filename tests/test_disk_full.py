"""A full disk, for real: ``PRAGMA max_page_count`` pinned at the database's size makes every write
fail with SQLITE_FULL ("database or disk is full"), as tests/test_store.py does for the store alone.

The whole agent (daemon, components, a real mosquitto) runs through a long full-disk spell on a
fake clock: log lines stay bounded, `edge-agent status` still says "running", the memory hold keeps
anomalies over telemetry, and once space is back every sample is stored and sent.
"""
from __future__ import annotations

import collections
import json
import logging
import random
import sqlite3
import threading

from agent import config, status
from agent.daemon import Daemon, build_components
from agent.outbox import OutboxParams
from agent.store import connect
from agent.transport import MqttParams, MqttReporter
from tests.conftest import connect_before_first_sample, wait_until
from tests.fakes import FakeClock, FakeSource, replace

FULL_FROM, FULL_UNTIL, STOP_AT = 120, 720, 800  # samples (1 s apart): ten minutes of full disk


def _fill(conn: sqlite3.Connection) -> None:
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")


class DiskFullScript:
    """Fills the disk at one sample, frees it at another, stops the agent, and looks at status meanwhile."""

    name = "disk-script"

    def __init__(self, cfg: config.AgentConfig) -> None:
        self.cfg = cfg
        self.n = 0
        self.status_while_full: dict | None = None
        self.records_at_full = 0

    def start(self, ctx) -> None:
        self.ctx = ctx

    def on_sample(self, sample) -> None:
        self.n += 1
        conn = self.ctx.store.conn
        if self.n == FULL_FROM:
            self.ctx.store.flush()
            _fill(conn)
            self.records_at_full = len(LOG.records)
        elif self.n == FULL_UNTIL - 1:
            self.status_while_full = status.collect(self.cfg, self.ctx.clock.time())
        elif self.n == FULL_UNTIL:
            self.records_during = LOG.records[self.records_at_full:]
            conn.execute("PRAGMA max_page_count = 1073741823")
        elif self.n >= STOP_AT:
            self.ctx.daemon.request_stop()


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


LOG = _Capture()


def test_a_full_disk_keeps_logs_bounded_status_running_and_loses_no_sample(tmp_path, mqtt_broker, mqtt_sink):
    cfg = config.parse({
        "agent": {"device_id": "full-1", "state_dir": str(tmp_path / "state"), "interval_s": 1.0},
        "store": {"commit_interval_s": 5.0},
        "mqtt": {"host": mqtt_broker.host, "port": mqtt_broker.port, "reconnect_min_s": 0.1,
                 "reconnect_max_s": 0.5, "telemetry_interval_s": 30.0},
        "detect": {"forest_bootstrap": False},
        "clusters": {"enabled": False}, "maintenance": {"enabled": False},
    }, {})
    sink = mqtt_sink(mqtt_broker, ["devices/full-1/telemetry", "devices/full-1/anomalies"])
    clock = FakeClock()
    rng = random.Random(5)

    def spiky(i, r):  # calm, with CPU spikes that open (and record) anomaly episodes, also while full
        return replace(r, cpu_percent=99.0 if i % 200 in range(150, 160) else 10.0 + rng.gauss(0, 1.0))

    source = FakeSource(clock, hook=spiky)
    daemon = Daemon(cfg, source=source, clock=clock, sleep=clock.sleep)
    script = DiskFullScript(cfg)
    daemon.components = build_components(cfg, daemon) + [script]
    connect_before_first_sample(daemon)
    logging.getLogger("agent").addHandler(LOG)
    try:
        assert daemon.run() == 0
    finally:
        logging.getLogger("agent").removeHandler(LOG)

    # anomaly episodes are news, not a repeated error: each one has its own line
    during = [r for r in script.records_during if not r.msg.startswith("anomaly ")]
    by_template = collections.Counter((r.name, r.msg) for r in during)
    print(f"\n{FULL_UNTIL - FULL_FROM} s of full disk: {len(during)} warning lines "
          f"({len(by_template)} distinct): " + "; ".join(f"{n}x {name}: {msg[:50]}" for (name, msg), n
                                                        in by_template.most_common()))
    assert during, "the full disk went unnoticed"
    assert any("full" in r.getMessage() for r in during)
    assert max(by_template.values()) <= 2, by_template  # each repeated error once a minute (real time)
    assert len(during) <= 20

    # status while full: the agent is running although its snapshot could not be written for 10 min
    doc = script.status_while_full
    assert doc["running"] is True and doc["runtime_stale_s"] >= 500
    # after the spell: status of the stopped agent, every sample stored and, once, sent
    from agent import liveness

    assert liveness.probe(cfg.db_path.parent) is False  # the daemon let go of its lock
    db = sqlite3.connect(cfg.db_path)
    stored = dict(db.execute("SELECT seq, ts_s FROM samples"))
    assert len(stored) == STOP_AT
    assert db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM events WHERE kind = 'anomaly'").fetchone()[0] >= 3
    seqs = []
    assert sink.wait_for(lambda msgs: sum(len(m.json()["rows"]) for m in msgs if m.topic.endswith("telemetry"))
                         >= STOP_AT, 15)
    batches = {m.json()["messageId"]: m.json() for m in sink.messages("devices/full-1/telemetry")}
    for doc in batches.values():
        seqs += range(doc["firstSeq"], doc["lastSeq"] + 1)
    assert sorted(seqs) == sorted(stored)
    anomalies = {m.json()["id"] for m in sink.messages("devices/full-1/anomalies")}
    assert len(anomalies) >= 3  # episodes opened while the disk was full were held and sent later


def test_the_memory_hold_drops_telemetry_first_and_anomalies_last(tmp_path):
    conn = connect(tmp_path / "agent.db")
    rep = MqttReporter(MqttParams(), OutboxParams(max_rows=10), device_id="dev-1", conn=conn)
    _fill(conn)
    kinds = ["anomaly"] * 6 + ["twin"] * 8 + ["telemetry"] * 8 + ["forecast"] * 4 + ["anomaly"] * 4
    for i, kind in enumerate(kinds):
        rep.enqueue(kind, {"n": i, "pad": "x" * 5000}, 100 if kind == "anomaly" else 0)  # > a page
    held = collections.Counter(item[0] for item in rep._unwritten)
    assert sum(held.values()) == 16  # max(16, max_rows // 100)
    assert held["anomaly"] == 10 and held["telemetry"] == 0 and held["twin"] == 2 and held["forecast"] == 4
    assert rep.counts["memory_dropped"] == len(kinds) - 16
    conn.execute("PRAGMA max_page_count = 1073741823")
    rep.tick(0.0)  # space again: the held messages go to the outbox, in their original order
    assert not rep._unwritten
    rows = [(m.kind, json.loads(m.payload)["n"]) for m in sorted(rep.outbox.all(), key=lambda m: m.row_id)]
    assert [n for _, n in rows] == sorted(n for _, n in rows)
    assert [k for k, _ in rows].count("anomaly") == 10


def test_a_running_agent_is_seen_by_its_lock_not_only_its_snapshot(tmp_path):
    """`edge-agent status` in another process: running while the daemon holds its lock, whatever
    the snapshot's age; not running after the daemon is gone."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from agent import liveness

    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\ndevice_id = "lk"\nstate_dir = "{state}"\ninterval_s = 0.05\n'
                   '[store]\ncommit_interval_s = 600\n[mqtt]\nenabled = false\n'
                   '[detect]\nforest_bootstrap = false\n[forecast]\nenabled = false\n')
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)], cwd=repo,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: liveness.probe(state) is True, 30)
        out = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--json", "--config", str(cfg)],
                             cwd=repo, capture_output=True, text=True, timeout=60)
        doc = json.loads(out.stdout)
        assert doc["running"] is True  # nothing committed yet (600 s batches): the lock says so
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert liveness.probe(state) is False  # kill -9: the kernel dropped the lock
    assert liveness.probe(tmp_path / "nowhere") is None
    lock = liveness.LivenessLock(state)
    assert lock.acquire() and liveness.probe(state) is True
    assert liveness.probe(state) is True  # probes never conflict with each other
    lock.release()
    assert liveness.probe(state) is False
    time.sleep(0)


def test_repeated_event_write_failures_are_logged_once_and_counted(tmp_path, caplog):
    from agent.events import EventLog
    from agent.store import Store

    store = Store(tmp_path / "agent.db")
    events = EventLog(store)
    _fill(store.conn)
    with caplog.at_level(logging.WARNING, logger="agent.events"):
        results = [events.record({"id": f"e{i}", "kind": "anomaly", "severity": "warning", "pad": "x" * 5000},
                                 float(i)) for i in range(50)]
    assert not any(results) and events.write_errors == 50
    lines = [r for r in caplog.records if r.name == "agent.events"]
    assert len(lines) == 1 and "disk is full" in lines[0].getMessage()
    store.conn.execute("PRAGMA max_page_count = 1073741823")
    assert events.record({"id": "e50", "kind": "anomaly"}, 50.0)  # and writes resume
