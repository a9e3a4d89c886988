"""Periodic reports to the twin: telemetry batches and the reported state.

Samples are batched (one message a minute by default) because a message per
sample on a metered uplink costs more in headers than in data; the twin state
is a retained snapshot, re-sent on a schedule and whenever someone asks
(``report-now``).  What the message looks like is ``agent.payloads``' job;
when it goes out is this module's.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from agent import __version__, payloads
from agent.outbox import PRIORITY_LOW
from agent.sampling import Sample

log = logging.getLogger(__name__)


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
        self._batch: list[tuple[float, dict[str, float]]] = []
        self._last_sample: Sample | None = None
        self._next_telemetry: float | None = None
        self._next_twin: float | None = None
        self.telemetry_sent = 0
        self.twin_sent = 0

    def start(self, ctx: Any) -> None:
        self._ctx = ctx

    def on_sample(self, sample: Sample) -> None:
        self._batch.append((sample.ts_s, sample.values))
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

    def send_telemetry(self) -> None:
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        msg = payloads.telemetry_batch(self._ctx.config.device_id, self._ctx.clock.time(), batch,
                                       interval_s=self._ctx.daemon.interval_s)
        self._ctx.emit("telemetry", msg, PRIORITY_LOW)
        self.telemetry_sent += 1

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
        self.send_telemetry()  # the last partial batch goes to the outbox, not to the void

    def status(self) -> dict[str, Any]:
        return {"reporter": {"telemetry_sent": self.telemetry_sent, "twin_sent": self.twin_sent}}
