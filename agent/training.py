"""``edge-agent train``: train models on the device's own history, then install them.

Run as a subprocess of the daemon (bootstrap and the daily retrain) or by hand.
This is the only agent module that reaches for scikit-learn or TensorFlow, and
it does so inside functions, so importing it costs the daemon nothing.

The training set is the buffered history minus the spans of known anomaly
episodes: a model fitted on its own incidents would learn to call them normal.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from agent.config import AgentConfig
from agent.events import EventLog
from agent.store import Store

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training could not produce a model (too little data, missing library); the message says why."""


@dataclass(frozen=True)
class TrainingWindow:
    window_s: float = 7 * 86400.0   # history considered
    max_rows: int = 20_000          # newest rows kept (memory bound on a 1 GB device)


def clean_rows(store: Store, window: TrainingWindow, now_s: float) -> list[dict[str, float]]:
    """Recent samples outside anomaly episodes, oldest first."""
    spans = EventLog(store).anomalous_spans()
    rows = store.samples(since_s=now_s - window.window_s, limit=window.max_rows)
    return [values for ts, values in rows if not any(start <= ts <= end for start, end in spans)]


def _updater(cfg: AgentConfig, store: Store) -> Any:
    from agent.updates import ModelUpdater

    return ModelUpdater(cfg.agent.state_dir, store.conn, cfg.models.trusted_keys, cfg.device_id, cfg.agent.groups)


