"""Periodic reports to the twin: telemetry batches and the reported state.

Samples are batched (one message a minute by default, ``mqtt.telemetry_interval_s``)
because a message per sample on a metered uplink costs more in headers than in
data; the twin state is a retained snapshot, re-sent on a schedule and whenever
someone asks (``report-now``).  What the message looks like is
``agent.payloads``' job; when it goes out is this module's.

Telemetry holds nothing in memory.  It is driven by a durable cursor over the
samples table: the seq of the last sample handed to the outbox, stored in
``agent_state`` in the same transaction as the outbox row that carries it.
The outbox deletes that row only on the broker's PUBACK, so after any crash
(kill -9, power cut) the samples up to the cursor are in the outbox or at the
broker, and the samples after it are read again from the table: a restart
resumes exactly where durable state stops, with nothing lost and nothing sent
twice.  Only committed samples are read (the store's batch commit decides how
fresh a batch is); on a clean stop the store is flushed first and the final
batch is queued, and the publisher drains it before it disconnects.
"""
from __future__ import annotations

import itertools
import logging
import sqlite3
from typing import Any, Callable

from agent import __version__, payloads
from agent.outbox import PRIORITY_LOW
from agent.sampling import Sample
from agent.store import RateLimitedLog

log = logging.getLogger(__name__)

CURSOR_KEY = "telemetry_cursor"
MAX_BATCH_ROWS = 300        # ~100 KB of JSON at 25 metrics: well under outbox.max_message_bytes
MAX_BATCHES_PER_TICK = 20   # a backlog (after a disk-full spell) drains over a few intervals


