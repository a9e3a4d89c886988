"""The fleet store: what devices sent, behind one small interface over SQLite or PostgreSQL.

Why both: SQLite needs nothing and suits one fleet host; the origin platform
runs PostgreSQL, where the collected history can sit beside its
``device_shadow_history`` table (which ``shadow_rows`` reads as a training
source). Every query is written once, in the subset both engines share
(``ON CONFLICT``, correlated sub-queries, ``?`` placeholders that become ``%s``
for psycopg); only the column types of the DDL differ (``{pk}``, ``{real}``,
``{json}``, ``{int}`` below). JSON goes to a TEXT column in SQLite and a JSONB
column in PostgreSQL.

Deduplication: every message id is inserted into ``messages`` first, in the
same transaction as its rows; a conflict means the message was already stored
(MQTT delivers at least once; retained twin state comes back on every
reconnect) and the rest is skipped. Samples additionally have the primary key
(device_id, ts_s), so a batch re-sent under a new id adds no rows either.

psycopg (v3) is imported only when a ``postgresql://`` URL is opened, so the
fleet works without it on SQLite.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

SEVERITIES = ("normal", "warning", "critical")

_TYPES = {
    "sqlite": {"pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL", "json": "TEXT", "int": "INTEGER"},
    "postgresql": {"pk": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION", "json": "JSONB", "int": "BIGINT"},
}

COLLECTOR_MIGRATIONS = [
    """
    CREATE TABLE messages (
        message_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, kind TEXT NOT NULL,
        ts_s {real}, received_s {real} NOT NULL);
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY, first_seen_s {real} NOT NULL, last_seen_s {real} NOT NULL);
    CREATE TABLE samples (
        device_id TEXT NOT NULL, ts_s {real} NOT NULL, metrics {json} NOT NULL,
        PRIMARY KEY (device_id, ts_s));
    CREATE TABLE anomalies (
        seq {pk}, message_id TEXT NOT NULL UNIQUE, device_id TEXT NOT NULL, event_id TEXT NOT NULL,
        ts_s {real}, started_s {real}, ended_s {real}, severity TEXT, metric TEXT, detector TEXT,
        model_version {int}, score {real}, received_s {real} NOT NULL, doc {json} NOT NULL);
    CREATE INDEX anomalies_event ON anomalies (device_id, event_id);
    CREATE INDEX anomalies_started ON anomalies (started_s);
    CREATE TABLE forecasts (
        message_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, metric TEXT NOT NULL, origin_s {real} NOT NULL,
        step_s {real}, model TEXT, model_version {int}, doc {json} NOT NULL);
    CREATE INDEX forecasts_device ON forecasts (device_id, metric, origin_s);
    CREATE TABLE twin (
        device_id TEXT PRIMARY KEY, ts_s {real} NOT NULL, message_id TEXT NOT NULL, reported {json} NOT NULL);
    CREATE TABLE model_events (
        message_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, ts_s {real}, doc {json} NOT NULL);
    CREATE INDEX model_events_device ON model_events (device_id, ts_s);
    CREATE TABLE counters (name TEXT PRIMARY KEY, value {int} NOT NULL);
    CREATE TABLE labels (
        id {pk}, device_id TEXT NOT NULL, start_s {real} NOT NULL, end_s {real} NOT NULL,
        label TEXT NOT NULL, created_s {real} NOT NULL);
    CREATE INDEX labels_device ON labels (device_id, start_s)
    """,
    # retention deletes old message ids by arrival time
    "CREATE INDEX messages_received ON messages (received_s)",
]

DAY_S = 86400
PARTITION_AHEAD_DAYS = 1     # tomorrow's partition exists before the first sample of tomorrow arrives


class StoreError(RuntimeError):
    """The store cannot be opened or used; the message is for the operator."""


@dataclass(frozen=True)
class Incoming:
    """One validated device message (fleet.collect.parse_message makes these)."""

    message_id: str
    device_id: str
    kind: str                    # telemetry | anomaly | forecast | twin | model
    ts_s: float | None
    doc: Mapping[str, Any]
    samples: tuple[tuple[float, Mapping[str, float]], ...] = ()
    topic: str = ""


@dataclass
class IngestResult:
    stored: int = 0
    duplicates: int = 0
    samples: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def iso_to_s(text: Any) -> float | None:
    """ISO 8601 (Z or offset; naive = UTC) or epoch seconds -> epoch seconds; None if unparsable."""
    if text is None or isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return _finite(text)
    if isinstance(text, datetime):
        dt = text if text.tzinfo else text.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    try:
        return float(text)
    except (TypeError, ValueError):
        pass
    try:
        dt = datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def flatten_numeric(doc: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{"system": {"cpuUsage": 5}} and {"system.cpuUsage": 5} both -> {"system.cpuUsage": 5.0}."""
    out: dict[str, float] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_numeric(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            f = _finite(value)
            if f is not None:
                out[name] = f
    return out


def unwrap_reported(state: Any) -> Mapping[str, Any]:
    """A shadow document in any of the origin's shapes -> the reported mapping."""
    if isinstance(state, (str, bytes)):
        try:
            state = json.loads(state)
        except ValueError:
            return {}
    if not isinstance(state, Mapping):
        return {}
    if isinstance(state.get("state"), Mapping):
        state = state["state"]
    if isinstance(state.get("reported"), Mapping):
        state = state["reported"]
    return state


class Store:
    """A DB-API connection plus the dialect it speaks; one per thread."""

    def __init__(self, conn: Any, dialect: str, url: str) -> None:
        self.conn = conn
        self.dialect = dialect
        self.url = url
        self._types = _TYPES[dialect]
        self._partition_days: set[int] = set()
        self.migrate("collector", COLLECTOR_MIGRATIONS)
        if self.is_postgres:
            self._partition_samples()

    # -- plumbing ------------------------------------------------------------------------
    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    def sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.is_postgres else text

    def execute(self, text: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(self.sql(text), tuple(params))

    def executemany(self, text: str, rows: Iterable[Sequence[Any]]) -> int:
        """Rows changed in total (both drivers sum rowcount over the batch)."""
        cur = self.conn.cursor()
        try:
            cur.executemany(self.sql(text), [tuple(r) for r in rows])
            return max(int(cur.rowcount), 0)
        finally:
            cur.close()

    def query(self, text: str, params: Sequence[Any] = ()) -> list[tuple]:
        return list(self.execute(text, params).fetchall())

    def one(self, text: str, params: Sequence[Any] = ()) -> tuple | None:
        return self.execute(text, params).fetchone()

    def json(self, obj: Any) -> Any:
        """A parameter for a {json} column."""
        text = json.dumps(obj, separators=(",", ":"), allow_nan=False, default=str)
        if self.is_postgres:
            from psycopg.types.json import Jsonb
            return Jsonb(json.loads(text))
        return text

    @staticmethod
    def unjson(value: Any) -> Any:
        if isinstance(value, (str, bytes, bytearray)):
            return json.loads(value)
        return value

    @contextlib.contextmanager
    def transaction(self) -> Iterator["Store"]:
        """One atomic unit; nested use joins (SQLite) or makes a savepoint (PostgreSQL)."""
        if self.is_postgres:
            try:
                with self.conn.transaction():
                    yield self
            except BaseException:
                self._partition_days.clear()   # a partition made in the rolled-back work is gone again
                raise
            return
        if self.conn.in_transaction:
            yield self
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def migrate(self, component: str, migrations: Sequence[str]) -> int:
        """Run the scripts of ``component`` not applied yet, each in its own transaction."""
        self.execute("CREATE TABLE IF NOT EXISTS fleet_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        row = self.one("SELECT version FROM fleet_schema WHERE component = ?", (component,))
        version = int(row[0]) if row else 0
        if version >= len(migrations):
            return version
        with self.transaction():
            if self.is_postgres:  # two processes starting at once must not both migrate
                self.execute("LOCK TABLE fleet_schema IN EXCLUSIVE MODE")
            row = self.one("SELECT version FROM fleet_schema WHERE component = ?", (component,))
            version = int(row[0]) if row else 0
            for number, script in enumerate(migrations[version:], start=version + 1):
                for stmt in (s.strip() for s in script.format(**self._types).split(";")):
                    if stmt:
                        self.execute(stmt)
                self.execute("INSERT INTO fleet_schema (component, version) VALUES (?, ?) ON CONFLICT (component) "
                             "DO UPDATE SET version = excluded.version", (component, number))
                version = number
        log.info("store %s: %s schema at version %d", self.dialect, component, version)
        return version

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- ingest --------------------------------------------------------------------------
    def ingest(self, messages: Sequence[Incoming], received_s: float | None = None) -> IngestResult:
        """Store a batch in one transaction; messages already stored are skipped."""
        now = time.time() if received_s is None else received_s
        result = IngestResult()
        with self.transaction():
            for m in messages:
                cur = self.execute("INSERT INTO messages (message_id, device_id, kind, ts_s, received_s) "
                                   "VALUES (?, ?, ?, ?, ?) ON CONFLICT (message_id) DO NOTHING",
                                   (m.message_id, m.device_id, m.kind, m.ts_s, now))
                if cur.rowcount == 0:
                    result.duplicates += 1
                    continue
                result.stored += 1
                result.by_kind[m.kind] = result.by_kind.get(m.kind, 0) + 1
                self.execute("INSERT INTO devices (device_id, first_seen_s, last_seen_s) VALUES (?, ?, ?) "
                             "ON CONFLICT (device_id) DO UPDATE SET last_seen_s = excluded.last_seen_s",
                             (m.device_id, now, now))
                result.samples += getattr(self, f"_ingest_{m.kind}")(m, now)
        return result

    def _ingest_telemetry(self, m: Incoming, now: float) -> int:
        if not m.samples:
            return 0
        if self.is_postgres:
            self.ensure_partitions(ts for ts, _ in m.samples)
        return self.executemany("INSERT INTO samples (device_id, ts_s, metrics) VALUES (?, ?, ?) "
                                "ON CONFLICT (device_id, ts_s) DO NOTHING",
                                [(m.device_id, ts, self.json(dict(values))) for ts, values in m.samples])

    def _ingest_anomaly(self, m: Incoming, now: float) -> int:
        d = m.doc
        self.execute(
            "INSERT INTO anomalies (message_id, device_id, event_id, ts_s, started_s, ended_s, severity, metric, "
            "detector, model_version, score, received_s, doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (m.message_id, m.device_id, str(d.get("id")), m.ts_s, iso_to_s(d.get("startedAt")),
             iso_to_s(d.get("endedAt")), d.get("severity"), d.get("metric"), d.get("detector"),
             d.get("modelVersion") if isinstance(d.get("modelVersion"), int) else None,
             _finite(d.get("score")), now, self.json(d)))
        return 0

    def _ingest_forecast(self, m: Incoming, now: float) -> int:
        d = m.doc
        self.execute("INSERT INTO forecasts (message_id, device_id, metric, origin_s, step_s, model, model_version, "
                     "doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (m.message_id, m.device_id, str(d.get("metric")), iso_to_s(d.get("origin")),
                      _finite(d.get("stepSeconds")), d.get("model"),
                      d.get("modelVersion") if isinstance(d.get("modelVersion"), int) else None, self.json(d)))
        return 0

    def _ingest_twin(self, m: Incoming, now: float) -> int:
        reported = unwrap_reported(m.doc)
        ts = m.ts_s if m.ts_s is not None else now
        # the latest state wins, whatever order the messages arrive in
        self.execute("INSERT INTO twin (device_id, ts_s, message_id, reported) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT (device_id) DO UPDATE SET ts_s = excluded.ts_s, message_id = excluded.message_id, "
                     "reported = excluded.reported WHERE excluded.ts_s >= twin.ts_s",
                     (m.device_id, ts, m.message_id, self.json(dict(reported))))
        return 0

    def _ingest_model(self, m: Incoming, now: float) -> int:
        self.execute("INSERT INTO model_events (message_id, device_id, ts_s, doc) VALUES (?, ?, ?, ?)",
                     (m.message_id, m.device_id, m.ts_s, self.json(dict(m.doc))))
        return 0

    # -- PostgreSQL partitions and retention -------------------------------------------------
    def _partition_samples(self) -> None:
        """Make ``samples`` a table partitioned by day of ``ts_s`` (PostgreSQL only).

        Why: 100k devices at a batch a minute is ~10^8 rows a day; daily range
        partitions let the fleet page's time-range queries prune to one or two
        partitions and let retention drop a whole day instead of deleting rows.
        The key (device_id, ts_s) holds the partition key, so a re-sent batch still
        adds nothing. A store made by the previous (plain table) schema is
        converted in one transaction, with a log line saying so.
        """
        row = self.one("SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                       "WHERE c.relname = 'samples' AND n.nspname = current_schema()")
        if row is None or row[0] == "p":
            return
        with self.transaction():
            self.execute("LOCK TABLE samples IN ACCESS EXCLUSIVE MODE")
            if self.one("SELECT relkind FROM pg_class WHERE oid = 'samples'::regclass")[0] == "p":
                return   # another process converted it while we waited
            count = int(self.one("SELECT COUNT(*) FROM samples")[0])
            self.execute("ALTER TABLE samples RENAME TO samples_unpartitioned")
            self.execute("ALTER TABLE samples_unpartitioned RENAME CONSTRAINT samples_pkey TO samples_unpartitioned_pkey")
            self.execute("CREATE TABLE samples (device_id TEXT NOT NULL, ts_s DOUBLE PRECISION NOT NULL, "
                         "metrics JSONB NOT NULL, PRIMARY KEY (device_id, ts_s)) PARTITION BY RANGE (ts_s)")
            self._partition_days.clear()
            days = [int(d) for (d,) in self.query(f"SELECT DISTINCT FLOOR(ts_s / {DAY_S}) FROM samples_unpartitioned")]
            for day in days:
                self._create_partition(day)
            self.execute("INSERT INTO samples SELECT device_id, ts_s, metrics FROM samples_unpartitioned")
            self.execute("DROP TABLE samples_unpartitioned")
        log.log(logging.WARNING if count else logging.INFO, "store postgresql: converted the unpartitioned "
                "samples table (%d rows) into %d daily partitions", count, len(days))

    def _create_partition(self, day: int) -> None:
        name = f"samples_d{datetime.fromtimestamp(day * DAY_S, timezone.utc):%Y%m%d}"
        with self.conn.transaction():   # a savepoint: a collector racing us to the same day is not an error
            self.execute(f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF samples "
                         f"FOR VALUES FROM ({day * DAY_S}) TO ({(day + 1) * DAY_S})")
        self._partition_days.add(day)

    def ensure_partitions(self, timestamps_s: Iterable[float]) -> None:
        """The daily partitions these sample times fall into (and the next day's) exist afterwards."""
        for day in {int(math.floor(ts / DAY_S)) for ts in timestamps_s}:
            for d in range(day, day + PARTITION_AHEAD_DAYS + 1):
                if d not in self._partition_days:
                    self._create_partition_retrying(d)

    def _create_partition_retrying(self, day: int) -> None:
        import psycopg

        try:
            self._create_partition(day)
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
            self._partition_days.add(day)   # made by another collector between our check and our CREATE

    def partitions(self) -> list[tuple[str, float, float]]:
        """(name, from_s, to_s) of every samples partition, oldest first (PostgreSQL)."""
        rows = self.query("SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                          "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'samples'::regclass")
        out = []
        for name, bound in rows:
            lo, hi = re.findall(r"\('?([-0-9.e+]+)'?\)", bound)
            out.append((str(name), float(lo), float(hi)))
        return sorted(out, key=lambda r: r[1])

    def apply_retention(self, retention_s: float, now_s: float | None = None) -> dict[str, int]:
        """Forget samples older than ``retention_s`` and message ids that arrived before then.

        PostgreSQL drops whole daily partitions that end before the cut-off (no
        row-by-row delete, no bloat): a partition is kept until all of it is old.
        SQLite deletes the rows.
        """
        cutoff = (time.time() if now_s is None else now_s) - retention_s
        dropped = {"partitions": 0, "samples": 0, "messages": 0}
        with self.transaction():
            if self.is_postgres:
                for name, lo, hi in self.partitions():
                    if hi <= cutoff:
                        dropped["samples"] += int(self.one(f"SELECT COUNT(*) FROM {name}")[0])
                        self.execute(f"DROP TABLE {name}")
                        self._partition_days.discard(int(lo // DAY_S))
                        dropped["partitions"] += 1
            else:
                dropped["samples"] = max(int(self.execute("DELETE FROM samples WHERE ts_s < ?", (cutoff,)).rowcount), 0)
            dropped["messages"] = max(int(self.execute("DELETE FROM messages WHERE received_s < ?",
                                                       (cutoff,)).rowcount), 0)
        if any(dropped.values()):
            log.info("retention %.0f s: dropped %s", retention_s, dropped)
        return dropped

    # -- counters ------------------------------------------------------------------------
    def bump(self, deltas: Mapping[str, int]) -> None:
        rows = [(k, int(v)) for k, v in deltas.items() if v]
        if not rows:
            return
        with self.transaction():
            self.executemany("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) "
                             "DO UPDATE SET value = counters.value + excluded.value", rows)

    def counters(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.query("SELECT name, value FROM counters ORDER BY name")}

    # -- reading -------------------------------------------------------------------------
    def devices(self) -> list[dict[str, Any]]:
        rows = self.query("SELECT d.device_id, d.first_seen_s, d.last_seen_s, "
                          "(SELECT COUNT(*) FROM samples s WHERE s.device_id = d.device_id) "
                          "FROM devices d ORDER BY d.device_id")
        return [{"device_id": r[0], "first_seen_s": r[1], "last_seen_s": r[2], "samples": int(r[3])} for r in rows]

    def samples(self, device_id: str, since_s: float | None = None, until_s: float | None = None,
                limit: int | None = None) -> list[tuple[float, dict[str, float]]]:
        """(ts_s, {metric: value}) oldest first; ``limit`` keeps the newest rows."""
        where, params = ["device_id = ?"], [device_id]
        if since_s is not None:
            where.append("ts_s >= ?")
            params.append(since_s)
        if until_s is not None:
            where.append("ts_s < ?")
            params.append(until_s)
        cond = " AND ".join(where)
        if limit is None:
            text = f"SELECT ts_s, metrics FROM samples WHERE {cond} ORDER BY ts_s"
        else:
            text = (f"SELECT ts_s, metrics FROM (SELECT ts_s, metrics FROM samples WHERE {cond} "
                    "ORDER BY ts_s DESC LIMIT ?) t ORDER BY ts_s")
            params.append(int(limit))
        return [(float(ts), self.unjson(values)) for ts, values in self.query(text, params)]

    def sample_range(self, device_id: str) -> tuple[int, float | None, float | None]:
        row = self.one("SELECT COUNT(*), MIN(ts_s), MAX(ts_s) FROM samples WHERE device_id = ?", (device_id,))
        return int(row[0]), row[1], row[2]

    def twin(self, device_id: str) -> dict[str, Any] | None:
        row = self.one("SELECT reported FROM twin WHERE device_id = ?", (device_id,))
        return None if row is None else dict(self.unjson(row[0]))

    def twins(self) -> dict[str, dict[str, Any]]:
        return {d: dict(self.unjson(r)) for d, r in self.query("SELECT device_id, reported FROM twin")}

    def forecasts(self, device_id: str, since_s: float | None = None) -> list[dict[str, Any]]:
        params: list[Any] = [device_id]
        text = "SELECT doc FROM forecasts WHERE device_id = ?"
        if since_s is not None:
            text += " AND origin_s >= ?"
            params.append(since_s)
        return [dict(self.unjson(r[0])) for r in self.query(text + " ORDER BY origin_s", params)]

    def model_events(self, device_id: str | None = None) -> list[dict[str, Any]]:
        if device_id is None:
            rows = self.query("SELECT doc FROM model_events ORDER BY ts_s")
        else:
            rows = self.query("SELECT doc FROM model_events WHERE device_id = ? ORDER BY ts_s", (device_id,))
        return [dict(self.unjson(r[0])) for r in rows]

    def message_count(self, kind: str | None = None) -> int:
        if kind is None:
            return int(self.one("SELECT COUNT(*) FROM messages")[0])
        return int(self.one("SELECT COUNT(*) FROM messages WHERE kind = ?", (kind,))[0])

    # -- anomalies -----------------------------------------------------------------------
    def _anomaly_filters(self, device_id: str | None, severities: Sequence[str] | None,
                         since_s: float | None) -> tuple[list[str], list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        if device_id:
            where.append("a.device_id = ?")
            params.append(device_id)
        if severities:
            where.append(f"a.severity IN ({', '.join('?' * len(severities))})")
            params.extend(severities)
        if since_s is not None:
            where.append("COALESCE(a.ended_s, a.started_s, a.ts_s) >= ?")
            params.append(since_s)
        return where, params

    def anomaly_episodes(self, device_id: str | None = None, severities: Sequence[str] | None = None,
                         since_s: float | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """The latest message of each episode (device, event id), newest episode first."""
        where, params = self._anomaly_filters(device_id, severities, since_s)
        where.insert(0, "a.seq = (SELECT b.seq FROM anomalies b WHERE b.device_id = a.device_id AND "
                        "b.event_id = a.event_id ORDER BY b.ts_s DESC, b.seq DESC LIMIT 1)")
        text = (f"SELECT a.seq, a.doc, a.received_s FROM anomalies a WHERE {' AND '.join(where)} "
                "ORDER BY COALESCE(a.started_s, a.ts_s) DESC, a.seq DESC")
        if limit:
            text += " LIMIT ?"
            params.append(int(limit))
        return [{"seq": int(s), "received_s": r, **self.unjson(d)} for s, d, r in self.query(text, params)]

    def anomaly_messages_after(self, seq: int, device_id: str | None = None,
                               severities: Sequence[str] | None = None,
                               since_s: float | None = None) -> list[dict[str, Any]]:
        """Every anomaly message stored after ``seq``, in arrival order (``alerts --follow``)."""
        where, params = self._anomaly_filters(device_id, severities, since_s)
        where.insert(0, "a.seq > ?")
        params.insert(0, int(seq))
        text = f"SELECT a.seq, a.doc, a.received_s FROM anomalies a WHERE {' AND '.join(where)} ORDER BY a.seq"
        return [{"seq": int(s), "received_s": r, **self.unjson(d)} for s, d, r in self.query(text, params)]

    def last_anomaly_seq(self) -> int:
        return int(self.one("SELECT COALESCE(MAX(seq), 0) FROM anomalies")[0])

    # -- labels (operator-marked anomaly windows: precision on labelled events) ------------
    def add_label(self, device_id: str, start_s: float, end_s: float, label: str = "anomaly") -> None:
        if end_s < start_s:
            raise ValueError("a label ends after it starts")
        with self.transaction():
            self.execute("INSERT INTO labels (device_id, start_s, end_s, label, created_s) VALUES (?, ?, ?, ?, ?)",
                         (device_id, start_s, end_s, label, time.time()))

    def labels(self, device_id: str, since_s: float | None = None,
               until_s: float | None = None) -> list[tuple[float, float, str]]:
        text, params = "SELECT start_s, end_s, label FROM labels WHERE device_id = ?", [device_id]
        if since_s is not None:
            text += " AND end_s >= ?"
            params.append(since_s)
        if until_s is not None:
            text += " AND start_s <= ?"
            params.append(until_s)
        return [(float(a), float(b), str(c)) for a, b, c in self.query(text + " ORDER BY start_s", params)]

    # -- the origin's shadow history ---------------------------------------------------------
    def shadow_rows(self, device_id: str, since_s: float | None = None, until_s: float | None = None,
                    table: str = "device_shadow_history") -> list[tuple[float, dict[str, float]]]:
        """Rows of ``device_shadow_history(device_uuid, timestamp, reported_state)`` as samples.

        ``timestamp`` may be a timestamp(tz) or epoch seconds/milliseconds;
        ``reported_state`` the reported mapping, flat ("system.cpuUsage") or nested,
        optionally wrapped in {"state": {"reported": ...}}. Non-numeric values are dropped.
        """
        name = _quote_table(table)
        kind = self._column_type(table, "timestamp")
        if kind is None:
            raise StoreError(f"no table {table} with a 'timestamp' column in {self.dialect} store")
        where, params = ["CAST(device_uuid AS TEXT) = ?"], [device_id]
        numeric = not kind.startswith("timestamp")
        if self.is_postgres and not numeric:
            zone = "" if "with time zone" in kind else " AT TIME ZONE 'UTC'"
            if since_s is not None:
                where.append(f'"timestamp" >= (to_timestamp(?){zone})')
                params.append(since_s)
            if until_s is not None:
                where.append(f'"timestamp" < (to_timestamp(?){zone})')
                params.append(until_s)
        rows = self.query(f'SELECT "timestamp", reported_state FROM {name} WHERE {" AND ".join(where)} '
                          'ORDER BY "timestamp"', params)
        out: list[tuple[float, dict[str, float]]] = []
        for ts_raw, state in rows:
            ts = iso_to_s(ts_raw)
            if ts is None:
                continue
            if isinstance(ts_raw, (int, float)) and ts > 1e11:   # epoch milliseconds
                ts /= 1000.0
            if (since_s is not None and ts < since_s) or (until_s is not None and ts >= until_s):
                continue
            values = flatten_numeric(unwrap_reported(state))
            if values:
                out.append((ts, values))
        return out

    def _column_type(self, table: str, column: str) -> str | None:
        if self.is_postgres:
            schema, _, tname = table.rpartition(".")
            row = self.one("SELECT data_type FROM information_schema.columns WHERE table_name = ? "
                           "AND column_name = ? AND (? = '' OR table_schema = ?)",
                           (tname, column, schema, schema))
            return None if row is None else str(row[0]).lower()
        import sqlite_utils   # its declared-type mapping replaces reading PRAGMA table_info by hand

        _quote_table(table)   # the same name check as PostgreSQL's
        db = sqlite_utils.Database(self.conn, recursive_triggers=False, execute_plugins=False)
        kind = db.table(table).columns_dict.get(column) if db.table(table).exists() else None
        return None if kind is None else "numeric" if kind in (int, float) else "text"


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _quote_table(table: str) -> str:
    parts = table.split(".")
    if not 1 <= len(parts) <= 2 or not all(_IDENT.match(p) for p in parts):
        raise StoreError(f"bad table name {table!r}")
    return ".".join(f'"{p}"' for p in parts)


# -- opening ---------------------------------------------------------------------------------
def sqlite_path(url: str) -> str:
    """sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db, a plain path stays as it is."""
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///"):]
    if url.startswith("sqlite://"):
        raise StoreError(f"bad sqlite URL {url!r}: use sqlite:///relative.db or sqlite:////absolute.db")
    return url


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def open_store(url: str, busy_timeout_s: float = 30.0) -> Store:
    if url.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg
        except ImportError:
            raise StoreError("a postgresql:// store needs the psycopg driver: pip install 'psycopg[binary]' "
                             "(the edge-agent 'fleet' extra)") from None
        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(busy_timeout_s)))
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to {redact(url)}: {str(exc).strip().splitlines()[0]}") from None
        return Store(conn, "postgresql", url)
    if "://" in url and not url.startswith("sqlite:"):
        raise StoreError(f"unsupported store URL {redact(url)!r}: use sqlite:///PATH or postgresql://...")
    path = sqlite_path(url)
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_s, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}") from None
    return Store(conn, "sqlite", url)