def _train_and_install(cfg: AgentConfig, store: Store, kind: str,
                       fit: Callable[[Path, int], dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    """Train into a staging directory on the state filesystem (so the install is a rename), install it
    as the device's local ``kind`` model and queue the decision for the running daemon to publish."""
    updater = _updater(cfg, store)
    staging = Path(tempfile.mkdtemp(prefix="train-", dir=cfg.agent.state_dir))
    try:
        model_dir = staging / kind
        meta = fit(model_dir, updater.next_local_version(kind))
        decision = updater.install_local(kind, model_dir)
        if decision.event:
            updater.queue_event(decision.event)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not decision.accepted:
        raise TrainingError(f"trained {kind} not installed: {decision.reason}")
    return decision, meta


FOREST_STAGES = 3   # read the clean history, fit, install: what ``progress(done, FOREST_STAGES)`` counts


def train_forest(cfg: AgentConfig, params: Any = None, window: TrainingWindow = TrainingWindow(),
                 now_s: float | None = None, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Fit the Isolation Forest on clean history and install it as the device's local model."""
    tell = progress or (lambda done, total: None)
    try:
        from models.training.forest import NotEnoughSamples, train_forest_from_rows
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise TrainingError(f"scikit-learn is not installed ({exc}); install the 'train' extra") from None
    from models.features import select_feature_names

    if params is None:  # the same [detect] keys the daemon's detector and schedule use
        from agent.detection import forest_params

        params = forest_params(cfg.detect)
    now_s = time.time() if now_s is None else now_s
    store = Store(cfg.db_path)
    if not store.available:
        raise TrainingError(f"database {cfg.db_path} cannot be opened")
    try:
        rows = clean_rows(store, window, now_s)
        tell(1, FOREST_STAGES)
        features = select_feature_names(rows, cfg.detect.features)
        if not features:
            raise TrainingError(f"no usable feature in {len(rows)} clean samples")

        def fit(model_dir: Path, version: int) -> dict[str, Any]:
            try:
                meta = train_forest_from_rows(rows, features, params, model_dir, version=version)
            except NotEnoughSamples as exc:
                raise TrainingError(f"not enough clean samples: {exc}") from None
            tell(2, FOREST_STAGES)
            return meta

        decision, meta = _train_and_install(cfg, store, "forest", fit)
        tell(3, FOREST_STAGES)
    finally:
        store.close()
    log.info("forest v%s trained on %d samples x %d features and installed", decision.version, meta.get("n_samples"),
             len(features))
    return {"kind": "forest", "version": decision.version, "n_samples": meta.get("n_samples"), "features": list(features)}


# Peak RSS of `edge-agent train --kind forecast` measured by bench/footprint.py: 685 MB, of which 555 MB is
# `import tensorflow` alone (x86-64, TF 2.x): no batch size brings TensorFlow under 300 MB, so a device with
# less free memory than this leaves LSTM training to the fleet instead of swapping or being OOM-killed.
LSTM_TRAIN_MEMORY_BYTES = 800 * 1024 * 1024


def memory_available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def check_training_memory(available_bytes: int, needed_bytes: int = LSTM_TRAIN_MEMORY_BYTES) -> None:
    """Refuse before TensorFlow is imported: the import alone would take most of a 1 GB Pi."""
    if available_bytes < needed_bytes:
        raise TrainingError(
            f"on-device LSTM training needs about {needed_bytes / 2**20:.0f} MiB free (TensorFlow alone takes "
            f"~555 MiB) but {available_bytes / 2**20:.0f} MiB is available; train it on the fleet side "
            "(edge-fleet train) and push the signed bundle to this device")


def train_forecaster(cfg: AgentConfig, window: TrainingWindow = TrainingWindow(),
                     now_s: float | None = None, progress: Callable[[int, int], None] | None = None,
                     available_bytes: Callable[[], int] = memory_available_bytes) -> dict[str, Any]:
    """Fit the LSTM forecaster on this device's history ([forecast] metrics, step means) and install it
    as the device's local ``lstm`` model; the running daemon picks it up within ``poll_interval_s``.

    Unlike the forest, anomaly episodes stay in: a forecaster has to know what really happens next.
    """
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:
        raise TrainingError("TensorFlow is not installed (install the 'train' extra)")
    check_training_memory(available_bytes())
    from agent.forecasting import params_from_section, step_means, wanted_metrics
    from models.training.lstm import ConversionMismatch, LSTMParams, NotEnoughHistory, train_lstm_from_rows

    fc = cfg.forecast
    engine = params_from_section(fc).engine
    params = LSTMParams(seq_len=fc.train_seq_len, horizon=fc.horizon, units=fc.train_units, epochs=fc.train_epochs)
    store = Store(cfg.db_path)
    if not store.available:
        raise TrainingError(f"database {cfg.db_path} cannot be opened")
    try:
        if now_s is None:  # the newest stored week, whatever the wall clock says now (a Pi without RTC)
            now_s = store.sample_stats()["newest"] or time.time()
        names = wanted_metrics(store.metric_names(), engine)
        rows = step_means(store, now_s - window.window_s, fc.step_s, names, until_s=now_s, max_rows=window.max_rows)
        # a metric missing from more than a tenth of the steps (no sensor, a new mount) would cut the history
        metrics = [m for m in names if sum(m in v for _, v in rows) >= 0.9 * len(rows)] if rows else []
        if not metrics:
            raise TrainingError(f"no forecast metric with enough history in {len(rows)} steps of {fc.step_s:g} s")

        def fit(model_dir: Path, version: int) -> dict[str, Any]:
            try:
                return train_lstm_from_rows(rows, metrics, model_dir, version, params, step_s=fc.step_s,
                                            progress=progress)
            except NotEnoughHistory as exc:
                raise TrainingError(f"not enough history for the LSTM: {exc}") from None
            except ConversionMismatch as exc:
                raise TrainingError(f"the converted LSTM was not shipped: {exc}") from None

        decision, meta = _train_and_install(cfg, store, "lstm", fit)
    finally:
        store.close()
    val = meta.get("validation") or {}
    log.info("LSTM v%s trained on %d steps of %s and installed", decision.version, len(rows), ", ".join(metrics))
    return {"kind": "lstm", "version": decision.version, "n_steps": len(rows), "metrics": metrics,
            "step_s": fc.step_s, "validation_mae": val.get("mae"), "naive_mae": val.get("naive_mae"),
            "epochs_run": (meta.get("training") or {}).get("epochs_run")}
