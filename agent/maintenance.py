"""Daemon component "maintenance": the fleet's failure-risk model, scored on the device.

Every ``score_every_s`` (hourly) it reads the last 24 h of samples from the
local store and the anomaly episodes from the events table, computes the same
window features the fleet trained on (models.maintenance), and scores the
installed ``maintenance`` model (compact trees + isotonic calibration: numpy
only). The result goes to the twin (``failureRisk24h``, ``failureRiskTop``:
the features pushing the risk up, ``failureRiskAt``) and, when the risk
crosses the thresholds, into an episode of kind ``failure_risk`` through the
same path anomaly episodes take (models.episodes tracker -> events table ->
MQTT "anomaly" message with detector "failure_risk").

Thresholds: the component's own (``warning_risk`` / ``critical_risk``) when
set (> 0), otherwise the model's (chosen on the fleet's calibration slice).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent import payloads
from agent.events import EventLog
from agent.outbox import PRIORITY_HIGH
from models.episodes import EpisodeParams, EpisodeTracker
from models.maintenance import KIND, LOOKBACK_S, MaintenanceModel, load_maintenance_model, window_features

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaintenanceParams:
    enabled: bool = True
    score_every_s: float = 3600.0      # how often the risk is computed
    warning_risk: float = 0.0          # 0: the model's own warning threshold
    critical_risk: float = 0.0         # 0: the model's own critical threshold
    top_features: int = 3              # contributing features reported in the twin
    close_after: int = 2               # scores below warning that close a failure_risk episode
    model_dir: str = ""                # a fixed model directory instead of the installed one


class MaintenanceComponent:
    name = "maintenance"

    def __init__(self, params: MaintenanceParams = MaintenanceParams()) -> None:
        self.params = params
        self.model: MaintenanceModel | None = None
        self.tracker = EpisodeTracker(EpisodeParams(open_after=1, close_after=params.close_after))
        self.events: EventLog | None = None
        self._next_mono: float | None = None
        self.last: dict[str, Any] = {}
        self.scores = 0
        self.errors = 0

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, ctx: Any) -> None:
        self.ctx = ctx
        self.events = EventLog(ctx.store)
        models = getattr(ctx, "extras", {}).get("models")
        if self.params.model_dir:
            self._on_model(Path(self.params.model_dir), None)
        elif models is not None:
            models.subscribe(KIND, self._on_model)
        else:
            from agent.updates import current_model_dir

            self._on_model(current_model_dir(ctx.config.agent.state_dir, KIND), None)

    def _on_model(self, model_dir: Path | None, pointer: dict | None) -> None:
        if model_dir is None:
            self.model = None
            return
        try:
            self.model = load_maintenance_model(model_dir)
            log.info("maintenance model v%d loaded (%d features)", self.model.version, len(self.model.feature_names))
            self._next_mono = None          # score the new model at the next tick
        except (OSError, ValueError, KeyError) as exc:
            log.error("cannot load maintenance model from %s: %s", model_dir, exc)
            self.model = None

    def stop(self) -> None:
        now = self.ctx.clock.time()
        for event in self.tracker.flush():
            event["closed_by"] = "shutdown"
            self._publish(event, now)

    # -- schedule -------------------------------------------------------------------------
    def tick(self, now_mono_s: float) -> None:
        if not self.params.enabled or self.model is None:
            return
        if self._next_mono is not None and now_mono_s < self._next_mono:
            return
        self._next_mono = now_mono_s + self.params.score_every_s
        try:
            self.score_now()
        except Exception:   # a scoring bug must never stop the sampler
            self.errors += 1
            log.exception("failure-risk scoring failed")

    def thresholds(self) -> dict[str, float]:
        assert self.model is not None
        th = dict(self.model.thresholds)
        if self.params.warning_risk > 0:
            th["warning"] = self.params.warning_risk
        if self.params.critical_risk > 0:
            th["critical"] = max(self.params.critical_risk, th["warning"])
        return th

    def score_now(self) -> dict[str, Any] | None:
        """Compute the risk at the current wall time; returns what went to the twin."""
        model = self.model
        if model is None:
            return None
        store = self.ctx.store
        now = self.ctx.clock.time()
        store.flush()
        t0 = time.perf_counter()
        rows = store.samples(since_s=now - LOOKBACK_S, metrics=model.metrics)
        if not rows:
            return None
        ts = np.array([r[0] for r in rows], dtype=np.float64)
        values = {m: np.array([r[1].get(m, np.nan) for r in rows], dtype=np.float64) for m in model.metrics}
        anomalies = [(float(e["start_ts_s"]), str(e.get("severity")))
                     for e in self.events.iter_events(since_s=now - LOOKBACK_S, kind="anomaly")
                     if e.get("start_ts_s") is not None]
        x = window_features(ts, values, now, model.feature_names, anomalies)
        risk = float(model.risk(x[None, :])[0])
        top = model.top_features(x, self.params.top_features)
        th = self.thresholds()
        sev = "critical" if risk >= th["critical"] else "warning" if risk >= th["warning"] else "normal"
        self.scores += 1
        self.last = {"failureRisk24h": round(risk, 4), "failureRiskSeverity": sev, "failureRiskTop": top,
                     "failureRiskAt": payloads.iso_utc(now), "failureRiskModelVersion": model.version,
                     "inference_s": time.perf_counter() - t0}
        for event in self.tracker.update(now, sev, risk, [t["feature"] for t in top],
                                         explanation=top, detector="failure_risk", model_version=model.version):
            event["kind"] = "failure_risk"
            event["risk"] = risk
            self._publish(event, now)
        return self.last

    def _publish(self, event: dict[str, Any], now_s: float) -> None:
        assert self.events is not None
        self.events.record(event, now_s)
        if event.get("action") in ("open", "update"):
            log.warning("failure risk %s (%s): %.2f, %s", event["action"], event["severity"],
                        float(event.get("peak_score", 0.0)), ", ".join(event.get("features") or []))
        top = event.get("explanation") or []
        metrics = [t["feature"] for t in top] or ["failureRisk24h"]
        msg = payloads.anomaly_event(
            self.ctx.config.device_id, now_s, event_id=event["id"], severity=event["severity"], metrics=metrics,
            value={t["feature"]: t["value"] for t in top if t.get("value") is not None} or event.get("peak_score"),
            expected_low=None, expected_high=None, deviation=None, detector="failure_risk",
            model_version=event.get("model_version"), started_ts_s=float(event["start_ts_s"]),
            ended_ts_s=event.get("end_ts_s"), score=event.get("peak_score"),
            explanation=f"failure within 24 h: risk {float(event.get('peak_score', 0.0)):.2f}",
            contributions={t["feature"]: t["contribution"] for t in top})
        msg["eventKind"] = "failure_risk"
        self.ctx.emit("anomaly", msg, PRIORITY_HIGH)

    # -- reporting ------------------------------------------------------------------------
    def twin(self) -> dict[str, Any]:
        if not self.last:
            return {}
        return {k: v for k, v in self.last.items() if k != "inference_s"}

    def status(self) -> dict[str, Any]:
        return {"maintenance": {
            "model_version": None if self.model is None else self.model.version,
            "risk": self.last.get("failureRisk24h"), "severity": self.last.get("failureRiskSeverity"),
            "scored_at": self.last.get("failureRiskAt"), "scores": self.scores, "errors": self.errors,
            "inference_s": self.last.get("inference_s") if not math.isnan(self.last.get("inference_s") or 0.0) else None,
        }}


def params_from_section(section: Any) -> MaintenanceParams:
    """[maintenance] configuration -> MaintenanceParams (duck-typed)."""
    return MaintenanceParams(enabled=section.enabled, score_every_s=section.score_every_s,
                             warning_risk=section.warning_risk, critical_risk=section.critical_risk,
                             top_features=section.top_features, close_after=section.close_after)
