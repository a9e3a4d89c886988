"""Predictive maintenance, fleet side: dataset, training, calibration, export, registry.

Dataset. One row per device and hour (at times with a sample in the past
hour), features from models.maintenance.window_features (only data at or
before the row's time), label 1 when a failure (fleet.labels' rules applied to
the device's own history) follows within ``horizon_s`` (24 h).

Split, with no leakage across time or device:

    devices   a fixed share of devices (hash of the id) is held out entirely for the test slice
    time      train [start, T1 - horizon) | calibration [T1, T2 - horizon) | test [T2, end]
              (T1 = 60 %, T2 = 80 % of the time range); the embargo of one horizon keeps
              a training row's label window out of the next slice

Model. scikit-learn RandomForestClassifier (imported lazily: fleet side only),
exported to models.forest.CompactForest (kind "mean", leaf value = class
fractions): identical to predict_proba. Isotonic calibration on the
calibration slice, exported as two arrays. Thresholds: warning = the
calibrated risk that maximises F1 on the calibration slice, critical = the
smallest risk reaching ``critical_precision`` there (at least the warning).

The model directory (maintenance.npz + model.json, kind "maintenance") is
registered in the fleet registry as a candidate of target ``fleet`` and, on
request, bundled and published through the same path as the other kinds.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fleet.labels import LabelRules, derive_failures
from models.atomic import write_dir_atomic
from models.forest import CompactForest
from models.maintenance import (
    ARTEFACT, HORIZON_S, HOUR_S, KIND, MaintenanceModel, feature_names, load_maintenance_model, metrics_of,
    window_features,
)

log = logging.getLogger(__name__)


class NotEnoughFailures(ValueError):
    """Too few labelled failures (or rows) to train or evaluate."""


@dataclass(frozen=True)
class MaintenanceParams:
    horizon_s: float = HORIZON_S
    row_every_s: float = HOUR_S
    warmup_s: float = 6 * HOUR_S          # no row before this much history
    n_estimators: int = 100
    max_depth: int = 8
    min_samples_leaf: int = 5
    seed: int = 0
    train_share: float = 0.6
    calib_share: float = 0.2
    holdout_device_share: float = 0.2
    critical_precision: float = 0.8
    min_positive_rows: int = 10


@dataclass
class Dataset:
    names: list[str]
    X: np.ndarray
    y: np.ndarray
    t: np.ndarray
    device: np.ndarray                     # device id per row
    failures: dict[str, list[float]] = field(default_factory=dict)

    def subset(self, mask: np.ndarray) -> "Dataset":
        return Dataset(self.names, self.X[mask], self.y[mask], self.t[mask], self.device[mask], self.failures)


# -- dataset -------------------------------------------------------------------------------
def device_rows(ts_s: np.ndarray, values: Mapping[str, np.ndarray], events: Sequence[Mapping[str, Any]],
                names: Sequence[str], failure_ts: Sequence[float], p: MaintenanceParams = MaintenanceParams()
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, t) of one device: hourly rows, label = a failure in (t, t + horizon]."""
    ts = np.asarray(ts_s, dtype=np.float64)
    if len(ts) < 2:
        return np.empty((0, len(names))), np.empty(0), np.empty(0)
    grid = np.arange(ts[0] + p.warmup_s, ts[-1] + 1e-9, p.row_every_s)
    near = np.searchsorted(ts, grid, side="right") - 1
    grid = grid[(near >= 0) & (grid - ts[np.maximum(near, 0)] <= HOUR_S)]
    anomalies = [(float(e["ts_s"]), str(e.get("severity"))) for e in events if e["kind"] == "anomaly"]
    X = np.array([window_features(ts, values, at, names, anomalies) for at in grid]).reshape(len(grid), len(names))
    f = np.sort(np.asarray(failure_ts, dtype=np.float64))
    nxt = np.searchsorted(f, grid, side="right")
    y = np.zeros(len(grid))
    has = nxt < len(f)
    y[has] = (f[nxt[has]] - grid[has] <= p.horizon_s).astype(float)
    return X, y, grid


