"""Predictive maintenance, device side (numpy only): windowed features and failure-risk scoring.

One feature function serves the fleet (training rows, one per device-hour)
and the device (one row at each hourly score), so the two cannot drift
apart. A feature is named ``<metric>|<stat>`` (the bundle's feature check
then knows which metrics must be sampled) or ``events:<kind>|<stat>`` for
anomaly counts:

    <metric>|mean1h  |mean6h  |std6h  |slope6h (per hour)  |max1h  |delta24h (mean1h - mean24h)
    system.uptime|hours            time since the last reboot
    events:anomaly|count6h, events:critical|count24h, events:anomaly|count24h

Absent data gives NaN, which the exported trees route like scikit-learn does.

The classifier is a random forest exported to the same compact tree format
as the Isolation Forest (models/forest.py, ``kind="mean"``: each leaf holds
the class fractions, the forest averages them, which is sklearn's
``predict_proba``). Its probability is then calibrated by isotonic
regression fitted on a later validation slice and shipped as two plain
arrays (``np.interp`` of them is sklearn's IsotonicRegression.predict).

Model directory: ``maintenance.npz`` (CompactForest arrays) + ``model.json``
{"kind": "maintenance", "version", "feature_names", "metrics", "interval_s",
"horizon_s", "calibration": {"x": [...], "y": [...]}, "thresholds": {"warning",
"critical"}, "base_rate", ...}.

Top contributing features: the forest's decision paths decomposed per
feature (each split's change of the positive-class fraction credited to its
feature, averaged over trees; the parts sum to the raw probability minus the
training base rate).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from models.forest import CompactForest

log = logging.getLogger(__name__)

KIND = "maintenance"
ARTEFACT = "maintenance.npz"
HOUR_S = 3600.0
HORIZON_S = 86400.0

# metrics and the statistics taken of each
TREND_METRICS = ("system.memoryPercent", "system.diskPercent", "system.temperature", "system.cpuUsage",
                 "system.load1", "system.swapPercent", "system.processCount", "disk.writeBytesPerSec",
                 "disk.readBytesPerSec")
LEVEL_METRICS = ("network.bytesReceivedPerSec", "network.bytesSentPerSec")
STATS = ("mean1h", "mean6h", "std6h", "slope6h", "max1h", "delta24h")
LOOKBACK_S = 24 * HOUR_S


def feature_names(trend: Sequence[str] = TREND_METRICS, level: Sequence[str] = LEVEL_METRICS) -> list[str]:
    names = [f"{m}|{s}" for m in trend for s in STATS]
    names += [f"{m}|{s}" for m in level for s in ("mean1h", "delta24h")]
    names += ["system.uptime|hours", "events:anomaly|count6h", "events:anomaly|count24h",
              "events:critical|count24h"]
    return names


def metrics_of(names: Sequence[str]) -> list[str]:
    """The sampled metrics a feature list needs (its ``<metric>|`` prefixes, events excluded)."""
    out: list[str] = []
    for n in names:
        base = n.split("|", 1)[0]
        if not base.startswith("events:") and base not in out:
            out.append(base)
    return out


def _slope_per_h(t: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    t = t[ok] / HOUR_S
    y = y[ok]
    tc = t - t.mean()
    den = float((tc * tc).sum())
    return float((tc * (y - y.mean())).sum() / den) if den > 0 else float("nan")


def _nanmean(y: np.ndarray) -> float:
    y = y[np.isfinite(y)]
    return float(y.mean()) if len(y) else float("nan")


def window_features(ts_s: np.ndarray, values: Mapping[str, np.ndarray], at_s: float,
                    names: Sequence[str], anomalies: Sequence[tuple[float, str]] = ()) -> np.ndarray:
    """One feature row for the time ``at_s`` from samples at or before it (nothing later is read).

    ``values``: {metric: array aligned with ts_s}, NaN where absent; ``anomalies``:
    (start ts_s, peak severity) of anomaly episodes."""
    ts = np.asarray(ts_s, dtype=np.float64)
    hi = int(np.searchsorted(ts, at_s, side="right"))
    lo = {w: int(np.searchsorted(ts, at_s - w * HOUR_S, side="left")) for w in (1, 6, 24)}
    cache: dict[str, dict[str, float]] = {}
    out = np.full(len(names), np.nan)
    an = [(t, s) for t, s in anomalies if t <= at_s]
    for j, name in enumerate(names):
        base, _, stat = name.partition("|")
        if base.startswith("events:"):
            hours = float(stat.removeprefix("count").removesuffix("h"))
            want = base.split(":", 1)[1]
            out[j] = sum(1 for t, s in an if t > at_s - hours * HOUR_S and (want == "anomaly" or s == want))
            continue
        v = values.get(base)
        if v is None:
            continue
        if stat == "hours":
            last = v[lo[24]:hi]
            last = last[np.isfinite(last)]
            out[j] = float(last[-1]) / HOUR_S if len(last) else np.nan
            continue
        c = cache.get(base)
        if c is None:
            y1, y6, y24 = v[lo[1]:hi], v[lo[6]:hi], v[lo[24]:hi]
            f1 = y1[np.isfinite(y1)]
            f6 = y6[np.isfinite(y6)]
            m1 = float(f1.mean()) if len(f1) else float("nan")
            c = {"mean1h": m1, "mean6h": float(f6.mean()) if len(f6) else float("nan"),
                 "std6h": float(f6.std()) if len(f6) >= 2 else float("nan"),
                 "slope6h": _slope_per_h(ts[lo[6]:hi] - at_s, y6),
                 "max1h": float(f1.max()) if len(f1) else float("nan"),
                 "delta24h": m1 - _nanmean(y24)}
            cache[base] = c
        out[j] = c.get(stat, np.nan)
    return out


# -- the model -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaintenanceModel:
    forest: CompactForest
    feature_names: tuple[str, ...]
    calibration_x: np.ndarray
    calibration_y: np.ndarray
    thresholds: dict[str, float]       # calibrated risk cut-offs: warning, critical
    version: int
    meta: dict

    @property
    def metrics(self) -> list[str]:
        return metrics_of(self.feature_names)

    @property
    def horizon_s(self) -> float:
        return float(self.meta.get("horizon_s", HORIZON_S))

    def raw_proba(self, X: np.ndarray) -> np.ndarray:
        """The forest's positive-class probability (== sklearn predict_proba[:, 1])."""
        return self.forest.leaf_mean(np.atleast_2d(X))[:, 1]

    def calibrate(self, p: np.ndarray) -> np.ndarray:
        if len(self.calibration_x) == 0:
            return np.asarray(p, dtype=np.float64)
        return np.interp(p, self.calibration_x, self.calibration_y)

    def risk(self, X: np.ndarray) -> np.ndarray:
        return self.calibrate(self.raw_proba(X))

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """Per feature: its splits' changes of the positive fraction along x's paths, mean over trees."""
        return path_contributions(self.forest, x, output=1)

    def top_features(self, x: np.ndarray, k: int = 3) -> list[dict[str, Any]]:
        c = self.contributions(x)
        order = np.argsort(-c)
        out = []
        for j in order[:k]:
            if c[j] <= 0:
                break
            v = float(np.asarray(x, dtype=np.float64).reshape(-1)[j])
            out.append({"feature": self.feature_names[j], "contribution": round(float(c[j]), 4),
                        "value": round(v, 4) if np.isfinite(v) else None})
        return out

    def severity(self, risk: float) -> str:
        if risk >= self.thresholds["critical"]:
            return "critical"
        if risk >= self.thresholds["warning"]:
            return "warning"
        return "normal"


