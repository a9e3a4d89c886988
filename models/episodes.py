"""Debounce per-sample severities into anomaly episodes (pure state machine).

An episode opens after ``open_after`` consecutive samples at >= warning (a single
spike on a 1 Hz metric is not worth a message), tracks its peak severity, peak
score and the features involved, and closes after ``close_after`` consecutive
normal samples. ``update`` returns plain dict events, each with an ``action``:

    "open"    the episode just opened (persist at once: it must survive a crash)
    "update"  the peak severity rose (warning -> critical) while open
    "close"   the episode ended; ``end_ts_s`` is the last abnormal sample's time

Every event carries the whole episode: id (uuid4 hex), kind "anomaly",
start_ts_s (first sample of the opening run), end_ts_s (None while open),
severity (peak), peak_score, features (names, most deviating first, union over
the episode), explanation (at the peak), detector, model_version, state.
The caller (daemon) persists them in its ``events`` table and emits them.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Callable, Sequence

from models.severity import severity_rank

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpisodeParams:
    open_after: int = 3
    close_after: int = 5

    def __post_init__(self) -> None:
        if self.open_after < 1 or self.close_after < 1:
            raise ValueError("open_after and close_after must be >= 1")


class EpisodeTracker:
    def __init__(self, params: EpisodeParams = EpisodeParams(),
                 new_id: Callable[[], str] = lambda: uuid.uuid4().hex):
        self.params = params
        self._new_id = new_id
        self._run: list[tuple[float, str, float, Sequence[str], list]] = []  # pending abnormal run
        self._episode: dict | None = None
        self._normals = 0

    @property
    def current(self) -> dict | None:
        """The open episode (a copy), or None."""
        return dict(self._episode) if self._episode else None

    @property
    def current_id(self) -> str | None:
        return self._episode["id"] if self._episode else None

    def update(self, ts_s: float, severity: str, score: float, features: Sequence[str] = (),
               explanation: list | None = None, detector: str = "zscore",
               model_version: int | None = None) -> list[dict]:
        abnormal = severity_rank(severity) >= 1
        events: list[dict] = []
        if self._episode is None:
            if not abnormal:
                self._run.clear()
                return events
            self._run.append((ts_s, severity, score, tuple(features), explanation or []))
            if len(self._run) >= self.params.open_after:
                self._open(detector, model_version)
                events.append(self._event("open"))
            return events
        ep = self._episode
        if abnormal:
            self._normals = 0
            ep["last_abnormal_ts_s"] = ts_s
            ep["detector"] = detector
            ep["model_version"] = model_version
            self._merge_features(features)
            rose = severity_rank(severity) > severity_rank(ep["severity"])
            if score > ep["peak_score"]:
                ep["peak_score"] = float(score)
                ep["explanation"] = explanation or []
            if rose:
                ep["severity"] = severity
                events.append(self._event("update"))
            return events
        self._normals += 1
        if self._normals >= self.params.close_after:
            ep["end_ts_s"] = ep.pop("last_abnormal_ts_s")
            ep["state"] = "closed"
            events.append(self._event("close"))
            self._episode = None
            self._normals = 0
            self._run.clear()
        return events

    def _open(self, detector: str, model_version: int | None) -> None:
        run = self._run
        peak = max(run, key=lambda r: r[2])
        sev = max((r[1] for r in run), key=severity_rank)
        self._episode = {
            "id": self._new_id(), "kind": "anomaly", "state": "open",
            "start_ts_s": run[0][0], "end_ts_s": None, "last_abnormal_ts_s": run[-1][0],
            "severity": sev, "peak_score": float(peak[2]), "features": [],
            "explanation": peak[4], "detector": detector, "model_version": model_version,
        }
        for r in run:
            self._merge_features(r[3])
        self._run = []
        self._normals = 0

    def _merge_features(self, features: Sequence[str]) -> None:
        have = self._episode["features"]
        for f in features:
            if f not in have:
                have.append(f)

    def _event(self, action: str) -> dict:
        ev = {k: v for k, v in self._episode.items() if k != "last_abnormal_ts_s"}
        ev["features"] = list(ev["features"])
        ev["action"] = action
        return ev

    def flush(self, ts_s: float | None = None) -> list[dict]:
        """Close an open episode (end of a replay, daemon stop)."""
        if self._episode is None:
            return []
        ep = self._episode
        last = ep.pop("last_abnormal_ts_s")
        ep["end_ts_s"] = last if ts_s is None else ts_s
        ep["state"] = "closed"
        ev = self._event("close")
        self._episode = None
        self._run = []
        self._normals = 0
        return [ev]
