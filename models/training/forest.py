"""Train an Isolation Forest with scikit-learn and export it to the compact format.

Only training commands import this module (it imports sklearn); the device only
needs models.forest. The artefact is a directory written atomically:

    forest.npz   plain arrays (models.forest.CompactForest)
    model.json   {"kind": "forest", "version", "feature_names", "scaler": null,
                  "thresholds": {"median", "warning", "critical"}, "baseline":
                  {"median", "scale"}, "params", "trained_at", "n_samples", ...}

Thresholds are on the anomaly score a = -score_samples (higher = more abnormal),
calibrated on the training scores: warning = quantile q = 1 - contamination (the
same cut as sklearn's offset_, i.e. decision_function < 0) plus a small-sample
margin, critical = the ``critical_quantile`` quantile, raised to at least warning +
``critical_margin`` x (warning - median) so that critical is never on top of warning.

Why the margin: q is an extreme order statistic of *in-sample* scores. Training rows
sit inside the trees (they score lower than new rows from the same host), and a
short training window has not seen the host's slow drift and daily cycle, so new
normal rows cross q far more often than ``contamination``: with 100 training rows
of a noisy host, 15-25 % of the next 300 rows did (enough to fail the device's own
health check and roll the bootstrap forest back). warning = q + m x (q - median)
with m = ``warning_margin`` x (sqrt(``margin_reference_n`` / n) - 1), never below 0:
the estimate's error shrinks like 1/sqrt(n), so the margin does too; m = 1.08 at
100 rows, 0.13 at 640 and 0 from 1,000 rows on. It must vanish for large sets: an
isolation forest's score saturates (a point cut off by the first split scores
about 0.67 with 256-row trees), so a fixed margin would lift warning above the
score of the clearest outliers and the fleet's forests would miss them.
No scaler: trees are invariant to monotone per-feature scaling.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from models.features import build_matrix
from models.forest import CompactForest, average_path_length
from models.zscore import ZScoreParams, robust_center_scale

from models.atomic import write_dir_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForestParams:
    n_estimators: int = 100
    contamination: float = 0.01
    max_samples: int | str = "auto"
    min_samples: int = 100
    critical_quantile: float = 0.999
    critical_margin: float = 0.5
    warning_margin: float = 0.5       # see the module docstring
    margin_reference_n: int = 1000
    random_state: int = 0


class NotEnoughSamples(ValueError):
    pass


def fit_isolation_forest(X: np.ndarray, params: ForestParams = ForestParams()):
    from sklearn.ensemble import IsolationForest  # training-only dependency

    X = np.asarray(X, dtype=np.float64)
    if len(X) < params.min_samples:
        raise NotEnoughSamples(f"{len(X)} samples < min_samples={params.min_samples}")
    model = IsolationForest(n_estimators=params.n_estimators, contamination=params.contamination,
                            max_samples=params.max_samples, random_state=params.random_state)
    model.fit(X)
    return model


def export_isolation_forest(model) -> CompactForest:
    """sklearn IsolationForest -> CompactForest with identical scores."""
    n_features = int(model.n_features_in_)
    trees = []
    for est, feats in zip(model.estimators_, model.estimators_features_):
        t = est.tree_
        cl = t.children_left.astype(np.int32)
        leaf = cl < 0
        # the bagging step may hand each tree a column subset/permutation: map back to X's columns
        subsample = model._max_features != n_features
        feat = np.where(leaf, 0, np.asarray(feats)[np.maximum(t.feature, 0)] if subsample else t.feature)
        depths = t.compute_node_depths().astype(np.float64)
        apl = average_path_length(t.n_node_samples)
        value = (depths + apl) - 1.0           # same expression order as sklearn
        mgl = getattr(t, "missing_go_to_left", np.zeros(len(cl), dtype=np.uint8))
        trees.append({
            "children_left": cl, "children_right": t.children_right.astype(np.int32),
            "feature": feat.astype(np.int32), "threshold": t.threshold.astype(np.float64),
            "missing_go_left": np.asarray(mgl, dtype=np.uint8),
            "n_node_samples": t.n_node_samples.astype(np.int64), "value": value[:, None],
        })
    return CompactForest.from_trees(trees, n_features=n_features, kind="isolation",
                                    offset=float(model.offset_), max_samples=int(model.max_samples_))


def calibrate_thresholds(anomaly_scores: np.ndarray, params: ForestParams = ForestParams()) -> dict[str, float]:
    a = np.asarray(anomaly_scores, dtype=np.float64)
    median = float(np.median(a))
    q = float(np.quantile(a, 1.0 - params.contamination))
    margin = params.warning_margin * max(0.0, math.sqrt(params.margin_reference_n / max(len(a), 1)) - 1.0)
    warning = q + margin * max(q - median, 0.0)
    critical = float(np.quantile(a, params.critical_quantile))
    critical = max(critical, warning + params.critical_margin * max(warning - median, 1e-6))
    return {"median": median, "warning": warning, "critical": critical}


def write_model_dir(out_dir: str | Path, forest: CompactForest, meta: dict, replace: bool = False) -> Path:
    """Write forest.npz + model.json into a temp dir, fsync, then rename into place.

    ``replace=True`` swaps an existing directory (moved aside, then removed);
    without it an existing ``out_dir`` is an error, which keeps the write atomic.
    """
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **forest.to_arrays())
    return write_dir_atomic(out_dir, {"forest.npz": buf.getvalue(),
                                      "model.json": json.dumps(meta, indent=2, sort_keys=True).encode("utf-8")},
                            replace=replace)


def train_forest_from_matrix(X: np.ndarray, feature_names: Sequence[str], params: ForestParams, out_dir: str | Path,
                             version: int, extra_meta: Mapping | None = None, replace: bool = False) -> dict:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != len(feature_names):
        raise ValueError("X must be (n_samples, len(feature_names))")
    X = X[np.isfinite(X).all(axis=1)]
    model = fit_isolation_forest(X, params)
    forest = export_isolation_forest(model)
    a = -forest.score_samples(X)
    center, scale = robust_center_scale(X, ZScoreParams())
    meta = {
        "kind": "forest",
        "format_version": 1,
        "artefact": "forest.npz",
        "version": int(version),
        "feature_names": list(feature_names),
        "scaler": None,
        "thresholds": calibrate_thresholds(a, params),
        "baseline": {"median": center.tolist(), "scale": scale.tolist()},
        "offset": forest.offset,
        "max_samples": forest.max_samples,
        "n_estimators": forest.n_trees,
        "params": asdict(params),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "n_samples": int(len(X)),
    }
    if extra_meta:
        meta.update(dict(extra_meta))
    write_model_dir(out_dir, forest, meta, replace=replace)
    log.info("trained forest v%d on %d samples x %d features -> %s", version, len(X), X.shape[1], out_dir)
    return meta


def train_forest_from_rows(rows: Sequence[Mapping[str, float]], feature_names: Sequence[str],
                           params: ForestParams, out_dir: str | Path, version: int,
                           replace: bool = False) -> dict:
    """Sample dicts (oldest first) -> model directory; returns model.json's content.

    Rows still holding a NaN after forward fill (a metric not yet seen) are dropped.
    Raises NotEnoughSamples below ``params.min_samples`` usable rows.
    """
    X = build_matrix(rows, feature_names)
    return train_forest_from_matrix(X, feature_names, params, out_dir, version, replace=replace)