def path_contributions(forest: CompactForest, x: np.ndarray, output: int = 1) -> np.ndarray:
    """Saabas decomposition of one row: value(leaf) - value(root) split into per-feature parts."""
    x32 = np.asarray(x, dtype=np.float32).reshape(-1)
    n_trees = forest.n_trees
    tree_of = np.repeat(np.arange(n_trees), np.diff(forest.tree_offsets))
    base = forest.tree_offsets[tree_of]
    leaf = forest.children_left < 0
    own = np.arange(forest.n_nodes)
    left = np.where(leaf, own, base + forest.children_left)
    right = np.where(leaf, own, base + forest.children_right)
    val = forest.value[:, output]
    contrib = np.zeros(forest.n_features)
    node = forest.tree_offsets[:-1].copy()
    for _ in range(forest.max_depth):
        inner = ~leaf[node]
        if not inner.any():
            break
        f = forest.feature[node]
        xv = x32[f]
        go_right = np.where(np.isnan(xv), forest.missing_go_left[node] == 0, xv > forest.threshold[node])
        nxt = np.where(go_right, right[node], left[node])
        np.add.at(contrib, f[inner], (val[nxt] - val[node])[inner])
        node = nxt
    return contrib / n_trees


def load_maintenance_model(model_dir: str | Path) -> MaintenanceModel:
    """Read maintenance.npz + model.json; refuses anything inconsistent (the model manager's check)."""
    d = Path(model_dir)
    meta = json.loads((d / "model.json").read_text(encoding="utf-8"))
    if meta.get("kind") != KIND:
        raise ValueError(f"{d}: model kind {meta.get('kind')!r} is not {KIND!r}")
    forest = CompactForest.load(d / meta.get("artefact", ARTEFACT))
    names = tuple(meta["feature_names"])
    if len(names) != forest.n_features or forest.value.shape[1] != 2:
        raise ValueError(f"{d}: {len(names)} feature names / {forest.value.shape[1]} outputs for a "
                         f"{forest.n_features}-feature forest (a binary classifier has 2)")
    cal = meta.get("calibration") or {}
    cx = np.asarray(cal.get("x", []), dtype=np.float64)
    cy = np.asarray(cal.get("y", []), dtype=np.float64)
    if cx.shape != cy.shape or (len(cx) and (np.any(np.diff(cx) < 0) or cy.min() < 0 or cy.max() > 1)):
        raise ValueError(f"{d}: bad calibration arrays")
    th = {k: float(v) for k, v in meta["thresholds"].items()}
    if not (0.0 <= th["warning"] <= th["critical"] <= 1.0):
        raise ValueError(f"{d}: bad thresholds {th}")
    return MaintenanceModel(forest=forest, feature_names=names, calibration_x=cx, calibration_y=cy,
                            thresholds=th, version=int(meta["version"]), meta=meta)
