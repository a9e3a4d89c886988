"""Streaming detection pipeline: features -> z-score (+ forest) -> severity -> episodes.

The daemon calls ``detector.update(ts_s, values)`` once per sample and gets back
``(RowResult, events)``; events are the episode dicts of models.episodes. The
z-score runs from the first sample; base metrics are also scored against their
time-of-day profile (models.zscore.DailyProfileZ; anomaly_score only, it does not
set severity: a daily z is noisier than a window z and an hour-shifted cron job
should not page anyone); base metrics also feed models.novelty (a bin -> bin
transition never seen before scores 1; anomaly_score only, like the daily z),
whose rest gate then keeps one incident to one alarm; a forest is plugged in (or swapped) with
``set_forest(model)`` when one has been trained or received. The forest has its
own FeatureBuilder on the model's saved feature names, so a model never sees
columns in another order than it was trained on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from models.episodes import EpisodeParams, EpisodeTracker
from models.features import DEFAULT_FEATURES, FeatureBuilder, derived_names
from models.forest import ForestModel, forest_stand_ins
from models.novelty import NoveltyParams, RestGate, TransitionNovelty
from models.severity import (CalibratorParams, SeverityParams, SurpriseCalibrator, combine, explain, forest_z, gate,
                             severity_rank)
from models.zscore import DailyProfileParams, DailyProfileZ, RollingZScore, ZScoreParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectParams:
    """Defaults are the ones evaluated on NAB (bench/nab.py) and used by replay."""

    features: tuple[str, ...] = DEFAULT_FEATURES   # base metrics (absent ones are ignored)
    window_stats: bool = True        # also z-score each metric's first difference and short rolling mean
    stats_window: int = 10           # rows in that rolling mean
    zscore: ZScoreParams = field(default_factory=ZScoreParams)
    severity: SeverityParams = field(default_factory=SeverityParams)
    calibrator: CalibratorParams = field(default_factory=CalibratorParams)
    episodes: EpisodeParams = field(default_factory=EpisodeParams)
    use_forest: bool = True
    daily_profile: bool = True       # also score base metrics against their time-of-day profile
    daily: DailyProfileParams = field(default_factory=DailyProfileParams)
    novelty: NoveltyParams = field(default_factory=NoveltyParams)

    @property
    def z_features(self) -> tuple[str, ...]:
        if not self.window_stats:
            return tuple(self.features)
        return derived_names(self.features, self.stats_window, stats=("diff1", "mean"))


@dataclass(frozen=True)
class RowResult:
    ts_s: float
    score: float                 # raw, z units (max of z-score and forest-on-z-scale)
    anomaly_score: float         # [0, 1], grows with abnormality; 1 = a novel transition
    severity: str
    z_max: float
    forest_score: float | None   # -score_samples, None without forest or incomplete row
    episode_id: str | None
    explanation: list = field(default_factory=list)
    novel: tuple[str, ...] = ()  # base metrics whose transition into this row was never seen before


class Detector:
    def __init__(self, params: DetectParams = DetectParams(), forest: ForestModel | None = None):
        self.params = params
        self.z_names = params.z_features
        self.features = FeatureBuilder(self.z_names)
        self.zscore = RollingZScore(len(self.z_names), params.zscore)
        # base metrics (no derived suffix) also get a time-of-day z (anomaly_score only, see severity.py)
        base_idx = [i for i, n in enumerate(self.z_names) if "|" not in n]
        self._daily_idx = np.array(base_idx if params.daily_profile else [], dtype=np.intp)
        self._novelty_idx = np.array(base_idx if params.novelty.enabled else [], dtype=np.intp)
        self.novelty = TransitionNovelty([self.z_names[i] for i in self._novelty_idx], params.novelty) \
            if len(self._novelty_idx) else None
        self.rest = RestGate(params.novelty.rest_rows, params.novelty.rest_threshold) if self.novelty else None
        self.daily = DailyProfileZ(len(self._daily_idx), params.daily) if len(self._daily_idx) else None
        # calibrator columns: one per z feature, one per daily z, one for the forest (0 until a forest exists)
        n_cols = len(self.z_names) + len(self._daily_idx) + 1
        self.calibrator = SurpriseCalibrator(n_cols, params.calibrator)
        self._cols = np.zeros(n_cols)
        self.episodes = EpisodeTracker(params.episodes)
        self.forest: ForestModel | None = None
        self._forest_features: FeatureBuilder | None = None
        self._stand_ins: tuple[tuple[int, str, float], ...] = ()
        self.n_samples = 0
        if forest is not None:
            self.set_forest(forest)

    @property
    def detector_name(self) -> str:
        return "zscore+forest" if self.forest is not None else "zscore"

    @property
    def model_version(self) -> int | None:
        return self.forest.version if self.forest is not None else None

    def set_forest(self, model: ForestModel | None) -> None:
        """Plug in (or remove with None) a forest; takes effect from the next sample."""
        if model is not None and not self.params.use_forest:
            log.info("forest v%d ignored: use_forest is off", model.version)
            model = None
        self.forest = model
        self._forest_features = FeatureBuilder(model.feature_names) if model is not None else None
        self._stand_ins = forest_stand_ins(model) if model is not None else ()
        if model is not None:
            log.info("forest v%d active on %d features", model.version, len(model.feature_names))

    def update(self, ts_s: float, values: Mapping[str, float]) -> tuple[RowResult, list[dict]]:
        p = self.params
        x = self.features.update(values)
        z = self.zscore.update(x)
        center, scale = self.zscore.center, self.zscore.scale   # the baseline z was computed on
        abs_z = np.abs(z)
        z_max = float(abs_z.max()) if len(abs_z) else 0.0
        anomaly = None
        if self._forest_features is not None:
            fx = self._forest_features.update(values)
            for col, base, median in self._stand_ins:
                if base not in values:  # a metric this device lacks (or lost): the training median
                    fx[col] = median
            if not np.isnan(fx).any():
                anomaly = self.forest.forest.score_one(fx)
        thresholds = self.forest.thresholds if self.forest is not None else None
        score, sev = combine(z_max, anomaly, thresholds, p.severity)
        cols = self._cols
        nz = len(abs_z)
        cols[:nz] = abs_z
        if self.daily is not None:
            cols[nz:-1] = np.abs(self.daily.update(ts_s, x[self._daily_idx], p.zscore))
        cols[-1] = forest_z(anomaly, thresholds, p.severity) if anomaly is not None else 0.0
        anomaly_score = self.calibrator.update(cols)
        novel: tuple[str, ...] = ()
        if self.novelty is not None:
            novel = self.novelty.update(x[self._novelty_idx])
            anomaly_score = self.rest.update(1.0 if novel else p.novelty.calibrated_weight * anomaly_score)
        sev = gate(sev, anomaly_score, p.severity)
        expl: list = []
        involved: Sequence[str] = ()
        if severity_rank(sev) >= 1:
            expl = explain(self.z_names, x, z, center, scale, p.severity)
            involved = [e["feature"] for e in expl if abs(e["z"]) >= p.severity.z_warning] or \
                [e["feature"] for e in expl[:1]]
        events = self.episodes.update(ts_s, sev, score, involved, expl, self.detector_name, self.model_version)
        self.n_samples += 1
        row = RowResult(ts_s=ts_s, score=score, anomaly_score=anomaly_score, severity=sev, z_max=z_max,
                        forest_score=anomaly, episode_id=self.episodes.current_id, explanation=expl,
                        novel=novel)
        return row, events

    def flush(self) -> list[dict]:
        return self.episodes.flush()

    def status(self) -> dict:
        return {"detector": self.detector_name, "model_version": self.model_version,
                "samples": self.n_samples, "zscore_ready": self.zscore.ready,
                "novelty_learning": self.novelty.learning if self.novelty is not None else None,
                "episode_open": self.episodes.current_id}

