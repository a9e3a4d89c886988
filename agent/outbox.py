"""The SQLite outbox: every outbound message is stored here before it is published.

Rows are deleted only when the broker acknowledged them (QoS 1 PUBACK), so a
message survives broker outages and agent restarts; delivery is at least once
and receivers drop duplicates by `messageId`.

Durability: each `put` is its own small transaction, committed before `put`
returns, rather than riding the store's batched flush.  A message that only
lived in a flush participant's memory could be lost by kill -9 while the
caller believes it was queued, and publishing rows that are not yet committed
would break the invariant "every in-flight message is a committed row".  The
cost is low: the outbox sees a few messages a minute, and in WAL mode with
synchronous=NORMAL a commit is an append to the WAL, not an fsync.  Deletes
of acknowledged rows are grouped: one transaction per drain round.

Order: drained by priority class (higher `priority` first), then age (row id,
oldest first).  Bounds (rows and bytes): when full, rows are dropped by kind
rank (telemetry first, then twin, forecast, other kinds, model events,
command responses, anomalies last), then lower priority, then oldest; rows
in flight are never dropped.  What was dropped is counted per kind in
`outbox_counters`, in the same transaction as the delete.
"""
from __future__ import annotations

import contextlib
import logging
import sqlite3
from dataclasses import dataclass
from typing import Callable, Collection, Mapping

from agent.store import RateLimitedLog, immediate_transaction, migrate as store_migrate

log = logging.getLogger(__name__)

COMPONENT = "outbox"

PRIORITY_LOW = 0        # telemetry, twin: the next one supersedes it
PRIORITY_NORMAL = 50    # forecasts, model events
PRIORITY_HIGH = 100     # anomalies, command responses

# Lower rank is dropped first when the outbox is full.
DROP_RANK: Mapping[str, int] = {
    "telemetry": 0,
    "twin": 1,
    "forecast": 2,
    "model": 4,
    "command_response": 5,
    "anomaly": 9,
}
DEFAULT_DROP_RANK = 3

MIGRATIONS = [
    """
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        message_id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        priority INTEGER NOT NULL,
        drop_rank INTEGER NOT NULL,
        size_bytes INTEGER NOT NULL,
        created_at_s REAL NOT NULL
    );
    CREATE INDEX outbox_drain ON outbox (priority DESC, id);
    CREATE INDEX outbox_drop ON outbox (drop_rank, priority, id);
    CREATE TABLE outbox_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)
    """,
]


@dataclass(frozen=True)
class OutboxParams:
    max_rows: int = 10_000
    max_bytes: int = 16 * 1024 * 1024
    max_message_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.max_bytes < 1 or self.max_message_bytes < 1:
            raise ValueError("outbox bounds must be positive")


@dataclass(frozen=True)
class OutboxMessage:
    row_id: int
    message_id: str
    kind: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    priority: int
    size_bytes: int
    created_at_s: float


_COLUMNS = "id, message_id, kind, topic, payload, qos, retain, priority, size_bytes, created_at_s"


def _row(r: tuple) -> OutboxMessage:
    return OutboxMessage(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], bool(r[6]), r[7], r[8], r[9])


