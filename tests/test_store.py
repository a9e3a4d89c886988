import sqlite3

import pytest

from agent.sampling import Sample
from agent.store import Store, migrate


def _sample(ts, **values):
    return Sample(ts_s=ts, values={k.replace("_", "."): v for k, v in values.items()})


def test_batched_commit_and_new_columns(tmp_path):
    store = Store(tmp_path / "a.db")
    store.add_sample(Sample(1.0, {"system.cpuUsage": 1.0}))
    store.add_sample(Sample(2.0, {"system.cpuUsage": 2.0, "system.temperature": 40.0}))
    other = sqlite3.connect(tmp_path / "a.db")
    assert other.execute("SELECT count(*) FROM samples").fetchone()[0] == 0  # nothing committed before flush
    assert store.flush()
    assert other.execute("SELECT count(*) FROM samples").fetchone()[0] == 2
    rows = store.samples()
    assert rows == [(1.0, {"system.cpuUsage": 1.0}), (2.0, {"system.cpuUsage": 2.0, "system.temperature": 40.0})]
    assert store.samples(limit=1) == [rows[1]]
    assert store.samples(metrics=["system.temperature"]) == [(1.0, {}), (2.0, {"system.temperature": 40.0})]
    assert store.latest_sample().ts_s == 2.0
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental


def test_flush_participants_ride_the_commit(tmp_path):
    store = Store(tmp_path / "a.db")
    store.migrate("things", ["CREATE TABLE things (x INTEGER)"])

    class P:
        pending = [1, 2]
        done = 0

        def write(self, conn):
            conn.executemany("INSERT INTO things VALUES (?)", [(x,) for x in self.pending])

        def committed(self):
            self.pending = []
            self.done += 1

    p = P()
    store.add_flush_participant(p)
    assert store.flush()
    assert p.done == 1 and p.pending == []
    assert store.conn.execute("SELECT count(*) FROM things").fetchone()[0] == 2


def test_component_migrations_are_versioned(tmp_path):
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    steps = ["CREATE TABLE t (a INTEGER)", "ALTER TABLE t ADD COLUMN b TEXT; CREATE INDEX t_b ON t (b)"]
    assert migrate(conn, "t", steps[:1]) == 1
    assert migrate(conn, "t", steps) == 2
    assert migrate(conn, "t", steps) == 2  # idempotent
    assert [r[1] for r in conn.execute("PRAGMA table_info(t)")] == ["a", "b"]
    with pytest.raises(RuntimeError, match="newer than this agent"):
        migrate(conn, "t", steps[:1])


def test_failed_migration_rolls_back(tmp_path):
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, "t", ["CREATE TABLE t (a INTEGER); CREATE TABLE t (b INTEGER)"])
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 't'").fetchone()[0] == 0
    assert migrate(conn, "t", ["CREATE TABLE t (a INTEGER)"]) == 1


def test_disk_full_keeps_samples_in_memory_then_recovers(tmp_path):
    store = Store(tmp_path / "full.db", memory_buffer_rows=50)
    store.add_sample(Sample(0.0, {"system.cpuUsage": 0.0}))
    assert store.flush()
    pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
    store.conn.execute(f"PRAGMA max_page_count = {pages}")  # a real SQLITE_FULL from here on
    for i in range(1, 40):
        store.add_sample(Sample(float(i), {"system.cpuUsage": float(i), **{f"m{j}": float(j) for j in range(60)}}))
    assert store.flush() is False
    assert store.write_errors >= 1 and store.pending_count == 39
    store.conn.execute("PRAGMA max_page_count = 1000000")  # space freed
    assert store.flush()
    assert store.pending_count == 0
    assert [ts for ts, _ in store.samples()] == [float(i) for i in range(40)]


def test_memory_buffer_is_bounded_and_counts_losses(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    store = Store(blocker / "agent.db", memory_buffer_rows=10)  # state dir cannot be created
    assert not store.available
    for i in range(25):
        store.add_sample(Sample(float(i), {"system.cpuUsage": 1.0}))
    assert store.flush() is False
    assert store.pending_count == 10 and store.samples_dropped == 15
    blocker.unlink()  # the operator fixes the mount
    assert store.flush()
    assert [ts for ts, _ in store.samples()] == [float(i) for i in range(15, 25)]


def test_retention_by_age_and_size(tmp_path):
    store = Store(tmp_path / "r.db", retention_s=100.0, max_db_bytes=1024 * 1024)
    for i in range(200):
        store.add_sample(Sample(float(i), {"system.cpuUsage": float(i)}))
    store.flush()
    assert store.enforce_retention(now_s=250.0) == 150
    assert store.samples()[0][0] == 150.0
    for i in range(3000):
        store.add_sample(Sample(1000.0 + i, {f"metric.{j}": j + i / 7.0 for j in range(100)}))
    store.flush()
    assert store.used_bytes() > store.max_db_bytes
    store.enforce_retention(now_s=4000.0)
    assert store.used_bytes() <= store.max_db_bytes
    assert (tmp_path / "r.db").stat().st_size <= 1.3 * store.max_db_bytes  # incremental vacuum gave pages back
    kept = [ts for ts, _ in store.samples(metrics=["metric.1"])]
    assert kept == sorted(kept) and kept[-1] == 3999.0  # the newest survive


def test_state_roundtrip(tmp_path):
    store = Store(tmp_path / "s.db")
    store.set_state("runtime", {"a": 1})
    assert store.get_state("runtime") == {"a": 1}
    assert store.get_state("missing", 5) == 5
