"""The telemetry cursor on its own: a real SQLite file, the real outbox, no broker needed."""
from __future__ import annotations

import json
import sqlite3

from agent import config
from agent.daemon import Context, Daemon
from agent.reporter import CURSOR_KEY, Reporter
from agent.sampling import Sample
from agent.store import Store
from agent.transport import MqttParams, MqttReporter
from tests.conftest import free_port
from tests.fakes import FakeClock


def _agent(tmp_path, with_mqtt=True):
    cfg = config.parse({"agent": {"device_id": "r1", "state_dir": str(tmp_path / "state")}}, {})
    store = Store(cfg.db_path)
    clock = FakeClock()
    daemon = Daemon(cfg, clock=clock)
    daemon.store = store
    ctx = Context(config=cfg, store=store, clock=clock, emit=daemon.emit, daemon=daemon)
    mqtt = None
    if with_mqtt:  # a broker that is not there: everything waits in the outbox
        mqtt = MqttReporter(MqttParams(port=free_port(), reconnect_min_s=5, reconnect_max_s=5), device_id="r1")
        mqtt.start(ctx)
    reporter = Reporter(telemetry_interval_s=60.0)
    return store, ctx, mqtt, reporter


def _add(store, first_ts, n):
    for i in range(n):
        store.add_sample(Sample(first_ts + i, {"system.cpuUsage": float(first_ts + i)}))
    assert store.flush()


def _queued(mqtt):
    return [json.loads(m.payload) for m in sorted(mqtt.outbox.all(), key=lambda m: m.row_id) if m.kind == "telemetry"]


def test_first_start_begins_at_the_newest_sample_and_batches_chain(tmp_path):
    store, ctx, mqtt, reporter = _agent(tmp_path)
    try:
        _add(store, 1000, 50)  # history from before telemetry existed (an upgrade): not replayed
        reporter.start(ctx)
        assert store.get_state(CURSOR_KEY) == 50  # persisted at once: a kill before the first batch loses nothing
        _add(store, 2000, 10)
        store.add_sample(Sample(3000.0, {"system.cpuUsage": 1.0}))  # not committed: not sent yet
        assert reporter.send_telemetry() == 10
        _add(store, 4000, 5)
        assert reporter.send_telemetry() == 6
        docs = _queued(mqtt)
        assert [(d["firstSeq"], d["lastSeq"]) for d in docs] == [(51, 60), (61, 66)]
        assert [r[0] for r in docs[0]["rows"]] == [2000.0 + i for i in range(10)]
        assert store.get_state(CURSOR_KEY) == 66 and reporter.send_telemetry() == 0
    finally:
        mqtt.stop()


def test_a_refused_write_moves_neither_cursor_nor_outbox(tmp_path):
    store, ctx, mqtt, reporter = _agent(tmp_path)
    try:
        reporter.start(ctx)
        for i in range(40):  # wide rows: their batch needs pages the full disk does not have
            store.add_sample(Sample(1000.0 + i, {f"m{j}": j + i / 7.0 for j in range(60)}))
        assert store.flush()
        conn = store.conn
        conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
        assert reporter.send_telemetry() == 0  # SQLITE_FULL: logged, counted, retried next interval
        assert reporter.write_errors == 1 and store.get_state(CURSOR_KEY) == 0
        assert mqtt.outbox.depth == 0 == conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
        assert not conn.in_transaction
        conn.execute("PRAGMA max_page_count = 1073741823")
        assert reporter.send_telemetry() == 40
        assert store.get_state(CURSOR_KEY) == 40 and mqtt.outbox.depth == len(_queued(mqtt))
        assert sum(len(d["rows"]) for d in _queued(mqtt)) == 40
    finally:
        mqtt.stop()


def test_cursor_follows_a_samples_table_that_restarted(tmp_path):
    store, ctx, mqtt, reporter = _agent(tmp_path)
    try:
        reporter.start(ctx)
        _add(store, 1000, 30)
        assert reporter.send_telemetry() == 30
        with store.transaction() as conn:
            conn.execute("DELETE FROM samples")  # everything beyond retention: seq starts at 1 again
        _add(store, 9000, 4)
        assert reporter.send_telemetry() == 4
        assert [(d["firstSeq"], d["lastSeq"]) for d in _queued(mqtt)][-1] == (1, 4)
    finally:
        mqtt.stop()


def test_without_a_publisher_nothing_is_owed_and_the_cursor_stays(tmp_path):
    store, ctx, _, reporter = _agent(tmp_path, with_mqtt=False)
    reporter.start(ctx)
    _add(store, 1000, 10)
    assert reporter.send_telemetry() == 0
    assert store.get_state(CURSOR_KEY) == 0
    db = sqlite3.connect(ctx.config.db_path)
    assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'outbox'").fetchone()[0] == 0
