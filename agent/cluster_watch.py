"""Daemon component "clusters": is this device still behaving like its cluster?

The fleet clusters devices by behaviour profile (``fleet.clusters``) and ships a
``cluster`` model: scaler, centroids, radii and which cluster each device was
put in. On a schedule (hourly by default) this component recomputes the
device's own profile over the last ``profile_window_s`` of buffered samples
(``models.clusters``, the very code the fleet used), measures the distance to
its cluster's centroid and reports ``clusterId`` / ``clusterDistance`` /
``clusterRadius`` in the twin.

A single check beyond the radius is not news (a busy day); a deviation is an
episode - the same state machine and publishing path as anomalies
(``models.episodes``, ``agent.events.EventLog``, the MQTT anomalies topic) -
that opens after ``stay_beyond_checks`` consecutive checks beyond the radius
and closes after ``close_after_checks`` consecutive checks inside it. Its
events table row has kind "cluster_deviation"; the MQTT message carries
``detector: "cluster"`` and ``eventKind: "cluster_deviation"``. Beyond
``critical_factor`` x the radius the episode is critical.

Reading a day of samples once an hour is cheap enough on a Pi: the rows are
streamed and subsampled to at most ``max_profile_rows`` (subsampling keeps the
distribution, which is all a profile summarises). Main-loop thread only.
"""
from __future__ import annotations

import logging
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.detection import anomaly_payload
from agent.events import EventLog
from agent.outbox import PRIORITY_HIGH
from models.clusters import (
    Assessment, ClusterModel, ClusterModelError, KIND, assess, load_cluster_model, profile_from_columns,
)
from models.episodes import EpisodeParams, EpisodeTracker

log = logging.getLogger(__name__)

EVENT_KIND = "cluster_deviation"


@dataclass(frozen=True)
class ClusterWatchParams:
    enabled: bool = True
    check_every_s: float = 3600.0          # seconds between profile checks
    profile_window_s: float = 86400.0      # samples the profile summarises (match the fleet's --window-s)
    min_coverage: float = 0.5              # the window's samples must span this share of it
    stay_beyond_checks: int = 3            # consecutive checks beyond the radius before an event opens
    close_after_checks: int = 3            # consecutive checks inside before it closes
    critical_factor: float = 2.0           # beyond this many radii the event is critical
    max_profile_rows: int = 5000           # stored rows read per check are subsampled to this many


def explanation(model: ClusterModel, a: Assessment) -> list[dict[str, Any]]:
    """Top features as anomaly explanation entries: value, the centroid +- radius (raw units), z."""
    out = []
    for name, value, centre, z in a.contributions:
        i = model.feature_names.index(name)
        half = a.radius * float(model.scale[i])
        out.append({"feature": name, "value": value, "expected_low": centre - half,
                    "expected_high": centre + half, "z": z})
    return out


