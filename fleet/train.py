"""``edge-fleet train``: dataset -> Isolation Forest + LSTM -> held-out scores -> registry -> A/B -> publish.

One run for one target:

1. ``fleet.dataset.build_dataset``: the target's rows, the recent held-out slice;
2. the forest (``models.training.forest``, thresholds calibrated on the training
   rows) and, unless disabled or the history is too short, the LSTM forecaster
   (``models.training.lstm``), both written under ``<artefact_dir>/<target>/v<N>/``;
3. both are scored on the held-out rows the way a device would run them - the
   compact forest engine and the TFLite interpreter, not sklearn or Keras:
   anomaly rate on clean rows (outside operator labels), precision and event
   recall on labelled windows, forecast MASE (scaled by the one-step naive MAE of
   the training part), the same for the naive forecast, and the realised coverage
   of the 80/95 % conformal intervals built from the model's calibration residuals;
4. the version is registered as a candidate, the champion is scored on the same
   held-out rows, ``fleet.registry.compare`` decides, and a promoted version is
   signed and published retained on the target's model topic.

scikit-learn and TensorFlow are imported inside the trainers, only here.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from fleet.config import FleetConfig, TrainSection
from fleet.dataset import Dataset, build_dataset, in_windows
from fleet.registry import ModelRecord, Registry, compare, publish_record, version_dir
from fleet.store import Store
from models.bundle import Target

log = logging.getLogger(__name__)

TRAIN_STAGES = 3   # train the candidate, score the champion on its held-out rows, decide (and publish)

LEVELS = (0.8, 0.95)


class TrainingError(RuntimeError):
    """Training could not produce a model; the message is for the operator."""


def forest_params(p: TrainSection) -> Any:
    from models.training.forest import ForestParams

    return ForestParams(n_estimators=p.n_estimators, contamination=p.contamination, min_samples=p.min_samples,
                        random_state=p.seed)


def lstm_params(p: TrainSection) -> Any:
    from models.training.lstm import LSTMParams

    return LSTMParams(seq_len=p.seq_len, horizon=p.horizon, units=p.units, epochs=p.epochs,
                      time_features=p.time_features, seed=p.seed)


# -- evaluation on the held-out slice (device-side engines) ---------------------------------------
def evaluate_forest(model_dir: Path, ds: Dataset) -> dict[str, Any]:
    from models.features import build_matrix
    from models.forest import load_forest_model

    model = load_forest_model(model_dir)
    warning = model.thresholds["warning"]
    clean_n = clean_flag = flagged = true_pos = scored = 0
    events = events_hit = 0
    for d in ds.devices:
        X = build_matrix([v for _, v in d.rows], model.feature_names)[d.split:]
        ts = np.array([t for t, _ in d.holdout_rows])
        ok = np.isfinite(X).all(axis=1)
        X, ts = X[ok], ts[ok]
        if not len(X):
            continue
        flag = -model.forest.score_samples(X) >= warning   # a >= warning: what the device calls an anomaly
        windows = [w for w in ds.labels.get(d.device_id, ()) if w[1] >= ts[0] and w[0] <= ts[-1]]
        labelled = in_windows(ts, windows)
        scored += len(X)
        clean_n += int((~labelled).sum())
        clean_flag += int((flag & ~labelled).sum())
        flagged += int(flag.sum())
        true_pos += int((flag & labelled).sum())
        for start, end, _ in windows:
            events += 1
            events_hit += int(flag[(ts >= start) & (ts <= end)].any())
    if scored == 0:
        raise TrainingError(f"{model_dir}: no held-out row has every feature the forest needs")
    return {
        "clean_anomaly_rate": clean_flag / clean_n if clean_n else None,
        "precision": (true_pos / flagged if flagged else 0.0) if events else None,
        "event_recall": events_hit / events if events else None,
        "labelled_events": events,
        "rows_scored": scored,
    }


def evaluate_lstm(model_dir: Path, ds: Dataset, max_origins: int = 300) -> dict[str, Any]:
    from models.forecast.conformal import conformal_offsets
    from models.forecast.lstm import LSTMForecaster
    from models.forecast.scoring import naive_scale
    from models.forecast.series import ffill, rows_to_columns
    from models.training.lstm import prepare_series

    fc = LSTMForecaster.from_dir(model_dir)
    h, L = fc.horizon, fc.seq_len
    offsets = {}
    for j, metric in enumerate(fc.targets):
        resid = fc.calibration_residuals(metric)
        if len(resid):
            offsets[j] = {lv: [conformal_offsets(resid[:, k], 1.0 - lv) for k in range(h)] for lv in LEVELS}
    mase, naive_mase = [], []
    hits = {lv: 0 for lv in LEVELS}
    checks = {lv: 0 for lv in LEVELS}
    origins_scored = 0
    for d in ds.devices:
        ts, X = rows_to_columns(d.rows, fc.inputs)
        if not np.isfinite(X).any(axis=0).all():
            continue                                   # the device lacks an input metric
        t, Y, _ = prepare_series(ts, X, fc.step_s)
        Y = ffill(Y)
        first_hold = int(np.searchsorted(t, d.split_ts_s))
        lo = max(L - 1, first_hold - 1)
        hi = len(Y) - h - 1
        if hi < lo:
            continue
        origins = np.unique(np.linspace(lo, hi, min(max_origins, hi - lo + 1)).round().astype(int))
        tidx = [fc.inputs.index(m) for m in fc.targets]
        err, nerr, n_ok = [], [], 0
        for i in origins:
            window = Y[i - L + 1:i + 1]
            if not np.isfinite(window).all():
                continue
            pred = fc.predict(window, t[i - L + 1:i + 1])          # (h, targets)
            actual = Y[i + 1:i + h + 1][:, tidx]
            err.append(np.abs(actual - pred))
            nerr.append(np.abs(actual - Y[i, tidx][None, :]))
            n_ok += 1
            for j, by_level in offsets.items():
                for lv, offs in by_level.items():
                    for k in range(h):
                        q_lo, q_hi = offs[k]
                        a = actual[k, j]
                        if math.isfinite(a) and math.isfinite(q_lo) and math.isfinite(q_hi):
                            checks[lv] += 1
                            hits[lv] += int(pred[k, j] + q_lo <= a <= pred[k, j] + q_hi)
        if not n_ok:
            continue
        origins_scored += n_ok
        E, N = np.stack(err), np.stack(nerr)                          # (origins, h, targets)
        for j, col in enumerate(tidx):
            scale = naive_scale(Y[:max(first_hold, 2), col])
            if math.isfinite(scale) and scale > 0:
                mase.append(float(np.nanmean(E[:, :, j])) / scale)
                naive_mase.append(float(np.nanmean(N[:, :, j])) / scale)
    if origins_scored == 0:
        raise TrainingError(f"{model_dir}: no held-out forecast origin (held-out slice shorter than "
                            f"seq_len {L} + horizon {h}, or input metrics missing)")
    cov = {lv: hits[lv] / checks[lv] if checks[lv] else None for lv in LEVELS}
    cov_err = [abs(c - lv) for lv, c in cov.items() if c is not None]
    return {
        "forecast_mase": float(np.mean(mase)) if mase else None,
        "naive_mase": float(np.mean(naive_mase)) if naive_mase else None,
        "coverage_80": cov[0.8],
        "coverage_95": cov[0.95],
        "coverage_error": float(np.mean(cov_err)) if cov_err else None,
        "origins_scored": origins_scored,
        "targets": list(fc.targets),
    }


def evaluate(kind_dirs: Mapping[str, Path], ds: Dataset, config: FleetConfig) -> dict[str, Any]:
    """Held-out scores of one version (its forest and/or LSTM directories)."""
    out: dict[str, Any] = {"kinds": sorted(kind_dirs), "n_holdout": ds.n_holdout,
                           "holdout_from_s": ds.holdout_from_s}
    if "forest" in kind_dirs:
        out.update(evaluate_forest(kind_dirs["forest"], ds))
    if "lstm" in kind_dirs:
        out.update(evaluate_lstm(kind_dirs["lstm"], ds, config.train.max_eval_origins))
    return out


# -- training --------------------------------------------------------------------------------------
def train_candidate(store: Store, config: FleetConfig, target: Target, *, use_lstm: bool | None = None,
                    source: str | None = None, shadow: Store | None = None, now_s: float | None = None,
                    since_s: float | None = None, registry: Registry | None = None) -> tuple[ModelRecord, Dataset]:
    """Train, score on the held-out slice and register a candidate; returns it and its dataset."""
    from models.training.forest import train_forest_from_matrix

    now = time.time() if now_s is None else now_s
    registry = registry or Registry(store)
    p = config.train
    ds = build_dataset(store, config, target, now_s=now, source=source, shadow=shadow, since_s=since_s)
    version = registry.next_version(target)
    vdir = version_dir(config, target, version)
    if vdir.exists():   # left by a run that died before registering: never registered, safe to replace
        shutil.rmtree(vdir)
    vdir.mkdir(parents=True)
    fparams = forest_params(p)
    meta_extra = {"target": target.label, "interval_s": ds.interval_s,
                  "data": {"first_ts_s": ds.data_from_s, "last_ts_s": ds.holdout_from_s,
                           "devices": [d.device_id for d in ds.devices], "source": ds.source}}
    train_forest_from_matrix(ds.train_matrix(), ds.features, fparams, vdir / "forest", version,
                             extra_meta=meta_extra)
    kind_dirs = {"forest": vdir / "forest"}
    params: dict[str, Any] = {"interval_s": ds.interval_s, "source": ds.source, "features": list(ds.features),
                              "forest": asdict(fparams), "lstm": None}
    skipped = None
    want_lstm = p.lstm if use_lstm is None else use_lstm
    if want_lstm and ds.forecast_metrics:
        skipped = _train_lstm(ds, p, vdir / "lstm", version, target)
        if skipped is None:
            kind_dirs["lstm"] = vdir / "lstm"
            params["lstm"] = {**asdict(lstm_params(p)), "metrics": list(ds.forecast_metrics),
                              "step_s": p.step_s, "device": ds.forecast_device().device_id}
    elif want_lstm:
        skipped = f"none of {list(p.forecast_metrics)} is in at least 90 % of the rows"
    metrics = evaluate(kind_dirs, ds, config)
    if skipped:
        metrics["lstm_skipped"] = skipped
        log.warning("%s v%d: no LSTM (%s)", target.label, version, skipped)
    champion = registry.champion(target)
    data = {"data_from_s": ds.data_from_s, "data_to_s": ds.data_to_s, "holdout_from_s": ds.holdout_from_s,
            "n_train": ds.n_train, "n_holdout": ds.n_holdout, "devices": [d.device_id for d in ds.devices]}
    record = registry.register(target, version, kinds=sorted(kind_dirs), artefact_dir=vdir, params=params,
                               metrics=metrics, parent_version=champion.version if champion else None, data=data,
                               now_s=now)
    log.info("%s: candidate v%d registered: %s", target.label, version,
             " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None))
    return record, ds


def _train_lstm(ds: Dataset, p: TrainSection, out: Path, version: int, target: Target) -> str | None:
    """Train the forecaster; None when it worked, else why it was left out."""
    from models.forecast.series import rows_to_columns
    from models.training.lstm import ConversionMismatch, NotEnoughHistory, train_lstm

    d = ds.forecast_device()
    metrics = list(ds.forecast_metrics)
    ts, X = rows_to_columns(d.train_rows, metrics)
    try:
        train_lstm(ts, X, metrics, out, version, lstm_params(p), step_s=p.step_s or None,
                   extra_meta={"target": target.label, "interval_s": ds.interval_s})
    except (NotEnoughHistory, ConversionMismatch, ValueError) as exc:
        shutil.rmtree(out, ignore_errors=True)
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass
class TrainOutcome:
    target: str
    record: ModelRecord
    comparison: dict[str, Any]
    promoted: bool
    published: tuple[str, str] | None = None
    publish_error: str | None = None
    champion_metrics: dict[str, Any] | None = field(default=None)

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "version": self.record.version, "promoted": self.promoted,
                "reason": self.comparison.get("reason"), "comparison": self.comparison,
                "metrics": dict(self.record.metrics), "champion_metrics": self.champion_metrics,
                "published": {"topic": self.published[0], "what": self.published[1]} if self.published else None,
                "publish_error": self.publish_error}


def champion_scores(config: FleetConfig, champion: ModelRecord, ds: Dataset) -> dict[str, Any]:
    """The champion on the challenger's held-out rows; {} when it cannot be scored there."""
    try:
        return evaluate({k: champion.kind_dir(k) for k in champion.kinds}, ds, config)
    except Exception as exc:  # noqa: BLE001 - a champion that cannot run on today's data loses every criterion
        log.warning("%s: champion v%d cannot be scored on the held-out data: %s", champion.target,
                    champion.version, exc)
        return {}


