"""The SQLite buffer: samples, plus the schema and commit machinery other tables share.

Plain ``sqlite3`` rather than sqlite-utils: the hot path is one prepared INSERT
per sample inside a periodic transaction, and sqlite-utils would add an import
(and its click dependency) to a daemon that must stay under 30 MB for no gain.

Layout: one row per sample, one REAL column per metric.  A wide row costs
~8 bytes per metric, where a JSON blob would repeat every metric name in every
row (about 5x larger at 1 Hz); per-metric reads for charts and training stay
simple column scans.  A column is added the first time a metric appears, so a
device with more mounts or a temperature sensor needs no migration.

Commits are batched (``commit_interval_s``) so an SD card sees one commit every
few seconds; WAL with ``synchronous=NORMAL`` keeps the file consistent after a
power cut or kill -9, losing at most the uncommitted batch.  When the disk is
full or read-only the samples wait in a bounded memory buffer and are retried.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from agent.sampling import Sample

log = logging.getLogger(__name__)

SAMPLES_MIGRATIONS = [
    """
    CREATE TABLE samples (seq INTEGER PRIMARY KEY, ts_s REAL NOT NULL);
    CREATE INDEX samples_ts ON samples (ts_s);
    CREATE TABLE agent_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
]


class StoreUnavailable(sqlite3.OperationalError):
    """The database could not be opened (read-only or missing state directory)."""