def build_dataset(histories: Iterable[tuple[str, np.ndarray, Mapping[str, np.ndarray], Sequence[Mapping]]],
                  names: Sequence[str] | None = None, p: MaintenanceParams = MaintenanceParams(),
                  rules: LabelRules = LabelRules()) -> Dataset:
    """Rows from (device_id, ts_s, values, events) histories; labels derived from the same history."""
    names = list(names or feature_names())
    Xs, ys, ts, devs = [], [], [], []
    failures: dict[str, list[float]] = {}
    for device_id, t, values, events in histories:
        fails = [f.ts_s for f in derive_failures(device_id, t, values, events, rules)]
        failures[device_id] = fails
        X, y, g = device_rows(t, values, events, names, fails, p)
        Xs.append(X)
        ys.append(y)
        ts.append(g)
        devs.append(np.full(len(g), device_id, dtype=object))
    if not Xs:
        raise NotEnoughFailures("no device history")
    return Dataset(names, np.vstack(Xs), np.concatenate(ys), np.concatenate(ts), np.concatenate(devs), failures)


def histories_from_store(store: Any, since_s: float | None = None, metrics: Sequence[str] | None = None
                         ) -> list[tuple[str, np.ndarray, dict[str, np.ndarray], list[dict]]]:
    from fleet.labels import history_from_store

    wanted = list(metrics or metrics_of(feature_names())) + ["system.uptime"]
    out = []
    for d in store.devices():
        ts, values, events = history_from_store(store, d["device_id"], metrics=sorted(set(wanted)), since_s=since_s)
        if len(ts):
            out.append((d["device_id"], ts, values, events))
    return out


def histories_from_fleet(fleet: Any) -> list[tuple[str, np.ndarray, dict[str, np.ndarray], list[dict]]]:
    return [(d.device_id, d.ts_s, d.values, d.events) for d in fleet.devices]


