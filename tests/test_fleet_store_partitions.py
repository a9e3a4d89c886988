"""The PostgreSQL fleet store at scale, on a real server (tests/pg.py): daily partitions of
``samples``, dedupe across partitions, retention by dropping partitions, the conversion of a
store made by the unpartitioned schema, and the fleet page's query pruned to one partition.
SQLite retention is checked on a real file beside it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import psycopg
import pytest

from fleet.store import DAY_S, COLLECTOR_MIGRATIONS, Incoming, open_store
from tests.pg import postgres_server, postgres_url  # noqa: F401 - fixtures

DAY0 = 1_765_152_000.0          # 2025-12-08T00:00:00Z, a day boundary


def telemetry(mid: str, device: str, rows: list[tuple[float, dict]]) -> Incoming:
    return Incoming(mid, device, "telemetry", rows[-1][0], {"kind": "telemetry"}, tuple(rows))


def test_a_batch_across_midnight_lands_in_two_partitions_and_duplicates_are_stored_once(postgres_url: str) -> None:
    with open_store(postgres_url) as s:
        rows = [(DAY0 - 60.0 + 30.0 * i, {"cpu": float(i)}) for i in range(4)]    # 23:59:00 .. 00:00:30
        first = s.ingest([telemetry("m1", "dev-a", rows)])
        again = s.ingest([telemetry("m1", "dev-a", rows)])                       # redelivered: same id
        resent = s.ingest([telemetry("m2", "dev-a", rows)])                      # same rows, new id
        names = [p[0] for p in s.partitions()]
        per_partition = {n: int(s.one(f"SELECT COUNT(*) FROM {n}")[0]) for n in names}
    assert first.samples == 4 and again.duplicates == 1 and resent.samples == 0
    assert per_partition["samples_d20251207"] == 2 and per_partition["samples_d20251208"] == 2
    assert "samples_d20251209" in per_partition      # the next day is made ahead


def test_two_stores_creating_the_same_partition_do_not_fail(postgres_url: str) -> None:
    with open_store(postgres_url) as a, open_store(postgres_url) as b:
        a.ingest([telemetry("m1", "dev-a", [(DAY0 + 10.0, {"cpu": 1.0})])])
        b.ingest([telemetry("m2", "dev-b", [(DAY0 + 20.0, {"cpu": 2.0})])])   # b's cache does not know a's days
        assert int(a.one("SELECT COUNT(*) FROM samples")[0]) == 2


def test_retention_drops_old_partitions_and_keeps_new_ones(postgres_url: str) -> None:
    with open_store(postgres_url) as s:
        for day in range(5):
            s.ingest([telemetry(f"m{day}", "dev-a", [(DAY0 + day * DAY_S + 3600.0, {"cpu": 1.0})])],
                     received_s=DAY0 + day * DAY_S + 3600.0)
        now = DAY0 + 4 * DAY_S + 7200.0
        dropped = s.apply_retention(2 * DAY_S, now_s=now)      # cut-off inside day 2 (2025-12-10 02:00)
        names = [p[0] for p in s.partitions()]
        left = [ts for (ts,) in s.query("SELECT ts_s FROM samples ORDER BY ts_s")]
        messages = [m for (m,) in s.query("SELECT message_id FROM messages ORDER BY message_id")]
    assert dropped["partitions"] == 2 and dropped["samples"] == 2     # days 0 and 1 wholly before the cut-off
    assert "samples_d20251208" not in names and "samples_d20251209" not in names
    assert "samples_d20251210" in names                              # day 2 is only partly old: kept whole
    assert left == [DAY0 + d * DAY_S + 3600.0 for d in (2, 3, 4)]
    assert messages == ["m3", "m4"]                                  # ids go by arrival time, row by row


def test_sqlite_retention_deletes_old_rows(tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path / 'fleet.db'}") as s:
        for day in range(3):
            s.ingest([telemetry(f"m{day}", "dev-a", [(DAY0 + day * DAY_S, {"cpu": 1.0})])],
                     received_s=DAY0 + day * DAY_S)
        dropped = s.apply_retention(1.5 * DAY_S, now_s=DAY0 + 2 * DAY_S)
        assert dropped == {"partitions": 0, "samples": 1, "messages": 1}
        assert [ts for (ts,) in s.query("SELECT ts_s FROM samples")] == [DAY0 + DAY_S, DAY0 + 2 * DAY_S]


def test_an_unpartitioned_store_from_the_previous_schema_is_converted(postgres_url: str,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    types = {"pk": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION", "json": "JSONB", "int": "BIGINT"}
    with psycopg.connect(postgres_url, autocommit=True) as conn:   # the schema as the previous release left it
        conn.execute("CREATE TABLE fleet_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        for stmt in (x.strip() for x in COLLECTOR_MIGRATIONS[0].format(**types).split(";")):
            if stmt:
                conn.execute(stmt)
        conn.execute("INSERT INTO fleet_schema VALUES ('collector', 1)")
        for i in range(3):
            conn.execute("INSERT INTO samples VALUES ('dev-a', %s, '{\"cpu\": 1}')", (DAY0 - DAY_S + i * DAY_S,))
    with caplog.at_level(logging.WARNING, logger="fleet.store"), open_store(postgres_url) as s:
        kind = s.one("SELECT relkind FROM pg_class WHERE oid = 'samples'::regclass")[0]
        names = [p[0] for p in s.partitions()]
        count = int(s.one("SELECT COUNT(*) FROM samples")[0])
        s.ingest([telemetry("m1", "dev-a", [(DAY0, {"cpu": 2.0})])])                  # an old key: a duplicate
        after = int(s.one("SELECT COUNT(*) FROM samples")[0])
    assert kind == "p" and count == 3 and after == 3
    assert names == ["samples_d20251207", "samples_d20251208", "samples_d20251209"]
    assert "converted the unpartitioned samples table (3 rows) into 3 daily partitions" in caplog.text
    with open_store(postgres_url):            # opening again converts nothing
        pass


def test_the_fleet_page_query_prunes_to_one_partition_and_uses_its_index(postgres_url: str) -> None:
    with open_store(postgres_url) as s:
        for day in range(3):
            batch = [telemetry(f"m{day}-{d}", f"dev-{d}", [(DAY0 + day * DAY_S + 60.0 * i, {"cpu": 1.0})
                                                           for i in range(300)]) for d in range(20)]
            s.ingest(batch)
        s.execute("ANALYZE samples")
        # the query of fleet.serve's device chart: one device over one hour of one day
        plan = "\n".join(r[0] for r in s.query(
            "EXPLAIN SELECT ts_s, metrics FROM samples WHERE device_id = ? AND ts_s >= ? AND ts_s <= ? ORDER BY ts_s",
            ("dev-3", DAY0 + DAY_S, DAY0 + DAY_S + 3600.0)))
    assert "samples_d20251209" in plan                                    # the one day asked for
    assert "samples_d20251208" not in plan and "samples_d20251210" not in plan
    assert "Index" in plan, plan