class FlushParticipant(Protocol):
    def write(self, conn: sqlite3.Connection) -> None: ...
    def committed(self) -> None: ...


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@contextlib.contextmanager
def immediate_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error. Inside a transaction already open on
    ``conn`` (the store's periodic batch, whose participants write through it) it joins that one:
    its COMMIT covers these writes too."""
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        rollback(conn)
        raise
    try:
        conn.execute("COMMIT")
    except sqlite3.Error:
        rollback(conn)  # a refused COMMIT leaves the transaction open: later writes would join it
        raise


def rollback(conn: sqlite3.Connection) -> None:
    """ROLLBACK if a transaction is still open: on SQLITE_FULL SQLite may already have rolled it
    back itself, and a "cannot rollback - no transaction is active" must not hide the real error."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def migrate(conn: sqlite3.Connection, component: str, migrations: Sequence[str]) -> int:
    """Apply the scripts of ``component`` not yet applied; returns the schema version.

    Versions are kept per component so each module owns its tables without
    coordinating a global migration number.  Each script runs in its own
    transaction together with the version bump, so a crash never leaves a
    half-applied step.
    """
    conn.execute("CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    row = conn.execute("SELECT version FROM schema_versions WHERE component = ?", (component,)).fetchone()
    version = row[0] if row else 0
    if version > len(migrations):
        raise RuntimeError(f"database schema of {component} is v{version}, newer than this agent (v{len(migrations)})")
    for number, script in enumerate(migrations[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in (s.strip() for s in script.split(";")):
                if statement:
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_versions (component, version) VALUES (?, ?) "
                "ON CONFLICT(component) DO UPDATE SET version = excluded.version",
                (component, number),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("migrated %s schema to v%d", component, number)
        version = number
    return version


def time_range(since_s: float | None, until_s: float | None) -> tuple[str, list[float]]:
    """The WHERE condition ('' for all time) and its arguments for samples in [since_s, until_s]."""
    where, args = [], []
    if since_s is not None:
        where.append("ts_s >= ?")
        args.append(since_s)
    if until_s is not None:
        where.append("ts_s <= ?")
        args.append(until_s)
    return " AND ".join(where), args


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the pragmas every user of the agent database needs."""
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=5.0, check_same_thread=False)
    if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only settable before the first table
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


class RateLimitedLog:
    """Log a recurring failure at most once per period, with how often it happened meanwhile."""

    def __init__(self, logger: logging.Logger, period_s: float = 60.0) -> None:
        self._log = logger
        self._period_s = period_s
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._period_s:
            self._suppressed[key] += 1
            return
        extra = f" ({self._suppressed.pop(key)} more since last report)" if self._suppressed.get(key) else ""
        self._last[key] = now
        self._log.warning(message + extra, *args)


class Store:
    """Samples buffer over one SQLite file; the connection belongs to the main loop thread."""

    def __init__(
        self,
        path: Path,
        *,
        retention_s: float = 7 * 86400.0,
        max_db_bytes: int = 256 * 1024 * 1024,
        memory_buffer_rows: int = 3600,
    ) -> None:
        self.path = Path(path)
        self.retention_s = retention_s
        self.max_db_bytes = max_db_bytes
        self._pending: collections.deque[Sample] = collections.deque(maxlen=memory_buffer_rows)
        self._participants: list[FlushParticipant] = []
        self._columns: set[str] = set()
        self._insert_sql: dict[tuple[str, ...], str] = {}
        self._conn: sqlite3.Connection | None = None
        self._errors = RateLimitedLog(log)
        self.samples_dropped = 0
        self.write_errors = 0
        self.commits = 0
        self._migrations: list[tuple[str, Sequence[str]]] = [("samples", SAMPLES_MIGRATIONS)]
        self.try_open()

    # -- connection -----------------------------------------------------------------
    def try_open(self) -> bool:
        if self._conn is not None:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = connect(self.path)
            for component, migrations in self._migrations:
                migrate(conn, component, migrations)
            self._columns = {row[1] for row in conn.execute("PRAGMA table_info(samples)")}
        except (OSError, sqlite3.Error) as exc:
            self.write_errors += 1
            self._errors.warning("open", "cannot open database %s: %s; keeping samples in memory", self.path, exc)
            return False
        self._conn = conn
        log.info("database %s open", self.path)
        return True

    @property
    def available(self) -> bool:
        return self._conn is not None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None and not self.try_open():
            raise StoreUnavailable(f"database {self.path} is unavailable")
        assert self._conn is not None
        return self._conn

    def migrate(self, component: str, migrations: Sequence[str]) -> int:
        """Register a component's schema; re-applied automatically if the database is reopened."""
        self._migrations.append((component, migrations))
        return migrate(self.conn, component, migrations)

    def add_flush_participant(self, participant: FlushParticipant) -> None:
        self._participants.append(participant)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate, durable transaction for writes that cannot wait for the next flush."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            rollback(conn)
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error:
            rollback(conn)  # a COMMIT refused (disk full) leaves the transaction open
            raise
        self.commits += 1

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass
            self._conn.close()
            self._conn = None

    # -- writing ------------------------------------------------------------------
    def add_sample(self, sample: Sample) -> None:
        if len(self._pending) == self._pending.maxlen:
            self.samples_dropped += 1  # the deque drops the oldest; count it so status shows the loss
        self._pending.append(sample)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def _ensure_columns(self, conn: sqlite3.Connection, names: Sequence[str]) -> None:
        for name in names:
            if name not in self._columns:
                conn.execute(f"ALTER TABLE samples ADD COLUMN {quote_ident(name)} REAL")
                self._columns.add(name)

    def _insert(self, conn: sqlite3.Connection, sample: Sample) -> None:
        names = tuple(sample.values)
        sql = self._insert_sql.get(names)
        if sql is None:
            self._ensure_columns(conn, names)
            cols = ", ".join(["ts_s", *map(quote_ident, names)])
            sql = f"INSERT INTO samples ({cols}) VALUES ({', '.join('?' * (len(names) + 1))})"
            self._insert_sql[names] = sql
        conn.execute(sql, (sample.ts_s, *sample.values.values()))

    def flush(self) -> bool:
        """Commit pending samples and participants' writes in one transaction."""
        if not self._pending and not self._participants:
            return True
        try:
            conn = self.conn
        except StoreUnavailable:
            return False
        batch = list(self._pending)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for sample in batch:
                self._insert(conn, sample)
            for participant in self._participants:
                participant.write(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self.write_errors += 1
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            # A failed ALTER rolled back with the batch; forget cached columns so they are re-checked.
            self._insert_sql.clear()
            with contextlib.suppress(sqlite3.Error):
                self._columns = {row[1] for row in conn.execute("PRAGMA table_info(samples)")}
            self._errors.warning("flush", "cannot write to %s: %s; %d samples held in memory", self.path, exc, len(self._pending))
            return False
        for _ in batch:
            self._pending.popleft()
        for participant in self._participants:
            participant.committed()
        self.commits += 1
        return True

    def enforce_retention(self, now_s: float) -> int:
        """Drop samples older than the retention or beyond the size cap; returns rows deleted."""
        conn = self.conn
        deleted = 0
        with self.transaction():
            deleted += conn.execute("DELETE FROM samples WHERE ts_s < ?", (now_s - self.retention_s,)).rowcount
            used = self.used_bytes()
            if used > self.max_db_bytes:
                count = conn.execute("SELECT count(*) FROM samples").fetchone()[0]
                trim = max(1, int(count * min(0.5, (used - self.max_db_bytes) / used + 0.05)))
                deleted += conn.execute(
                    "DELETE FROM samples WHERE seq IN (SELECT seq FROM samples ORDER BY seq LIMIT ?)", (trim,)
                ).rowcount
                log.warning("database over %d bytes: trimmed %d oldest samples", self.max_db_bytes, trim)
        if deleted:
            # One sqlite3_step frees one page and Python's execute() steps once; executescript steps to the end.
            conn.executescript("PRAGMA incremental_vacuum;")
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return deleted

    def used_bytes(self) -> int:
        conn = self.conn
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages * page_size)

    def set_state(self, key: str, value: Any, conn: sqlite3.Connection | None = None) -> None:
        (conn or self.conn).execute(
            "INSERT INTO agent_state (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )

    def get_state(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM agent_state WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # -- reading --------------------------------------------------------------------
    def metric_names(self) -> list[str]:
        return [name for name in (row[1] for row in self.conn.execute("PRAGMA table_info(samples)")) if name not in ("seq", "ts_s")]

    def iter_samples(
        self,
        since_s: float | None = None,
        until_s: float | None = None,
        metrics: Sequence[str] | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> Iterator[tuple[float, dict[str, float]]]:
        """Stream committed samples in time order; absent metrics are left out of each dict."""
        conn = self.conn
        known = self.metric_names()
        names = [m for m in (metrics if metrics is not None else known) if m in known]
        cols = ", ".join(["ts_s", *map(quote_ident, names)]) if names else "ts_s"
        where, args = time_range(since_s, until_s)
        sql = f"SELECT {cols} FROM samples"
        if where:
            sql += " WHERE " + where
        sql += " ORDER BY seq DESC" if newest_first else " ORDER BY seq"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        for row in conn.execute(sql, args):
            yield row[0], {n: v for n, v in zip(names, row[1:]) if v is not None}

    def samples(
        self,
        since_s: float | None = None,
        until_s: float | None = None,
        metrics: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[tuple[float, dict[str, float]]]:
        """Oldest first; with ``limit`` the most recent ``limit`` rows (what training windows want)."""
        if limit is None:
            return list(self.iter_samples(since_s, until_s, metrics))
        rows = list(self.iter_samples(since_s, until_s, metrics, limit=limit, newest_first=True))
        rows.reverse()
        return rows

    def rows_after(self, after_seq: int, limit: int) -> list[tuple[int, float, dict[str, float]]]:
        """Committed samples with ``seq > after_seq``, oldest first, with their seq: what a
        durable cursor over the table (the telemetry reporter's) reads next."""
        names = self.metric_names()
        cols = ", ".join(["seq", "ts_s", *map(quote_ident, names)])
        rows = self.conn.execute(f"SELECT {cols} FROM samples WHERE seq > ? ORDER BY seq LIMIT ?",
                                 (int(after_seq), int(limit)))
        return [(row[0], row[1], {n: v for n, v in zip(names, row[2:]) if v is not None}) for row in rows]

    def max_seq(self) -> int:
        return int(self.conn.execute("SELECT coalesce(max(seq), 0) FROM samples").fetchone()[0])

    def latest_sample(self) -> Sample | None:
        if self._pending:
            return self._pending[-1]
        if not self.available:
            return None
        rows = list(self.iter_samples(limit=1, newest_first=True))
        return Sample(ts_s=rows[0][0], values=rows[0][1]) if rows else None

    def sample_stats(self) -> dict[str, Any]:
        count, oldest, newest = self.conn.execute("SELECT count(*), min(ts_s), max(ts_s) FROM samples").fetchone()
        return {"count": count, "oldest": oldest, "newest": newest, "pending": len(self._pending), "dropped": self.samples_dropped}