class ClusterWatch:
    name = "clusters"

    def __init__(self, params: ClusterWatchParams = ClusterWatchParams()) -> None:
        self.params = params
        self.model: ClusterModel | None = None
        self.last: Assessment | None = None
        self.last_check_s: float | None = None
        self.last_note = "no cluster model"
        self.checks = 0
        self.events: EventLog | None = None
        self._tracker = self._new_tracker()
        self._models: Any = None
        self._next_mono: float | None = None
        self.ctx: Any = None

    def _new_tracker(self) -> EpisodeTracker:
        return EpisodeTracker(EpisodeParams(open_after=self.params.stay_beyond_checks,
                                            close_after=self.params.close_after_checks))

    # -- lifecycle ------------------------------------------------------------------
    def start(self, ctx: Any) -> None:
        self.ctx = ctx
        self.events = EventLog(ctx.store)
        if not self.params.enabled:
            self.last_note = "disabled"
            return
        self._models = ctx.extras.get("models")
        if self._models is not None:
            self._models.subscribe(KIND, self._on_model)
        else:  # no update manager (minimal set-ups): whatever is installed
            from agent.updates import current_model_dir

            self._on_model(current_model_dir(ctx.config.agent.state_dir, KIND), None)

    def _on_model(self, model_dir: Path | None, pointer: dict | None) -> None:
        self._close_open(reason="model changed")
        self.last = None
        self._next_mono = None           # check soon with the new model
        if model_dir is None:
            self.model, self.last_note = None, "no cluster model"
            return
        try:
            self.model = load_cluster_model(model_dir)
        except ClusterModelError as exc:
            log.error("cannot load cluster model from %s: %s", model_dir, exc)
            self.model, self.last_note = None, f"cluster model unusable: {exc}"
            return
        log.info("cluster model v%d: %d clusters, this device in %s", self.model.version, self.model.k,
                 self.model.cluster_of(self._device_id()))
        self.last_note = "waiting for the first check"

    def stop(self) -> None:
        self._close_open(reason="shutdown")

    def _device_id(self) -> str | None:
        return self.ctx.config.device_id if self.ctx is not None else None

    # -- schedule -------------------------------------------------------------------
    def tick(self, now_mono_s: float) -> None:
        if self.model is None or not self.params.enabled:
            return
        if self._next_mono is None:
            self._next_mono = now_mono_s
        if now_mono_s < self._next_mono:
            return
        self._next_mono = now_mono_s + self.params.check_every_s
        self.check()

    # -- the check ------------------------------------------------------------------
    def read_window(self, now_s: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The last profile window of stored samples, subsampled, as columns."""
        assert self.model is not None
        metrics = list(self.model.metrics)
        since = now_s - self.params.profile_window_s
        step = self.params.profile_window_s / max(self.params.max_profile_rows, 1)
        ts: list[float] = []
        cols: dict[str, list[float]] = {m: [] for m in metrics}
        next_keep = -math.inf
        for t, values in self.ctx.store.iter_samples(since_s=since, until_s=now_s, metrics=metrics):
            if t <= since or t < next_keep:    # (since, now]: the windows the fleet's profiles use
                continue
            next_keep = t + step
            ts.append(t)
            for m in metrics:
                cols[m].append(values.get(m, math.nan))
        return np.asarray(ts, dtype=float), {m: np.asarray(v, dtype=float) for m, v in cols.items()}

    def check(self) -> Assessment | None:
        """One profile check now; returns the assessment (None when the window is too thin)."""
        model = self.model
        if model is None:
            return None
        now_s = self.ctx.clock.time()
        t0 = time.perf_counter()
        try:
            ts, cols = self.read_window(now_s)
        except sqlite3.Error as exc:
            self.last_note = f"cannot read samples: {exc}"
            log.warning("cluster check skipped: %s", exc)
            return None
        self.last_check_s = now_s
        span = float(ts[-1] - ts[0]) if len(ts) > 1 else 0.0
        if span < self.params.min_coverage * self.params.profile_window_s:
            self.last_note = (f"{span / 3600:.1f} h of samples; a profile needs "
                              f"{self.params.min_coverage * self.params.profile_window_s / 3600:.1f} h")
            self.last = None
            return None
        profile = profile_from_columns(ts, cols, model.feature_names)
        a = assess(model, profile, model.cluster_of(self._device_id()))
        elapsed_s = time.perf_counter() - t0
        self.checks += 1
        self.last = a
        self.last_note = "beyond the radius" if a.beyond else "inside the radius"
        if self._models is not None:
            # The health check judges the model (finite, fast); a deviating device is not the model's fault.
            self._models.observe(KIND, math.isfinite(a.distance), False, elapsed_s)
        if not math.isfinite(a.distance):
            return a
        severity = "normal"
        if a.beyond:
            severity = "critical" if a.distance > self.params.critical_factor * a.radius else "warning"
        expl = explanation(model, a)
        for event in self._tracker.update(now_s, severity, a.distance / a.radius, [e["feature"] for e in expl],
                                          expl, detector="cluster", model_version=model.version):
            self._publish(event, now_s, a)
        return a

    # -- events ---------------------------------------------------------------------
    def _publish(self, event: dict[str, Any], now_s: float, a: Assessment | None) -> None:
        assert self.events is not None
        event["kind"] = EVENT_KIND
        if a is not None:
            event.update({"cluster": a.cluster, "distance": a.distance, "radius": a.radius, "nearest": a.nearest})
        self.events.record(event, now_s)
        log.log(logging.INFO if event["action"] == "close" else logging.WARNING,
                "cluster deviation %s %s (%s): distance %s, radius %s", event["action"], event["id"][:8],
                event["severity"], event.get("distance"), event.get("radius"))
        msg = anomaly_payload(self.ctx.config.device_id, now_s, event)
        msg["eventKind"] = EVENT_KIND
        for key in ("cluster", "distance", "radius", "nearest"):
            if key in event:
                msg[key] = event[key]
        self.ctx.emit("anomaly", msg, PRIORITY_HIGH)

    def _close_open(self, reason: str) -> None:
        if self.ctx is None or self.events is None:
            return
        now = self.ctx.clock.time()
        for event in self._tracker.flush(now):
            event["closed_by"] = reason
            self._publish(event, now, self.last)
        self._tracker = self._new_tracker()

    # -- reporting ------------------------------------------------------------------
    def twin(self) -> dict[str, Any]:
        if self.model is None:
            return {}
        a = self.last
        cluster = a.cluster if a is not None else self.model.cluster_of(self._device_id())
        return {"clusterId": cluster,
                "clusterDistance": round(a.distance, 4) if a is not None and math.isfinite(a.distance) else None,
                "clusterRadius": round(float(self.model.radius[cluster]), 4) if cluster is not None else None,
                "clusterNearest": a.nearest if a is not None else None}

    def status(self) -> dict[str, Any]:
        open_ep = self._tracker.current
        return {"clusters": {
            "model_version": self.model.version if self.model is not None else None,
            "checks": self.checks, "last_check_s": self.last_check_s, "note": self.last_note,
            **self.twin(), "deviation_open": open_ep["id"] if open_ep else None}}


def params_from_section(section: Any) -> ClusterWatchParams:
    """[clusters] of the agent configuration -> the component's parameters."""
    return ClusterWatchParams(
        enabled=section.enabled, check_every_s=section.check_every_s, profile_window_s=section.profile_window_s,
        min_coverage=section.min_coverage, stay_beyond_checks=section.stay_beyond_checks,
        close_after_checks=section.close_after_checks, critical_factor=section.critical_factor,
        max_profile_rows=section.max_profile_rows)
