"""The SQLite outbox on a real database file: order, bounds, drop policy, persistence."""
from __future__ import annotations

import json
import random
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from agent.outbox import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL, Outbox, OutboxParams
from agent.store import Store, connect
from agent.transport import MqttParams, MqttReporter


def put(box: Outbox, kind: str, n: int, *, priority: int = 0, size: int = 10, tag: str = "") -> list[str]:
    ids = []
    for i in range(n):
        mid = f"{kind}-{tag}{i}"
        assert box.put(kind, f"t/{kind}", b"x" * size, message_id=mid, priority=priority,
                       created_at_s=1000.0 + i)
        ids.append(mid)
    return ids


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "agent.db"


def test_drains_by_priority_class_then_age(db: Path) -> None:
    box = Outbox(connect(db))
    box.put("telemetry", "t", b"1", message_id="t1", priority=PRIORITY_LOW, created_at_s=1)
    box.put("anomaly", "a", b"2", message_id="a1", priority=PRIORITY_HIGH, created_at_s=2)
    box.put("forecast", "f", b"3", message_id="f1", priority=PRIORITY_NORMAL, created_at_s=3)
    box.put("telemetry", "t", b"4", message_id="t2", priority=PRIORITY_LOW, created_at_s=4)
    box.put("anomaly", "a", b"5", message_id="a2", priority=PRIORITY_HIGH, created_at_s=5)
    order = [m.message_id for m in box.next_batch(10)]
    assert order == ["a1", "a2", "f1", "t1", "t2"]
    first_two = box.next_batch(2)
    assert [m.message_id for m in box.next_batch(10, exclude={m.row_id for m in first_two})] == ["f1", "t1", "t2"]
    assert box.depth == 5 and box.bytes == 5


def test_row_bound_drops_oldest_telemetry_first_and_never_an_anomaly(db: Path) -> None:
    box = Outbox(connect(db), OutboxParams(max_rows=20))
    anomalies = []
    telemetry = []
    for i in range(60):  # interleaved, as a device produces them
        telemetry += put(box, "telemetry", 1, tag=f"{i}-")
        if i % 6 == 0:
            anomalies += put(box, "anomaly", 1, priority=PRIORITY_HIGH, tag=f"{i}-")
    kept = [m.message_id for m in box.all()]
    assert box.depth == 20 == len(kept)
    assert set(anomalies) <= set(kept)  # all 10 anomalies survive
    kept_telemetry = [m for m in kept if m.startswith("telemetry")]
    assert sorted(kept_telemetry, key=telemetry.index) == telemetry[-10:]  # only the newest telemetry
    assert box.dropped == 50 and box.stats()["dropped_by_kind"] == {"telemetry": 50}


def test_byte_bound_and_anomalies_dropped_last_oldest_first(db: Path) -> None:
    box = Outbox(connect(db), OutboxParams(max_rows=1000, max_bytes=1000, max_message_bytes=500))
    put(box, "telemetry", 5, size=100)
    put(box, "forecast", 2, size=100)
    anomalies = put(box, "anomaly", 4, priority=PRIORITY_HIGH, size=100)
    assert box.bytes <= 1000
    assert box.stats()["dropped_by_kind"] == {"telemetry": 1}
    more = put(box, "anomaly", 7, priority=PRIORITY_HIGH, size=100, tag="b")
    kept = [m.message_id for m in box.all()]
    # telemetry, then forecasts went first; then the oldest anomalies
    assert kept == (anomalies + more)[-10:]
    assert box.stats()["dropped_by_kind"] == {"telemetry": 5, "forecast": 2, "anomaly": 1}
    assert box.bytes == 1000 and box.depth == 10


def test_in_flight_rows_are_not_dropped(db: Path) -> None:
    box = Outbox(connect(db), OutboxParams(max_rows=3))
    put(box, "telemetry", 3)
    oldest = box.next_batch(1)[0]
    box.protected = {oldest.row_id}
    put(box, "telemetry", 2, tag="new")
    kept = [m.message_id for m in box.all()]
    assert oldest.message_id in kept and len(kept) == 3
    assert kept == ["telemetry-0", "telemetry-new0", "telemetry-new1"]


def test_oversized_and_duplicate_messages_are_refused_and_counted(db: Path) -> None:
    box = Outbox(connect(db), OutboxParams(max_message_bytes=100))
    assert not box.put("telemetry", "t", b"x" * 101, message_id="big", priority=0, created_at_s=1)
    assert box.put("anomaly", "t", b"y", message_id="a", priority=0, created_at_s=1)
    assert not box.put("anomaly", "t", b"y", message_id="a", priority=0, created_at_s=1)
    assert box.depth == 1
    assert box.stats()["refused"] == 1 and box.stats()["dropped_by_kind"] == {"telemetry": 1}


def test_state_and_counters_persist_across_reopen(db: Path) -> None:
    conn = connect(db)
    box = Outbox(conn, OutboxParams(max_rows=4))
    put(box, "telemetry", 6, size=7)
    first = box.next_batch(2)
    assert box.delete({m.row_id: m.size_bytes for m in first}) == 2
    conn.close()
    box2 = Outbox(connect(db), OutboxParams(max_rows=4))
    assert (box2.depth, box2.bytes, box2.dropped) == (2, 14, 2)
    assert [m.message_id for m in box2.all()] == ["telemetry-4", "telemetry-5"]


def test_put_inside_the_stores_transaction_commits_with_it(db: Path) -> None:
    store = Store(db)
    box = Outbox(store.conn, migrate=store.migrate)
    with store.transaction():
        put(box, "anomaly", 1)
        assert store.conn.in_transaction
    store.close()
    other = sqlite3.connect(db)
    assert other.execute("SELECT message_id FROM outbox").fetchall() == [("anomaly-0",)]
    assert other.execute("SELECT version FROM schema_versions WHERE component='outbox'").fetchone() == (1,)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_component_with_no_broker_queues_bounds_and_never_blocks(db: Path) -> None:
    conn = connect(db)
    params = MqttParams(host="127.0.0.1", port=_closed_port(), keepalive_s=2,
                        reconnect_min_s=0.05, reconnect_max_s=0.2)
    rep = MqttReporter(params, OutboxParams(max_rows=30), device_id="dev-down", conn=conn,
                       rng=random.Random(3))
    rep.start()
    anomaly_ids = []
    for i in range(100):
        rep.enqueue("telemetry", {"seq": i}, PRIORITY_LOW)
        if i % 10 == 0:
            anomaly_ids.append(rep.enqueue("anomaly", {"seq": i}, PRIORITY_HIGH))
        rep.tick(time.monotonic())
    deadline = time.monotonic() + 5
    while rep.status()["mqtt"]["connect_failures"] < 2 and time.monotonic() < deadline:
        rep.tick(time.monotonic())
        time.sleep(0.02)
    st = rep.status()
    assert st["mqtt"]["connected"] is False
    assert st["mqtt"]["connect_failures"] >= 2  # it keeps retrying
    assert "ConnectionRefusedError" in st["mqtt"]["last_error"]
    assert st["outbox"]["depth"] == 30 and st["outbox"]["dropped"] == 80
    assert st["outbox"]["dropped_by_kind"] == {"telemetry": 80}
    rows = rep.outbox.all()
    assert {m.message_id for m in rows if m.kind == "anomaly"} == set(anomaly_ids)
    assert sorted(json.loads(m.payload)["seq"] for m in rows if m.kind == "telemetry") == list(range(80, 100))
    rep.stop()
    conn.close()
    reopened = Outbox(connect(db))
    assert reopened.dropped == 80 and reopened.depth == 30
