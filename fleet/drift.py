"""Drift and accuracy monitoring: is a champion still fit for the data its devices send?

Data drift, per device and feature: the rows the champion was trained on (its
registry data range, up to the start of its held-out slice) against the rows
that arrived since it was trained (at most ``drift.recent_s`` back), both run
through the same feature transformation as the model (log1p rates, ...):

- PSI (population stability index) over ``drift.bins`` quantile bins of the
  reference: sum((q - p) * ln(q / p)), empty bins floored at 1e-4; < 0.1 stable,
  0.1-0.25 moderate, > 0.25 significant (the default threshold);
- or the two-sample Kolmogorov-Smirnov statistic D = max |F_ref - F_recent|.

A device drifts when at least ``drift.min_drifted_features`` features do;
fewer than ``drift.min_samples`` rows on either side give no verdict.

Thresholds (``drift.calibration``): one fixed PSI of 0.25 flags healthy
devices, because one day of a device never looks like its two weeks (daily
and weekly cycles, bursts, slow disk fill): on a simulated fleet every one
of the non-drifting devices scored 0.45-1.17. With ``self`` (the default)
each device and feature is measured against itself first: the reference is
cut into windows as long as the recent one, each window is compared with the
rest of the reference, and the threshold is ``calibration_margin`` x the
largest of those statistics, never below the fixed one. A feature drifts
when the recent window looks less like the past than any past window did.
Too short a reference (fewer than two windows) falls back to the fixed
threshold. Rates on simulated fleets: ``bench/drift_rates.py`` (README).

Forecast accuracy, per device and metric: every forecast a device published is
scored against the telemetry that arrived for its target times (the mean of the
metric over each step, the way the device aggregates), giving MAE and the
realised coverage of the 80/95 % intervals; a device may also report coverage
itself in its twin (``forecastCoverage``: [{"metric", "level", "coverage"}]).
Accuracy is degraded when the 80 % coverage falls below 0.8 - ``coverage_drop``
or the MAE exceeds ``error_factor`` x the champion LSTM's validation MAE.

Every verdict is stored in ``drift_reports`` (the history ``edge-fleet drift``
shows); drift or degraded accuracy makes the target due for retraining.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fleet.config import DriftSection, FleetConfig
from fleet.dataset import load_rows, target_devices
from fleet.registry import ModelRecord, Registry
from fleet.store import Store, iso_to_s

log = logging.getLogger(__name__)

EPS = 1e-4
MIGRATIONS = [
    """
    CREATE TABLE drift_reports (
        id {pk}, ts_s {real} NOT NULL, target TEXT NOT NULL, model_version INTEGER, device_id TEXT NOT NULL,
        check_kind TEXT NOT NULL, name TEXT NOT NULL, method TEXT NOT NULL, statistic {real},
        threshold {real}, flagged INTEGER NOT NULL, n_ref INTEGER, n_recent INTEGER);
    CREATE INDEX drift_reports_target ON drift_reports (target, ts_s)
    """,
]


# -- statistics (pure) ------------------------------------------------------------------------------
def psi(reference: np.ndarray, recent: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``recent`` against quantile bins of ``reference``."""
    ref = np.asarray(reference, dtype=np.float64)
    rec = np.asarray(recent, dtype=np.float64)
    ref, rec = ref[np.isfinite(ref)], rec[np.isfinite(rec)]
    if not len(ref) or not len(rec):
        return math.nan
    cuts = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1]))

    def shares(x: np.ndarray) -> np.ndarray:
        # open-ended outer bins; a value equal to a cut gets a bin of its own, so a metric
        # with point masses (a constant, a count) still shows a move off its usual value
        idx = np.searchsorted(cuts, x, side="left") + np.searchsorted(cuts, x, side="right")
        return np.bincount(idx, minlength=2 * len(cuts) + 1) / len(x)

    p, q = shares(ref), shares(rec)
    p, q = np.maximum(p, EPS), np.maximum(q, EPS)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_statistic(reference: np.ndarray, recent: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov D: the largest gap between the two empirical CDFs."""
    x = np.sort(np.asarray(reference, dtype=np.float64))
    y = np.sort(np.asarray(recent, dtype=np.float64))
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if not len(x) or not len(y):
        return math.nan
    grid = np.concatenate([x, y])
    fx = np.searchsorted(x, grid, side="right") / len(x)
    fy = np.searchsorted(y, grid, side="right") / len(y)
    return float(np.max(np.abs(fx - fy)))


@dataclass(frozen=True)
class Verdict:
    device_id: str
    check: str            # "feature" or "accuracy"
    name: str             # feature name, or "<metric>:coverage_80" / "<metric>:mae"
    method: str           # psi | ks | coverage | mae_ratio
    statistic: float | None
    threshold: float
    flagged: bool
    n_ref: int
    n_recent: int


def self_threshold(reference: np.ndarray, window: int, statistic: Callable[[np.ndarray, np.ndarray], float],
                   floor: float, margin: float) -> float:
    """``margin`` x the largest statistic of a reference window (``window`` rows, in time order)
    against the rest of the reference; ``floor`` when there are fewer than two windows."""
    n_windows = len(reference) // window if window > 0 else 0
    if n_windows < 2:
        return floor
    stats = []
    for k in range(n_windows):
        lo, hi = k * window, (k + 1) * window
        rest = np.concatenate([reference[:lo], reference[hi:]])
        stat = statistic(rest, reference[lo:hi])
        if math.isfinite(stat):
            stats.append(stat)
    return max(floor, margin * max(stats)) if stats else floor


def feature_drift(device_id: str, reference: np.ndarray, recent: np.ndarray, names: Sequence[str],
                  p: DriftSection) -> list[Verdict]:
    """One verdict per feature column with enough finite rows on both sides."""
    out = []
    if p.method == "psi":
        def statistic(a: np.ndarray, b: np.ndarray) -> float:
            return psi(a, b, p.bins)
        fixed = p.psi_threshold
    else:
        statistic, fixed = ks_statistic, p.ks_threshold
    for j, name in enumerate(names):
        ref, rec = reference[:, j], recent[:, j]
        ref, rec = ref[np.isfinite(ref)], rec[np.isfinite(rec)]
        if len(ref) < p.min_samples or len(rec) < p.min_samples:
            continue
        stat = statistic(ref, rec)
        threshold = fixed if p.calibration == "fixed" else \
            self_threshold(ref, len(rec), statistic, fixed, p.calibration_margin)
        out.append(Verdict(device_id, "feature", name, p.method, stat, threshold,
                           bool(math.isfinite(stat) and stat > threshold), len(ref), len(rec)))
    return out


# -- forecast accuracy from what devices reported -------------------------------------------------
@dataclass
class _Acc:
    n: int = 0
    abs_err: float = 0.0
    hits: dict[str, int] = field(default_factory=dict)
    checks: dict[str, int] = field(default_factory=dict)


def score_forecasts(forecasts: Sequence[Mapping[str, Any]],
                    samples: Sequence[tuple[float, Mapping[str, float]]]) -> dict[str, dict[str, Any]]:
    """Device forecasts vs the telemetry of their target steps -> per metric MAE and coverage."""
    ts = np.array([t for t, _ in samples], dtype=np.float64)
    acc: dict[str, _Acc] = {}
    for f in forecasts:
        metric, origin, step = f.get("metric"), iso_to_s(f.get("origin")), f.get("stepSeconds")
        values = f.get("values") or []
        if not isinstance(metric, str) or origin is None or not isinstance(step, (int, float)) or step <= 0:
            continue
        a = acc.setdefault(metric, _Acc())
        for k, v in enumerate(values, start=1):
            if not isinstance(v, (int, float)):
                continue
            lo_i, hi_i = np.searchsorted(ts, origin + (k - 1) * step, side="right"), \
                np.searchsorted(ts, origin + k * step, side="right")
            obs = [samples[i][1].get(metric) for i in range(lo_i, hi_i)]
            obs = [o for o in obs if isinstance(o, (int, float)) and math.isfinite(o)]
            if not obs:
                continue
            actual = float(np.mean(obs))
            a.n += 1
            a.abs_err += abs(actual - float(v))
            for label, band in (f.get("intervals") or {}).items():
                try:
                    lo, hi = band["lower"][k - 1], band["upper"][k - 1]
                except (KeyError, IndexError, TypeError):
                    continue
                if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
                    a.checks[label] = a.checks.get(label, 0) + 1
                    a.hits[label] = a.hits.get(label, 0) + int(lo <= actual <= hi)
    return {m: {"n": a.n, "mae": a.abs_err / a.n if a.n else None,
                **{f"coverage_{lb}": a.hits[lb] / a.checks[lb] for lb in a.checks if a.checks[lb]}}
            for m, a in acc.items()}


def reported_coverage(twin: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """Coverage a device reports in its twin: [{"metric", "level", "coverage"}] -> {metric: {coverage_80: ..}}."""
    out: dict[str, dict[str, float]] = {}
    rows = (twin or {}).get("forecastCoverage") or (twin or {}).get("forecast_coverage") or []
    for r in rows if isinstance(rows, list) else []:
        if not isinstance(r, Mapping):
            continue
        metric, level, cov = r.get("metric"), r.get("level"), r.get("coverage")
        if isinstance(metric, str) and isinstance(level, (int, float)) and isinstance(cov, (int, float)):
            label = f"{level * 100:g}" if level <= 1 else f"{level:g}"
            out.setdefault(metric, {})[f"coverage_{label}"] = float(cov)
    return out


def accuracy_verdicts(device_id: str, scores: Mapping[str, Mapping[str, Any]],
                      reference_mae: Mapping[str, float], p: DriftSection) -> list[Verdict]:
    out = []
    for metric, s in scores.items():
        n = int(s.get("n") or 0)
        cov = s.get("coverage_80")
        if cov is not None and n >= p.min_forecasts:
            floor = 0.8 - p.coverage_drop
            out.append(Verdict(device_id, "accuracy", f"{metric}:coverage_80", "coverage", float(cov), floor,
                               cov < floor, 0, n))
        mae, ref = s.get("mae"), reference_mae.get(metric)
        if mae is not None and ref and n >= p.min_forecasts:
            ratio = float(mae) / float(ref)
            out.append(Verdict(device_id, "accuracy", f"{metric}:mae", "mae_ratio", ratio, p.error_factor,
                               ratio > p.error_factor, 0, n))
    return out


# -- checking a target ------------------------------------------------------------------------------
@dataclass
class TargetHealth:
    target: str
    model_version: int | None
    verdicts: list[Verdict] = field(default_factory=list)
    drifting_devices: list[str] = field(default_factory=list)
    degraded_devices: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def needs_retraining(self) -> bool:
        return bool(self.drifting_devices or self.degraded_devices)

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "model_version": self.model_version, "note": self.note,
                "drifting_devices": self.drifting_devices, "degraded_devices": self.degraded_devices,
                "needs_retraining": self.needs_retraining,
                "verdicts": [asdict(v) for v in self.verdicts]}


def _lstm_validation_mae(record: ModelRecord) -> dict[str, float]:
    if "lstm" not in record.kinds:
        return {}
    try:
        meta = json.loads((Path(record.artefact_dir) / "lstm" / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    mae = (meta.get("validation") or {}).get("mae") or {}
    return {k: float(v) for k, v in mae.items() if isinstance(v, (int, float)) and v > 0}


def check_target(store: Store, config: FleetConfig, target: Any, *, now_s: float | None = None,
                 record: ModelRecord | None = None, shadow: Store | None = None,
                 save: bool = True) -> TargetHealth:
    """Drift and accuracy verdicts for every device of ``target`` against its champion."""
    from models.features import build_matrix

    now = time.time() if now_s is None else now_s
    p = config.drift
    record = record or Registry(store).champion(target)
    health = TargetHealth(target.label, record.version if record else None)
    if record is None:
        health.note = "no champion: nothing to compare with"
        return health
    names = list(record.params.get("features") or [])
    source = str(record.params.get("source") or "collected")
    ref_until = record.holdout_from_s if record.holdout_from_s is not None else record.data_to_s
    recent_since = max(now - p.recent_s, record.data_to_s or -math.inf)
    ref_mae = _lstm_validation_mae(record)
    for device_id in target_devices(store, config, target):
        verdicts: list[Verdict] = []
        if names:
            ref_rows = load_rows(store, device_id, record.data_from_s, ref_until, source, shadow,
                                 config.source.shadow_table, config.train.max_rows)
            rec_rows = load_rows(store, device_id, recent_since, None, source, shadow, config.source.shadow_table,
                                 config.train.max_rows)
            rec_rows = [r for r in rec_rows if r[0] > recent_since]   # strictly after the champion's data
            if ref_rows and rec_rows:
                ref = build_matrix([v for _, v in ref_rows], names)
                rec = build_matrix([v for _, v in rec_rows], names)
                verdicts += feature_drift(device_id, ref, rec, names, p)
        scores = score_forecasts(store.forecasts(device_id, since_s=now - p.recent_s),
                                 store.samples(device_id, since_s=now - p.recent_s))
        for metric, cov in reported_coverage(store.twin(device_id)).items():
            scores.setdefault(metric, {"n": p.min_forecasts}).update(cov)
        verdicts += accuracy_verdicts(device_id, scores, ref_mae, p)
        health.verdicts += verdicts
        drifted = [v for v in verdicts if v.check == "feature" and v.flagged]
        if len(drifted) >= p.min_drifted_features:
            health.drifting_devices.append(device_id)
        if any(v.check == "accuracy" and v.flagged for v in verdicts):
            health.degraded_devices.append(device_id)
    if save:
        save_verdicts(store, health, now)
    if health.needs_retraining:
        log.warning("%s (v%s): drifting %s, degraded accuracy %s", health.target, health.model_version,
                    ", ".join(health.drifting_devices) or "-", ", ".join(health.degraded_devices) or "-")
    return health


def save_verdicts(store: Store, health: TargetHealth, now_s: float) -> None:
    store.migrate("drift", MIGRATIONS)
    if not health.verdicts:
        return
    with store.transaction():
        store.executemany(
            "INSERT INTO drift_reports (ts_s, target, model_version, device_id, check_kind, name, method, statistic, "
            "threshold, flagged, n_ref, n_recent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(now_s, health.target, health.model_version, v.device_id, v.check, v.name, v.method,
              v.statistic if v.statistic is not None and math.isfinite(v.statistic) else None, v.threshold,
              int(v.flagged), v.n_ref, v.n_recent) for v in health.verdicts])


def recent_reports(store: Store, target: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    store.migrate("drift", MIGRATIONS)
    text = ("SELECT ts_s, target, model_version, device_id, check_kind, name, method, statistic, threshold, flagged, "
            "n_ref, n_recent FROM drift_reports")
    params: list[Any] = []
    if target:
        text += " WHERE target = ?"
        params.append(target)
    rows = store.query(text + " ORDER BY ts_s DESC, id DESC LIMIT ?", params + [int(limit)])
    keys = ("ts_s", "target", "model_version", "device_id", "check", "name", "method", "statistic", "threshold",
            "flagged", "n_ref", "n_recent")
    return [dict(zip(keys, r), flagged=bool(r[9])) for r in rows]
