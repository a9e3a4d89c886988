"""Daemon component "models": bundles in, the current model out to whoever uses it.

Wraps one :class:`agent.updates.ModelUpdater` (verification, atomic install,
rollback) and adds what only the running daemon can do:

- ``handle_bundle(topic, payload)`` is MqttReporter's ``model_handler``: offer
  the bytes, publish the decision as a model event (unless it repeats a refusal
  already reported), start the health check of what was installed;
- ``subscribe(kind, callback)`` keeps detectors/forecasters on the current
  model: the callback gets ``(model_dir, pointer)`` at once and after every
  change - accept, rollback, and changes made by another process (``edge-agent
  models install|rollback``), which are seen by polling the pointer file's
  inode/mtime every ``poll_interval_s``;
- ``observe(kind, score_finite, is_anomaly, inference_s)`` feeds the health
  check of a model on trial; a failed check rolls back and re-notifies;
- ``install_local(kind, dir)`` installs a model this device trained;
- ``status()`` lists installed models (what the twin's reported state shows);
  ``on_change(callback)`` says when that list changed (e.g. to send the twin now).

A bundle that arrives before the first sample waits for it: the feature check
needs to know what the device samples (and rates only exist from the second
sample on, so counters stand for their rates).

Main-loop thread only, like the SQLite connection it uses.
"""
from __future__ import annotations

import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from agent import payloads
from agent.outbox import PRIORITY_NORMAL
from agent.sampling import COUNTER_RATES
from agent.store import RateLimitedLog
from agent.updates import (
    POINTER, Decision, HealthMonitor, HealthParams, ModelUpdater, UpdateError, UpdaterParams, models_root,
    read_pointer,
)
from models.bundle import BundleLimits, Target, iso_utc, load_trusted_keys

log = logging.getLogger(__name__)

ModelCallback = Callable[[Path | None, dict | None], None]
_UNSEEN = object()
EVENT_NAMES = {"accept": "installed", "reject": "rejected", "rollback": "rolled_back", "confirm": "activated"}


@dataclass(frozen=True)
class ManagerParams:
    trusted_keys: tuple[str, ...] = ()            # ed25519 public key files that may sign bundles
    max_bundle_bytes: int = 16 * 1024 * 1024      # a larger bundle is refused before parsing
    health_samples: int = 300                     # samples a new model is watched before it is confirmed
    health_anomaly_rate_factor: float = 3.0       # roll back above factor x the previous model's rate ...
    health_anomaly_rate_floor: float = 0.05       # ... never below this rate
    health_inference_budget_s: float = 0.1        # roll back when the median inference is slower
    poll_interval_s: float = 2.0                  # how often to look for changes made by the CLI

    def updater_params(self) -> UpdaterParams:
        return UpdaterParams(
            limits=BundleLimits(max_bundle_bytes=self.max_bundle_bytes),
            health=HealthParams(samples=self.health_samples, anomaly_rate_factor=self.health_anomaly_rate_factor,
                                anomaly_rate_floor=self.health_anomaly_rate_floor,
                                inference_budget_s=self.health_inference_budget_s))


def default_loaders() -> dict[str, Callable[[Path], Any]]:
    """What each kind must pass before it is switched in (the loaders the detectors use)."""
    from models.forest import load_forest_model

    def load_lstm(model_dir: Path) -> Any:
        from models.forecast.lstm import LSTMForecaster   # imports the TFLite interpreter: only when needed

        return LSTMForecaster.from_dir(model_dir)

    from models.clusters import load_cluster_model
    from models.maintenance import load_maintenance_model

    return {"forest": load_forest_model, "lstm": load_lstm, "cluster": load_cluster_model,
            "maintenance": load_maintenance_model}