def _holdout_device(device_id: str, share: float) -> bool:
    h = int(hashlib.sha256(device_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < share


def split(ds: Dataset, p: MaintenanceParams = MaintenanceParams()) -> dict[str, np.ndarray]:
    """Boolean masks train / calib / test (see the module docstring)."""
    t0, t1 = float(ds.t.min()), float(ds.t.max())
    T1 = t0 + p.train_share * (t1 - t0)
    T2 = t0 + (p.train_share + p.calib_share) * (t1 - t0)
    held = np.array([_holdout_device(d, p.holdout_device_share) for d in ds.device], dtype=bool)
    return {"train": ~held & (ds.t < T1 - p.horizon_s),
            "calib": ~held & (ds.t >= T1) & (ds.t < T2 - p.horizon_s),
            "test": (ds.t >= T2) & (held if held.any() else np.ones(len(held), bool)),
            "bounds": np.array([t0, T1, T2, t1])}


# -- training --------------------------------------------------------------------------------
def fit_forest(X: np.ndarray, y: np.ndarray, p: MaintenanceParams = MaintenanceParams()) -> Any:
    from sklearn.ensemble import RandomForestClassifier  # fleet-side training dependency

    if int(y.sum()) < p.min_positive_rows or int((1 - y).sum()) < p.min_positive_rows:
        raise NotEnoughFailures(f"{int(y.sum())} failure rows of {len(y)}: need at least {p.min_positive_rows} "
                                "of each class (simulate or collect a longer history)")
    rf = RandomForestClassifier(n_estimators=p.n_estimators, max_depth=p.max_depth,
                                min_samples_leaf=p.min_samples_leaf, max_features="sqrt",
                                class_weight="balanced_subsample", random_state=p.seed, n_jobs=1)
    rf.fit(X, y.astype(int))
    return rf


def export_classifier(model: Any) -> CompactForest:
    """sklearn RandomForestClassifier (binary) -> CompactForest whose leaf_mean == predict_proba."""
    if list(model.classes_) != [0, 1]:
        raise ValueError(f"a binary 0/1 classifier is needed, classes {list(model.classes_)}")
    trees = []
    for est in model.estimators_:
        t = est.tree_
        value = t.value[:, 0, :].astype(np.float64)
        value = value / value.sum(axis=1, keepdims=True)     # what DecisionTreeClassifier.predict_proba does
        cl = t.children_left.astype(np.int32)
        trees.append({
            "children_left": cl, "children_right": t.children_right.astype(np.int32),
            "feature": np.where(cl < 0, 0, t.feature).astype(np.int32),
            "threshold": t.threshold.astype(np.float64),
            "missing_go_left": np.asarray(getattr(t, "missing_go_to_left", np.zeros(len(cl))), dtype=np.uint8),
            "n_node_samples": t.n_node_samples.astype(np.int64), "value": value,
        })
    return CompactForest.from_trees(trees, n_features=int(model.n_features_in_), kind="mean")


def fit_calibration(raw: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Isotonic regression raw -> P(failure), as the arrays np.interp needs."""
    from sklearn.isotonic import IsotonicRegression

    if len(raw) < 20 or y.min() == y.max():
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(raw, y)
    return np.asarray(iso.X_thresholds_, dtype=np.float64), np.asarray(iso.y_thresholds_, dtype=np.float64)


def choose_thresholds(risk: np.ndarray, y: np.ndarray, critical_precision: float = 0.8) -> dict[str, float]:
    cands = np.unique(risk[risk > 0])
    best, warn = -1.0, 0.5
    crit = None
    for c in cands:
        pred = risk >= c
        tp = float((pred & (y == 1)).sum())
        if tp == 0:
            continue
        prec, rec = tp / pred.sum(), tp / max(y.sum(), 1)
        f1 = 2 * prec * rec / (prec + rec)
        if f1 > best:
            best, warn = f1, float(c)
        if crit is None and prec >= critical_precision:
            crit = float(c)
    crit = max(crit if crit is not None else min(1.0, 2 * warn), warn)
    return {"warning": warn, "critical": crit}


def metrics_of_scores(score: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    out = {"rows": int(len(y)), "positives": int(y.sum())}
    pred = score >= threshold
    tp = float((pred & (y == 1)).sum())
    out["precision"] = tp / pred.sum() if pred.sum() else 0.0
    out["recall"] = tp / y.sum() if y.sum() else None
    if 0 < y.sum() < len(y):
        out["pr_auc"] = float(average_precision_score(y, score))
        out["roc_auc"] = float(roc_auc_score(y, score))
    out["brier"] = float(brier_score_loss(y, np.clip(score, 0, 1)))
    return out


def train(ds: Dataset, p: MaintenanceParams = MaintenanceParams(), masks: dict[str, np.ndarray] | None = None
          ) -> tuple[CompactForest, dict[str, Any]]:
    """Fit, calibrate, pick thresholds; returns the engine and the model.json fields (no version)."""
    masks = masks or split(ds, p)
    tr, ca = masks["train"], masks["calib"]
    rf = fit_forest(ds.X[tr], ds.y[tr], p)
    forest = export_classifier(rf)
    raw_c = forest.leaf_mean(ds.X[ca])[:, 1]
    cx, cy = fit_calibration(raw_c, ds.y[ca])
    risk_c = np.interp(raw_c, cx, cy)
    th = choose_thresholds(risk_c, ds.y[ca], p.critical_precision) if ds.y[ca].sum() else {"warning": 0.5,
                                                                                           "critical": 0.8}
    meta = {
        "kind": KIND, "artefact": ARTEFACT, "feature_names": list(ds.names), "metrics": metrics_of(ds.names),
        "horizon_s": p.horizon_s, "interval_s": p.row_every_s,
        "calibration": {"method": "isotonic", "x": cx.tolist(), "y": cy.tolist()},
        "thresholds": th, "base_rate": float(ds.y[tr].mean()), "params": asdict(p),
        "rows": {"train": int(tr.sum()), "calib": int(ca.sum()), "test": int(masks["test"].sum())},
    }
    if masks["test"].any():
        te = masks["test"]
        meta["holdout"] = metrics_of_scores(np.interp(forest.leaf_mean(ds.X[te])[:, 1], cx, cy), ds.y[te],
                                            th["warning"])
    return forest, meta


def holdout_warnings(meta: Mapping[str, Any]) -> list[str]:
    """What makes the held-out scores meaningless, in words: a slice without failures gives
    precision 0.0 and no recall, which reads like a bad model rather than an unevaluated one."""
    holdout = meta.get("holdout")
    rows = (meta.get("rows") or {}).get("test", 0)
    if not holdout:
        return [f"no held-out rows ({rows}): the model is not evaluated; collect or simulate a longer history"]
    if not holdout.get("positives"):
        return [f"the held-out slice ({holdout.get('rows')} rows) holds no failure rows: its precision "
                f"({holdout.get('precision')}) and recall mean nothing; collect or simulate a longer history"]
    return []


def write_model(out_dir: str | Path, forest: CompactForest, meta: Mapping[str, Any], version: int,
                replace: bool = False) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(buf, **forest.to_arrays())
    doc = dict(meta, version=int(version), created_at_s=time.time())
    path = write_dir_atomic(out_dir, {ARTEFACT: buf.getvalue(),
                                      "model.json": json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")},
                            replace=replace)
    load_maintenance_model(path)   # what a device's loader will check
    return path


# -- registry and commands -----------------------------------------------------------------------
def register_model(config: Any, store: Any, forest: CompactForest, meta: Mapping[str, Any], ds: Dataset,
                   masks: Mapping[str, np.ndarray], publish: bool = False) -> Any:
    """A new version for target ``fleet`` (candidate; published when asked)."""
    from fleet.registry import Registry, publish_record, version_dir
    from models.bundle import Target

    registry = Registry(store)
    target = Target("fleet", "all")
    version = registry.next_version(target)
    vdir = version_dir(config, target, version)
    write_model(vdir / KIND, forest, meta, version, replace=True)
    b = masks["bounds"]
    rec = registry.register(target, version, kinds=[KIND], artefact_dir=vdir,
                            params={"interval_s": meta["interval_s"], **meta["params"]},
                            metrics=meta.get("holdout", {}), note="maintenance",
                            data={"data_from_s": float(b[0]), "data_to_s": float(b[3]), "holdout_from_s": float(b[2]),
                                  "n_train": int(masks["train"].sum()), "n_holdout": int(masks["test"].sum()),
                                  "devices": sorted(set(ds.device.tolist()))})
    if publish:
        publish_record(config, registry, rec)
    return registry.require(target, version)


def run_command(args: Any) -> int:
    """``edge-fleet maintenance train|evaluate`` (see fleet/maintenance_cli.py)."""
    from fleet.config import load_config
    from fleet.store import StoreError, open_store

    if getattr(args, "verbose", 0):
        logging.getLogger().setLevel(logging.DEBUG if args.verbose > 1 else logging.INFO)
    try:
        config = load_config(args.config)
        store = open_store(args.store or config.store_url)
    except (ValueError, StoreError) as exc:
        print(f"edge-fleet maintenance: {exc}")
        return 2
    with store:
        p = MaintenanceParams(**({"n_estimators": args.trees, "max_depth": args.max_depth, "seed": args.seed}
                                 if args.maintenance_command == "train" else {}))
        ds = build_dataset(histories_from_store(store, args.since), p=p)
        masks = split(ds, p)
        try:
            if args.maintenance_command == "train":
                forest, meta = train(ds, p, masks)
                out: dict[str, Any] = {"rows": meta["rows"], "thresholds": meta["thresholds"],
                                       "holdout": meta.get("holdout")}
                warnings = holdout_warnings(meta)
                if warnings:
                    out["warnings"] = warnings
                for text in warnings:
                    print(f"edge-fleet maintenance: warning: {text}", file=sys.stderr)
                if args.out:
                    write_model(args.out, forest, meta, 1, replace=True)
                    out["out"] = args.out
                if not args.no_register:
                    rec = register_model(config, store, forest, meta, ds, masks, publish=args.publish)
                    out["version"] = rec.version
                    out["published"] = rec.published_s is not None
            else:
                model = _model_for_evaluate(args, config, store)
                te = masks["test"] if masks["test"].any() else np.ones(len(ds.y), bool)
                out = metrics_of_scores(model.risk(ds.X[te]), ds.y[te], model.thresholds["warning"])
                out["version"] = model.version
        except NotEnoughFailures as exc:
            print(f"edge-fleet maintenance: {exc}")
            return 1
    if args.json:
        print(json.dumps(out, indent=1, default=float))
    else:
        for k, v in out.items():
            print(f"{k:12s} {v}")
    return 0


def _model_for_evaluate(args: Any, config: Any, store: Any) -> MaintenanceModel:
    if args.model:
        return load_maintenance_model(args.model)
    from fleet.registry import Registry
    from models.bundle import Target

    recs = [r for r in Registry(store).list(Target("fleet", "all")) if KIND in r.kinds]
    if not recs:
        raise NotEnoughFailures("no maintenance model registered: run `edge-fleet maintenance train` first")
    return load_maintenance_model(recs[-1].kind_dir(KIND))
