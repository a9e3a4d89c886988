"""The ``events`` table: anomaly episodes, exhaustion warnings, model decisions.

An event is stored as its whole JSON document plus the columns people filter
on.  Opening and closing an episode commits at once (its own transaction): an
alert must survive a power cut even if the samples around it are still in the
batch.  The row is upserted by id, so an episode's open / update / close
states collapse into one row that always holds the latest view.
"""
from __future__ import annotations

import collections
import json
import logging
import sqlite3
from typing import Any, Iterator

from agent.store import RateLimitedLog, Store

log = logging.getLogger(__name__)

MIGRATIONS = [
    """
    CREATE TABLE events (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        severity TEXT,
        state TEXT,
        started_at REAL,
        ended_at REAL,
        updated_at REAL NOT NULL,
        detector TEXT,
        model_version INTEGER,
        doc TEXT NOT NULL
    );
    CREATE INDEX events_started ON events (started_at);
    CREATE INDEX events_kind ON events (kind, state)
    """,
]


class EventLog:
    def __init__(self, store: Store, max_rows: int = 10_000) -> None:
        self._store = store
        self.max_rows = max_rows
        self.counts: collections.Counter[str] = collections.Counter()  # opened episodes by severity
        self.write_errors = 0
        self._errors = RateLimitedLog(log)  # a full disk fails every record: one line a minute, with a count
        store.migrate("events", MIGRATIONS)

    def record(self, event: dict[str, Any], now_s: float) -> bool:
        """Persist an event durably; returns False (logged, counted) if the disk refused."""
        if event.get("action") == "open":
            self.counts[str(event.get("severity"))] += 1
        row = (
            event["id"], event.get("kind", "anomaly"), event.get("severity"), event.get("state"),
            event.get("start_ts_s"), event.get("end_ts_s"), now_s, event.get("detector"),
            event.get("model_version"), json.dumps(event, default=float),
        )
        try:
            with self._store.transaction() as conn:
                conn.execute(
                    "INSERT INTO events (id, kind, severity, state, started_at, ended_at, updated_at, detector, "
                    "model_version, doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                    "severity = excluded.severity, state = excluded.state, ended_at = excluded.ended_at, "
                    "updated_at = excluded.updated_at, detector = excluded.detector, "
                    "model_version = excluded.model_version, doc = excluded.doc",
                    row,
                )
        except sqlite3.Error as exc:
            self.write_errors += 1
            self._errors.warning("record", "cannot store event %s (%s): %s", event["id"], event.get("kind"), exc)
            return False
        return True

    def trim(self) -> int:
        """Keep the newest ``max_rows`` events (open ones are never trimmed)."""
        with self._store.transaction() as conn:
            return conn.execute(
                "DELETE FROM events WHERE state IS NOT 'open' AND id NOT IN "
                "(SELECT id FROM events ORDER BY updated_at DESC LIMIT ?)",
                (self.max_rows,),
            ).rowcount

    def iter_events(self, since_s: float | None = None, kind: str | None = None) -> Iterator[dict[str, Any]]:
        sql, args = "SELECT doc FROM events WHERE 1 = 1", []
        if since_s is not None:
            sql += " AND coalesce(ended_at, updated_at) >= ?"
            args.append(since_s)
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        for (doc,) in self._store.conn.execute(sql + " ORDER BY started_at", args):
            yield json.loads(doc)

    def anomalous_spans(self, since_s: float | None = None) -> list[tuple[float, float]]:
        """(start, end) of anomaly episodes, so training can leave those samples out."""
        spans = []
        for ev in self.iter_events(since_s, kind="anomaly"):
            start = ev.get("start_ts_s")
            end = ev.get("end_ts_s")
            if start is not None:
                spans.append((float(start), float(end) if end is not None else float("inf")))
        return spans