def usable_trusted_keys(paths: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(loadable key paths, one error line per unusable file): a bad key file must not stop the agent."""
    good, errors = [], []
    for p in paths:
        try:
            load_trusted_keys([p])
        except ValueError as exc:
            errors.append(str(exc))
        else:
            good.append(p)
    return good, errors


def available_from(names: set[str]) -> set[str]:
    """Metrics the device samples: what was seen, plus the rate of every counter seen (a rate is
    absent on the first sample, but the sampler produces it from the second one on)."""
    out = set(names)
    out.update(rate for counter, rate in COUNTER_RATES.items() if counter in names)
    return out


def target_label(target: Mapping[str, Any] | None) -> str | None:
    if not target:
        return None
    return Target(str(target.get("type")), str(target.get("id"))).label


def event_payload(device_id: str, event: Mapping[str, Any]) -> dict[str, Any]:
    """An updater event -> the MQTT model event (agent.payloads.model_event plus details)."""
    action = str(event.get("action"))
    reason = str(event.get("reason", ""))
    name = EVENT_NAMES.get(action, "rejected")
    if action == "rollback" and reason.startswith("health check failed"):
        name = "health_check_failed"
    kinds = list(event.get("kinds") or [])
    kind = kinds[0] if kinds else None
    previous = event.get("previous") or {}
    msg = payloads.model_event(device_id, float(event.get("ts_s") or 0.0), event=name, model_kind=kind,
                               version=event.get("version"), previous_version=previous.get(kind) if kind else None,
                               target=target_label(event.get("target")), reason=reason,
                               message_id=event.get("message_id"))
    msg["action"] = action
    msg["kinds"] = kinds
    for key, out in (("source", "source"), ("stage", "stage"), ("restored_version", "restoredVersion"),
                     ("bundle_sha256", "bundleSha256"), ("key_id", "keyId"), ("missing_features", "missingFeatures")):
        if key in event:
            msg[out] = event[key]
    return msg


class ModelManager:
    """The "models" component; see the module docstring."""

    name = "models"

    def __init__(self, params: ManagerParams = ManagerParams(), *,
                 loaders: Mapping[str, Callable[[Path], Any]] | None = None) -> None:
        self.params = params
        self._loaders = dict(loaders) if loaders is not None else default_loaders()
        self.updater: ModelUpdater | None = None
        self._ctx: Any = None
        self._state_dir: Path | None = None
        self._device_id = ""
        self._subs: dict[str, list[ModelCallback]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._seen: dict[str, Any] = {}                 # kind -> identity last announced to subscribers
        self._stat: dict[str, tuple | None] = {}        # kind -> (inode, mtime, size) of current.json
        self._monitors: dict[str, HealthMonitor] = {}
        self._pending: dict[str, bytes] = {}            # topic -> bundle waiting for the first sample
        self._metrics: set[str] = set()
        self._samples_seen = 0
        self._next_poll = float("-inf")
        self._models: list[dict[str, Any]] | None = None
        self.last_error: str | None = None
        self.counts = {"accepted": 0, "rejected": 0, "rolled_back": 0, "confirmed": 0, "empty_ignored": 0}
        self._errors = RateLimitedLog(log)  # disk trouble repeats every sample: one line a minute

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, ctx: Any) -> None:
        self._ctx = ctx
        ctx.extras["models"] = self
        cfg = ctx.config
        self._state_dir = Path(cfg.agent.state_dir)
        self._device_id = cfg.device_id
        self._build()
        self._refresh_all()

    def _build(self) -> bool:
        ctx, cfg = self._ctx, self._ctx.config
        keys, errors = usable_trusted_keys(tuple(self.params.trusted_keys))
        for line in errors:
            log.error("model updates: %s (ignored)", line)
        try:
            self.updater = ModelUpdater(self._state_dir, ctx.store.conn, keys, cfg.device_id,
                                        tuple(cfg.agent.groups), available_metrics=self._available,
                                        params=self.params.updater_params(), clock=ctx.clock, loaders=self._loaders)
        except (OSError, sqlite3.Error) as exc:
            self.last_error = f"model store unavailable: {exc}"
            log.error("model updates disabled for now: %s", exc)
            return False
        self.last_error = "; ".join(errors) or None
        if not keys:
            log.warning("no trusted keys configured ([models] trusted_keys): every bundle will be refused")
        for event in self.updater.startup_events:
            self._emit(event)
        for kind in self.updater.kinds():
            mon = self.updater.health_monitor(kind)
            if mon is not None:                           # a restart during a trial: watch it again
                self._monitors[kind] = mon
        self._publish_queued()
        return True

    def stop(self) -> None:
        if self.updater is not None:
            self._publish_queued()

    # -- inbound bundles ----------------------------------------------------------------
    def handle_bundle(self, topic: str, payload: bytes) -> None:
        """MqttReporter's model_handler (main-loop thread)."""
        if not payload:
            self.counts["empty_ignored"] += 1       # a retained bundle being cleared
            log.debug("empty payload on %s ignored", topic)
            return
        if self.updater is None or self._samples_seen == 0:
            self._pending[topic] = bytes(payload)
            return
        self._offer(topic, bytes(payload))

    def _offer(self, topic: str, payload: bytes) -> Decision | None:
        assert self.updater is not None
        try:
            decision = self.updater.offer(payload, topic)
        except (OSError, sqlite3.Error) as exc:     # disk trouble while recording: keep the loop alive
            self.last_error = f"offer from {topic}: {exc}"
            log.error("model bundle from %s not processed: %s", topic, exc)
            return None
        self._after(decision)
        return decision

    def _after(self, decision: Decision) -> None:
        if decision.accepted:
            self.counts["accepted"] += 1
            self._monitors.update(decision.health)
        else:
            self.counts["rejected"] += 1
        if not decision.repeat:
            self._emit(decision.event)
        if decision.accepted:
            for kind in decision.kinds:
                self._refresh(kind)

    def _process_pending(self) -> None:
        if self.updater is None or self._samples_seen == 0:
            return
        pending, self._pending = self._pending, {}
        for topic, payload in pending.items():
            self._offer(topic, payload)

    # -- local models, rollback ---------------------------------------------------------
    def install_local(self, kind: str, model_dir: str | Path, version: int | None = None) -> Decision:
        """Install a model trained on this device (lowest precedence); publishes the decision."""
        if self.updater is None:
            raise UpdateError(self.last_error or "model store unavailable")
        daemon = getattr(self._ctx, "daemon", None)
        interval = getattr(daemon, "interval_s", None) or self._ctx.config.agent.interval_s
        decision = self.updater.install_local(kind, model_dir, version, interval_s=interval)
        self._after(decision)
        return decision

    def rollback(self, kind: str, reason: str = "manual rollback") -> dict:
        if self.updater is None:
            raise UpdateError(self.last_error or "model store unavailable")
        event = self.updater.rollback(kind, reason)
        self.counts["rolled_back"] += 1
        self._emit(event)
        self._refresh(kind)
        return event

    # -- subscribers --------------------------------------------------------------------
    def subscribe(self, kind: str, callback: ModelCallback) -> None:
        """``callback(model_dir, pointer)`` now and whenever the current ``kind`` model changes
        (``(None, None)`` when there is none)."""
        self._subs.setdefault(kind, []).append(callback)
        ptr = read_pointer(self._state_dir, kind) if self._state_dir is not None else None
        if kind not in self._seen:
            self._seen[kind] = _identity(ptr)
        self._call(kind, callback, ptr)

    def on_change(self, callback: Callable[[], None]) -> None:
        """``callback()`` after any change of the installed models or their health state."""
        self._listeners.append(callback)

    def current(self, kind: str) -> tuple[Path | None, dict | None]:
        ptr = read_pointer(self._state_dir, kind) if self._state_dir is not None else None
        return (self._dir_of(kind, ptr), ptr)

    def _dir_of(self, kind: str, ptr: Mapping[str, Any] | None) -> Path | None:
        if ptr is None or self._state_dir is None:
            return None
        return models_root(self._state_dir) / kind / ptr["dir"]

    def _call(self, kind: str, callback: ModelCallback, ptr: dict | None) -> None:
        try:
            callback(self._dir_of(kind, ptr), ptr)
        except Exception:  # a subscriber's bug must not stop updates for the others
            log.exception("model subscriber for %s failed", kind)

    def _refresh(self, kind: str) -> None:
        """Re-read ``kind``'s pointer; announce it if the model changed; keep the trial monitor in step."""
        if self._state_dir is None:
            return
        self._models = None
        self._stat[kind] = _stat_of(models_root(self._state_dir) / kind / POINTER)
        ptr = read_pointer(self._state_dir, kind)
        mon = self._monitors.get(kind)
        if mon is not None and (ptr is None or int(ptr["version"]) != mon.version or ptr["target"] != mon.target):
            del self._monitors[kind]                     # its model is gone: its verdict would be moot
        if (ptr is not None and ptr.get("state") == "trial" and kind not in self._monitors
                and self.updater is not None):
            new = self.updater.health_monitor(kind)      # installed by another process (the CLI)
            if new is not None:
                self._monitors[kind] = new
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # noqa: BLE001 - a listener's bug must not stop updates
                log.exception("model change listener failed")
        ident = _identity(ptr)
        if self._seen.get(kind, _UNSEEN) == ident:
            return
        self._seen[kind] = ident
        log.info("%s model now %s", kind, "none" if ptr is None else f"v{ptr['version']} ({ptr['dir']})")
        for cb in list(self._subs.get(kind, ())):
            self._call(kind, cb, ptr)

    def _kinds_on_disk(self) -> set[str]:
        root = models_root(self._state_dir) if self._state_dir is not None else None
        if root is None or not root.is_dir():
            return set()
        return {p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink()}

    def _refresh_all(self) -> None:
        for kind in sorted(self._kinds_on_disk() | set(self._subs)):
            self._refresh(kind)

    def _poll(self) -> None:
        if self._state_dir is None:
            return
        root = models_root(self._state_dir)
        for kind in sorted(self._kinds_on_disk() | set(self._subs) | set(self._stat)):
            st = _stat_of(root / kind / POINTER)
            if st != self._stat.get(kind, _UNSEEN):
                self._refresh(kind)

    # -- daemon hooks -------------------------------------------------------------------
    def on_sample(self, sample: Any) -> None:
        self._samples_seen += 1
        self._metrics.update(sample.values)
        if self._pending:
            self._process_pending()

    def tick(self, now_mono_s: float) -> None:
        if now_mono_s < self._next_poll:
            return
        self._next_poll = now_mono_s + self.params.poll_interval_s
        if self.updater is None and self._ctx is not None and not self._build():
            return
        self._poll()
        self._publish_queued()
        if self._pending:
            self._process_pending()

    def observe(self, kind: str, score_finite: bool, is_anomaly: bool, inference_s: float) -> None:
        """One scored sample of the current ``kind`` model (detectors call this; cheap when not on trial)."""
        mon = self._monitors.get(kind)
        if mon is None:
            return
        try:
            event = mon.observe(score_finite, is_anomaly, inference_s)
        except (OSError, sqlite3.Error) as exc:
            self.last_error = f"health check of {kind}: {exc}"
            self._errors.warning(f"health.{kind}", "health check of %s could not record its verdict: %s", kind, exc)
            return
        if mon.done:
            self._monitors.pop(kind, None)
        if event is None:
            return
        if event["action"] == "rollback":
            self.counts["rolled_back"] += 1
        else:
            self.counts["confirmed"] += 1
        self._emit(event)
        self._refresh(kind)

    # -- events -------------------------------------------------------------------------
    def _emit(self, event: Mapping[str, Any]) -> None:
        if self._ctx is None:
            return
        self._ctx.emit("model", event_payload(self._device_id, event), PRIORITY_NORMAL)

    def _publish_queued(self) -> None:
        """Events of decisions the CLI took (install, rollback) go out through the daemon's outbox."""
        assert self.updater is not None
        try:
            queued = self.updater.queued_events()
            for _, event in queued:
                if event:
                    self._emit(event)
            self.updater.drop_queued_events([i for i, _ in queued])
        except sqlite3.Error as exc:
            self._errors.warning("queued", "queued model events not published yet: %s", exc)

    # -- status -------------------------------------------------------------------------
    def _available(self) -> set[str]:
        names = set(self._metrics)
        if self._ctx is not None:
            try:
                names.update(self._ctx.store.metric_names())
            except sqlite3.Error:
                pass
        return available_from(names)

    def models(self) -> list[dict[str, Any]]:
        """Installed models: kind, version, target, source, installed_at, health."""
        if self._models is None:
            out = []
            for kind in sorted(self._kinds_on_disk()):
                ptr = read_pointer(self._state_dir, kind) if self._state_dir is not None else None
                if ptr is None:
                    continue
                ts = ptr.get("installed_at_s")
                prev = ptr.get("previous") or {}
                out.append({
                    "kind": kind, "version": int(ptr["version"]), "target": target_label(ptr.get("target")),
                    "source": ptr.get("source"), "installed_at": iso_utc(ts) if ts else None,
                    "health": ptr.get("state"), "anomaly_rate": ptr.get("anomaly_rate"),
                    "previous_version": prev.get("version"),
                })
            self._models = out
        models = [dict(m) for m in self._models]
        for m in models:
            mon = self._monitors.get(m["kind"])
            if mon is not None and m["health"] == "trial":
                m["trial_samples"] = f"{mon.check.samples}/{mon.check.params.samples}"
        return models

    def status(self) -> dict[str, Any]:
        return {"models": self.models(),
                "model_updates": {**self.counts, "on_trial": sorted(self._monitors), "pending": len(self._pending),
                                  "last_error": self.last_error}}


def _identity(ptr: Mapping[str, Any] | None) -> tuple | None:
    return None if ptr is None else (ptr.get("dir"), ptr.get("manifest_sha256"))


def _stat_of(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


__all__ = ["ManagerParams", "ModelManager", "available_from", "default_loaders", "event_payload"]