class Reporter:
    name = "reporter"

    def __init__(self, telemetry_interval_s: float = 60.0, twin_interval_s: float = 60.0,
                 health: Callable[[], dict[str, Any]] | None = None,
                 models: Callable[[], list[dict[str, Any]]] | None = None,
                 extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self.telemetry_interval_s = telemetry_interval_s
        self.twin_interval_s = twin_interval_s
        self._health = health or (lambda: {})
        self._models = models or (lambda: [])
        self._extra = extra or (lambda: {})
        self._cursor: int | None = None
        self._last_sample: Sample | None = None
        self._next_telemetry: float | None = None
        self._next_twin: float | None = None
        self._errors = RateLimitedLog(log)
        self.telemetry_sent = 0
        self.samples_sent = 0
        self.samples_skipped = 0  # a single sample too large for any message (never in practice)
        self.write_errors = 0
        self.twin_sent = 0

    def start(self, ctx: Any) -> None:
        self._ctx = ctx
        self._load_cursor()

    def _load_cursor(self) -> bool:
        """Read the cursor; on the first start ever, begin at the newest stored sample (history
        from before telemetry existed is not replayed) and persist that at once, so samples of
        a first run killed before its first batch are still sent after the restart."""
        if self._cursor is not None:
            return True
        store = self._ctx.store
        try:
            cursor = store.get_state(CURSOR_KEY)
            if cursor is None:
                cursor = store.max_seq()
                with store.transaction() as conn:
                    store.set_state(CURSOR_KEY, cursor, conn)
        except sqlite3.Error as exc:
            self.write_errors += 1
            self._errors.warning("cursor", "telemetry cursor unavailable (%s); telemetry waits", exc)
            return False
        self._cursor = int(cursor)
        return True

    def on_sample(self, sample: Sample) -> None:
        self._last_sample = sample

    def report_now(self) -> None:
        """Send the twin state and the pending telemetry at the next tick."""
        self._next_twin = self._next_telemetry = 0.0

    def tick(self, now_mono_s: float) -> None:
        if self._next_telemetry is None:
            # First reports one period after start, so the first batch is a full one.
            self._next_telemetry = now_mono_s + self.telemetry_interval_s
            self._next_twin = now_mono_s + min(5.0, self.twin_interval_s)
        if now_mono_s >= self._next_telemetry:
            self._next_telemetry = now_mono_s + self.telemetry_interval_s
            self.send_telemetry()
        if self._next_twin is not None and now_mono_s >= self._next_twin:
            self._next_twin = now_mono_s + self.twin_interval_s
            self.send_twin()

    def send_telemetry(self, max_batches: int | None = MAX_BATCHES_PER_TICK) -> int:
        """Queue the committed samples after the cursor, in batches; returns how many were queued.
        ``max_batches=None`` drains the whole backlog (at stop)."""
        daemon = self._ctx.daemon
        if not daemon.can_emit_atomic or not self._load_cursor():
            return 0  # no publisher (mqtt disabled): the cursor stays, nothing is owed yet
        sent = 0
        rounds = itertools.count() if max_batches is None else range(max_batches)
        for _ in rounds:
            n, more = self._send_batch(MAX_BATCH_ROWS)
            sent += n
            if not more:
                break
        return sent

    def _send_batch(self, limit: int) -> tuple[int, bool]:
        """(samples queued, whether more may follow right away)."""
        assert self._cursor is not None
        store = self._ctx.store
        try:
            rows = store.rows_after(self._cursor, limit)
            if not rows and store.max_seq() < self._cursor:
                # The table was emptied (seq restarts at 1 in an empty table): follow it.
                log.warning("samples table restarted below the telemetry cursor %d; following it", self._cursor)
                self._cursor = 0
                rows = store.rows_after(0, limit)
        except sqlite3.Error as exc:
            self._errors.warning("read", "cannot read samples for telemetry: %s", exc)
            return 0, False
        more = len(rows) == limit
        max_bytes = self._ctx.config.outbox.max_message_bytes
        while rows:
            first, last = rows[0][0], rows[-1][0]
            msg = payloads.telemetry_batch(self._ctx.config.device_id, self._ctx.clock.time(),
                                           [(ts, values) for _, ts, values in rows],
                                           interval_s=self._ctx.daemon.interval_s, seq_range=(first, last))
            if len(rows) > 1 and len(payloads.encode(msg)) > max_bytes:
                rows = rows[: len(rows) // 2]  # too large for one outbox message: fewer rows per batch
                more = True
                continue
            try:
                mid = self._ctx.daemon.emit_atomic(
                    "telemetry", msg, PRIORITY_LOW, lambda conn: store.set_state(CURSOR_KEY, last, conn))
            except sqlite3.Error as exc:  # disk full or read-only: the samples stay after the cursor
                self.write_errors += 1
                self._errors.warning("write", "telemetry not queued (%s); retried next interval", exc)
                return 0, False
            if mid is None:  # refused by the outbox as too large: send fewer rows per message
                if len(rows) > 1:
                    rows = rows[: len(rows) // 2]
                    more = True
                    continue
                self._skip(last)
                return 0, True
            self._cursor = last
            self.telemetry_sent += 1
            self.samples_sent += len(rows)
            return len(rows), more
        return 0, False

    def _skip(self, seq: int) -> None:
        store = self._ctx.store
        try:
            with store.transaction() as conn:
                store.set_state(CURSOR_KEY, seq, conn)
        except sqlite3.Error:
            return
        self._cursor = seq
        self.samples_skipped += 1
        log.error("sample %d is too large for a telemetry message; skipped", seq)

    def send_twin(self) -> None:
        if self._last_sample is None:
            return
        msg = payloads.twin_reported(
            self._ctx.config.device_id, self._ctx.clock.time(), self._last_sample.values,
            health=self._health(), models=self._models(), agent_version=__version__, extra=self._extra(),
        )
        self._ctx.emit("twin", msg, PRIORITY_LOW)
        self.twin_sent += 1

    def stop(self) -> None:
        # Commit what the store still holds, then queue it: the final batch leaves before the publisher
        # (stopped after this component) disconnects, or waits in the outbox for the next start.
        self._ctx.store.flush()
        self.send_telemetry(max_batches=None)

    def status(self) -> dict[str, Any]:
        return {"reporter": {"telemetry_sent": self.telemetry_sent, "samples_sent": self.samples_sent,
                             "cursor_seq": self._cursor, "write_errors": self.write_errors,
                             "samples_skipped": self.samples_skipped, "twin_sent": self.twin_sent}}