class Outbox:
    """Bounded persistent queue over one table; main-loop thread only.

    Depth and bytes are kept in memory (loaded once at open) so status and
    bound checks cost no query.
    """

    def __init__(self, conn: sqlite3.Connection, params: OutboxParams = OutboxParams(),
                 *, migrate: Callable[[str, list[str]], int] | None = None) -> None:
        self._conn = conn
        self.params = params
        if migrate is None:
            store_migrate(conn, COMPONENT, MIGRATIONS)
        else:
            migrate(COMPONENT, MIGRATIONS)
        self.depth, self.bytes = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM outbox").fetchone()
        self._counters: dict[str, int] = dict(conn.execute("SELECT name, value FROM outbox_counters"))
        # Row ids the publisher has handed to the broker; never dropped.
        self.protected: Collection[int] = ()
        self._full_log = RateLimitedLog(log, period_s=300.0)

    # -- transactions ---------------------------------------------------------------
    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate_transaction(self._conn)

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A transaction on the outbox's connection that ``put`` joins: a caller's own write
        (a telemetry cursor) commits with the message or not at all."""
        return self._transaction()

    def recount(self) -> None:
        """Re-read depth and bytes after an enclosing transaction rolled back a counted put."""
        with contextlib.suppress(sqlite3.Error):
            self.depth, self.bytes = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM outbox").fetchone()

    def _count(self, conn: sqlite3.Connection, deltas: Mapping[str, int]) -> None:
        conn.executemany(
            "INSERT INTO outbox_counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            [(k, v) for k, v in deltas.items() if v])

    # -- writing --------------------------------------------------------------------
    def put(self, kind: str, topic: str, payload: bytes, *, message_id: str, priority: int,
            created_at_s: float, qos: int = 1, retain: bool = False) -> bool:
        """Store one message durably; False when it was refused (too large, or a
        duplicate message id).  Raises sqlite3.Error when the disk refuses."""
        size = len(payload)
        if size > self.params.max_message_bytes or size > self.params.max_bytes:
            log.warning("outbox: %s message %s of %d bytes exceeds the limit; dropped",
                        kind, message_id, size)
            with self._transaction() as conn:
                self._count(conn, {"dropped": 1, f"dropped.{kind}": 1, "refused": 1})
            self._bump({"dropped": 1, f"dropped.{kind}": 1, "refused": 1})
            return False
        dropped: dict[str, int] = {}
        with self._transaction() as conn:
            try:
                conn.execute(
                    "INSERT INTO outbox (message_id, kind, topic, payload, qos, retain, priority, "
                    "drop_rank, size_bytes, created_at_s) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (message_id, kind, topic, payload, qos, int(retain), priority,
                     DROP_RANK.get(kind, DEFAULT_DROP_RANK), size, created_at_s))
            except sqlite3.IntegrityError:
                log.info("outbox: message %s already queued", message_id)
                return False
            depth, nbytes = self.depth + 1, self.bytes + size
            if depth > self.params.max_rows or nbytes > self.params.max_bytes:
                depth, nbytes, dropped = self._drop_excess(conn, depth, nbytes)
                self._count(conn, dropped)
        self.depth, self.bytes = depth, nbytes
        self._bump(dropped)
        if dropped:
            self._full_log.warning("full", "outbox full (%d rows, %d bytes): dropping the least important "
                                   "oldest messages; %d dropped in total", depth, nbytes, self.dropped)
        return True

    def _drop_excess(self, conn: sqlite3.Connection, depth: int,
                     nbytes: int) -> tuple[int, int, dict[str, int]]:
        protected = set(self.protected)
        dropped: dict[str, int] = {}
        victims: list[tuple[int]] = []
        cursor = conn.execute(
            "SELECT id, kind, size_bytes FROM outbox ORDER BY drop_rank, priority, id")
        for row_id, kind, size in cursor:
            if depth <= self.params.max_rows and nbytes <= self.params.max_bytes:
                break
            if row_id in protected:
                continue
            victims.append((row_id,))
            depth -= 1
            nbytes -= size
            dropped["dropped"] = dropped.get("dropped", 0) + 1
            dropped[f"dropped.{kind}"] = dropped.get(f"dropped.{kind}", 0) + 1
        cursor.close()
        conn.executemany("DELETE FROM outbox WHERE id = ?", victims)
        return depth, nbytes, dropped

    def _bump(self, deltas: Mapping[str, int]) -> None:
        for k, v in deltas.items():
            self._counters[k] = self._counters.get(k, 0) + v

    def delete(self, rows: Mapping[int, int], *, counter: str | None = None) -> int:
        """Delete acknowledged rows (row id -> size_bytes) in one transaction;
        returns how many were still there (a row may have been dropped meanwhile)."""
        if not rows:
            return 0
        deleted = freed = 0
        with self._transaction() as conn:
            for row_id, size in rows.items():
                if conn.execute("DELETE FROM outbox WHERE id = ?", (row_id,)).rowcount:
                    deleted += 1
                    freed += size
            if counter:
                self._count(conn, {counter: len(rows)})
        self.depth -= deleted
        self.bytes -= freed
        if counter:
            self._bump({counter: len(rows)})
        return deleted

    # -- reading --------------------------------------------------------------------
    def next_batch(self, limit: int, exclude: Collection[int] = ()) -> list[OutboxMessage]:
        """The next `limit` rows in drain order, skipping `exclude` (rows in flight)."""
        if limit <= 0 or self.depth <= len(exclude):
            return []
        if exclude:
            marks = ",".join("?" * len(exclude))
            sql = (f"SELECT {_COLUMNS} FROM outbox WHERE id NOT IN ({marks}) "
                   "ORDER BY priority DESC, id LIMIT ?")
            args: tuple = (*exclude, limit)
        else:
            sql = f"SELECT {_COLUMNS} FROM outbox ORDER BY priority DESC, id LIMIT ?"
            args = (limit,)
        return [_row(r) for r in self._conn.execute(sql, args)]

    def all(self) -> list[OutboxMessage]:
        return [_row(r) for r in self._conn.execute(
            f"SELECT {_COLUMNS} FROM outbox ORDER BY priority DESC, id")]

    @property
    def dropped(self) -> int:
        return self._counters.get("dropped", 0)

    def counter(self, name: str) -> int:
        return self._counters.get(name, 0)

    def stats(self) -> dict:
        return {
            "depth": self.depth,
            "bytes": self.bytes,
            "dropped": self.dropped,
            "dropped_by_kind": {k.split(".", 1)[1]: v for k, v in sorted(self._counters.items())
                                if k.startswith("dropped.")},
            "refused": self._counters.get("refused", 0),
            "rejected": self._counters.get("rejected", 0),
            "max_rows": self.params.max_rows,
            "max_bytes": self.params.max_bytes,
        }