def run_training(store: Store, config: FleetConfig, target: Target, *, use_lstm: bool | None = None,
                 source: str | None = None, shadow: Store | None = None, publish: bool | None = None,
                 force_promote: bool = False, now_s: float | None = None,
                 since_s: float | None = None, progress: Callable[[int, int], None] | None = None) -> TrainOutcome:
    """Train a challenger, compare it with the champion on the same held-out rows, promote, publish;
    ``progress(done, TRAIN_STAGES)`` after each stage (train, score the champion, decide and publish)."""
    tell = progress or (lambda done, total: None)
    registry = Registry(store)
    champion = registry.champion(target)
    record, ds = train_candidate(store, config, target, use_lstm=use_lstm, source=source, shadow=shadow,
                                 now_s=now_s, since_s=since_s, registry=registry)
    tell(1, TRAIN_STAGES)
    champ_metrics = champion_scores(config, champion, ds) if champion is not None else None
    tell(2, TRAIN_STAGES)
    comparison = compare(record.metrics, champ_metrics, config.promote, champion.version if champion else None)
    if force_promote and not comparison["promote"]:
        comparison = {**comparison, "promote": True, "reason": f"forced ({comparison['reason']})"}
    registry.set_comparison(target, record.version, comparison)
    outcome = TrainOutcome(target.label, record, comparison, comparison["promote"], champion_metrics=champ_metrics)
    if not comparison["promote"]:
        log.info("%s: v%d stays a candidate: %s", target.label, record.version, comparison["reason"])
        outcome.record = registry.require(target, record.version)
        tell(3, TRAIN_STAGES)
        return outcome
    registry.promote(target, record.version)
    if config.promote.publish if publish is None else publish:
        try:
            outcome.published = publish_record(config, registry, registry.require(target, record.version))
        except Exception as exc:  # noqa: BLE001 - promoted but not sent: `retrain` publishes it later
            outcome.publish_error = f"{type(exc).__name__}: {exc}"
            log.error("%s: v%d promoted but not published: %s", target.label, record.version, outcome.publish_error)
    outcome.record = registry.require(target, record.version)
    tell(3, TRAIN_STAGES)
    return outcome
