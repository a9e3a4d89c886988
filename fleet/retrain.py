"""``edge-fleet retrain``: one pass over every target that is due or drifting (the daily timer's job).

Targets: ``retrain.targets`` from the config, or, when that is empty, every
device in the store plus every target already in the registry (so a group
trained once by hand keeps being retrained). A target is due when it was never
trained or its last training is older than ``retrain.interval_s`` (24 h), and
it is retrained early when its champion drifts or its forecasts degrade
(``fleet.drift``). Each due target runs ``fleet.train.run_training``: the new
version is promoted and published only if it beats the champion.

A champion that was promoted but never published (the broker was down) is
published again by the next pass. A target without enough data is skipped, a
failing one is logged and the pass goes on; the pass exits 1 when any target
failed, so the systemd unit shows the failure. ``--loop`` repeats the pass every
``retrain.loop_interval_s`` for hosts without systemd timers.

Each decision is kept in ``retrain_runs`` (what ``retrain --history`` shows).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from fleet.config import FleetConfig
from fleet.dataset import NotEnoughData
from fleet.drift import check_target
from fleet.registry import Registry, publish_record
from fleet.store import Store
from models.bundle import Target, parse_target

log = logging.getLogger(__name__)

MIGRATIONS = [
    """
    CREATE TABLE retrain_runs (
        id {pk}, ts_s {real} NOT NULL, target TEXT NOT NULL, reasons TEXT NOT NULL, outcome TEXT NOT NULL,
        version INTEGER, promoted INTEGER NOT NULL, detail TEXT NOT NULL);
    CREATE INDEX retrain_runs_target ON retrain_runs (target, ts_s)
    """,
]


@dataclass
class TargetPlan:
    target: Target
    reasons: list[str] = field(default_factory=list)
    last_trained_s: float | None = None
    publish_pending: int | None = None       # champion version promoted but never published

    @property
    def due(self) -> bool:
        return bool(self.reasons)


def targets(store: Store, config: FleetConfig) -> list[Target]:
    if config.retrain.targets:
        return [parse_target(t) for t in config.retrain.targets]
    found = {Target("device", d["device_id"]) for d in store.devices()
             if d["samples"] >= config.train.min_samples}
    found.update(parse_target(t) for t in Registry(store).targets())
    return sorted(found, key=lambda t: (t.type, t.id))


def plan(store: Store, config: FleetConfig, now_s: float, *, check_drift: bool = True) -> list[TargetPlan]:
    registry = Registry(store)
    out = []
    for target in targets(store, config):
        p = TargetPlan(target, last_trained_s=registry.last_trained_s(target))
        if p.last_trained_s is None:
            p.reasons.append("never trained")
        elif now_s - p.last_trained_s >= config.retrain.interval_s:
            p.reasons.append(f"due: last trained {(now_s - p.last_trained_s) / 3600:.1f} h ago")
        champion = registry.champion(target)
        if champion is not None and champion.published_s is None and config.promote.publish:
            p.publish_pending = champion.version
        if check_drift and champion is not None and not p.reasons:
            try:
                health = check_target(store, config, target, now_s=now_s, record=champion)
            except Exception as exc:  # noqa: BLE001 - a broken check must not stop the pass
                log.warning("%s: drift check failed: %s", target.label, exc)
            else:
                if health.drifting_devices:
                    p.reasons.append(f"drift on {', '.join(health.drifting_devices)}")
                if health.degraded_devices:
                    p.reasons.append(f"degraded forecasts on {', '.join(health.degraded_devices)}")
        out.append(p)
    return out


def _log_run(store: Store, now_s: float, target: Target, reasons: list[str], outcome: str,
             version: int | None, promoted: bool, detail: str) -> None:
    store.migrate("retrain", MIGRATIONS)
    with store.transaction():
        store.execute("INSERT INTO retrain_runs (ts_s, target, reasons, outcome, version, promoted, detail) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (now_s, target.label, "; ".join(reasons), outcome, version, int(promoted), detail))


def run_once(store: Store, config: FleetConfig, *, now_s: float | None = None, dry_run: bool = False,
             use_lstm: bool | None = None, check_drift: bool = True,
             progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """One pass; returns one report per target (outcome: idle, trained, skipped, failed, planned);
    ``progress(done, targets)`` after each target."""
    from fleet.train import run_training

    now = time.time() if now_s is None else now_s
    registry = Registry(store)
    reports = []
    plans = plan(store, config, now, check_drift=check_drift)
    for done, p in enumerate(plans):
        if progress is not None:
            progress(done, len(plans))
        report: dict[str, Any] = {"target": p.target.label, "reasons": p.reasons, "outcome": "idle"}
        if dry_run:
            report["outcome"] = "planned" if p.due else "idle"
            reports.append(report)
            continue
        if p.publish_pending is not None and not p.due:
            try:
                topic, _ = publish_record(config, registry, registry.require(p.target, p.publish_pending))
                report.update(outcome="published", version=p.publish_pending, topic=topic)
            except Exception as exc:  # noqa: BLE001
                report.update(outcome="failed", error=f"publishing v{p.publish_pending}: {exc}")
        if p.due:
            try:
                result = run_training(store, config, p.target, use_lstm=use_lstm, now_s=now)
            except NotEnoughData as exc:
                report.update(outcome="skipped", error=str(exc))
            except Exception as exc:  # noqa: BLE001 - one target's failure must not stop the others
                log.exception("%s: retraining failed", p.target.label)
                report.update(outcome="failed", error=f"{type(exc).__name__}: {exc}")
            else:
                report.update(outcome="failed" if result.publish_error else "trained",
                              version=result.record.version, promoted=result.promoted,
                              reason=result.comparison.get("reason"),
                              published=bool(result.published), error=result.publish_error)
        if report["outcome"] != "idle":
            _log_run(store, now, p.target, p.reasons, report["outcome"], report.get("version"),
                     bool(report.get("promoted")), str(report.get("error") or report.get("reason") or ""))
        reports.append(report)
    if progress is not None:
        progress(len(plans), len(plans))
    return reports


def history(store: Store, limit: int = 50) -> list[dict[str, Any]]:
    store.migrate("retrain", MIGRATIONS)
    rows = store.query("SELECT ts_s, target, reasons, outcome, version, promoted, detail FROM retrain_runs "
                       "ORDER BY ts_s DESC, id DESC LIMIT ?", (int(limit),))
    keys = ("ts_s", "target", "reasons", "outcome", "version", "promoted", "detail")
    return [dict(zip(keys, r), promoted=bool(r[5])) for r in rows]


def run_loop(open_store: Callable[[], Store], config: FleetConfig, stop: threading.Event, *,
             use_lstm: bool | None = None, on_pass: Callable[[list[dict[str, Any]]], None] | None = None) -> int:
    """Passes every ``retrain.loop_interval_s`` until ``stop`` is set; a store outage only skips a pass."""
    failures = 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            store = open_store()
            try:
                reports = run_once(store, config, use_lstm=use_lstm)
            finally:
                store.close()
        except Exception as exc:  # noqa: BLE001 - keep looping: the next pass may find the store back
            log.error("retrain pass failed: %s", exc)
            failures += 1
        else:
            failures += sum(r["outcome"] == "failed" for r in reports)
            if on_pass:
                on_pass(reports)
        stop.wait(max(0.0, config.retrain.loop_interval_s - (time.monotonic() - started)))
    return failures
