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
from typing import Any

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


def train_forest(cfg: AgentConfig, params: Any = None, window: TrainingWindow = TrainingWindow(),
                 now_s: float | None = None) -> dict[str, Any]:
    """Fit the Isolation Forest on clean history and install it as the device's local model."""
    try:
        from models.training.forest import ForestParams, NotEnoughSamples, train_forest_from_rows
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise TrainingError(f"scikit-learn is not installed ({exc}); install the 'train' extra") from None
    from models.features import select_feature_names

    params = params or ForestParams()
    now_s = time.time() if now_s is None else now_s
    store = Store(cfg.db_path)
    if not store.available:
        raise TrainingError(f"database {cfg.db_path} cannot be opened")
    try:
        rows = clean_rows(store, window, now_s)
        features = select_feature_names(rows)
        if not features:
            raise TrainingError(f"no usable feature in {len(rows)} clean samples")
        updater = _updater(cfg, store)
        staging = Path(tempfile.mkdtemp(prefix="train-", dir=cfg.agent.state_dir))
        try:
            model_dir = staging / "forest"
            try:
                meta = train_forest_from_rows(rows, features, params, model_dir, version=updater.next_local_version("forest"))
            except NotEnoughSamples as exc:
                raise TrainingError(f"not enough clean samples: {exc}") from None
            decision = updater.install_local("forest", model_dir)
            if decision.event:
                updater.queue_event(decision.event)  # the running daemon publishes it
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        store.close()
    if not decision.accepted:
        raise TrainingError(f"trained forest not installed: {decision.reason}")
    log.info("forest v%s trained on %d samples x %d features and installed", decision.version, meta.get("n_samples"),
             len(features))
    return {"kind": "forest", "version": decision.version, "n_samples": meta.get("n_samples"), "features": list(features)}
