"""Anomaly detection in the daemon: streaming detector, events, bootstrap training.

The detector itself (features, z-score, compact forest, severity, episodes) is
pure code in ``models``; this module is the device wiring around it: feed each
sample, persist and publish episode events, report the model's health to the
update manager, and get a forest trained when none is installed.

Training runs in a *subprocess* (``edge-agent train --kind forest``) so the
daemon never imports scikit-learn and a training crash or its memory peak
cannot take the sampler down.  The subprocess installs its result through the
same atomic model store as a signed bundle; the daemon sees the pointer change
and loads the new forest between two samples.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import payloads
from agent.events import EventLog
from agent.outbox import PRIORITY_HIGH
from agent.sampling import Sample
from models.detect import DetectParams, Detector
from models.episodes import EpisodeParams
from models.forest import load_forest_model
from models.novelty import NoveltyParams
from models.severity import SeverityParams
from models.zscore import ZScoreParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSchedule:
    bootstrap: bool = True            # train a forest on the device when none is installed
    min_samples: int = 100            # clean samples needed before the first training
    retrain_interval_s: float = 86400.0
    retry_after_s: float = 600.0      # after a failed training attempt
    timeout_s: float = 1800.0
    wait_s: float = 30.0              # re-count the buffered samples this often while too few


def detect_params(section: Any) -> DetectParams:
    """[detect] configuration -> the detector's own params (duck-typed: any object with the keys)."""
    return DetectParams(
        features=tuple(section.features), window_stats=section.window_stats, stats_window=section.stats_window,
        zscore=ZScoreParams(window=section.zscore_window, warmup=section.zscore_warmup),
        severity=SeverityParams(z_warning=section.z_warning, z_critical=section.z_critical,
                                explain_top_k=section.explain_top_k),
        episodes=EpisodeParams(open_after=section.open_after, close_after=section.close_after),
        use_forest=section.use_forest, daily_profile=section.daily_profile,
        novelty=NoveltyParams(enabled=section.novelty, learn_rows=section.novelty_learn_samples,
                              rest_rows=section.novelty_rest_samples),
    )


def training_schedule(section: Any) -> TrainingSchedule:
    return TrainingSchedule(bootstrap=section.forest_bootstrap and section.use_forest,
                            min_samples=section.forest_train_after,
                            retrain_interval_s=section.forest_retrain_every_s)


def forest_params(section: Any) -> Any:
    """[detect] forest_* keys -> models.training.forest.ForestParams (training commands only)."""
    from models.training.forest import ForestParams

    return ForestParams(n_estimators=section.forest_n_estimators, contamination=section.forest_contamination,
                        min_samples=section.forest_train_after)


def anomaly_payload(device_id: str, now_s: float, event: dict[str, Any]) -> dict[str, Any]:
    """An episode event as the MQTT anomaly message (see README, 'anomalies')."""
    explanation = event.get("explanation") or []
    top = explanation[0] if explanation else {}
    metrics = list(event.get("features") or []) or [e["feature"] for e in explanation] or ["unknown"]
    text = "; ".join(
        f"{e['feature']} = {e['value']:.4g} (expected {e['expected_low']:.4g} .. {e['expected_high']:.4g}, z {e['z']:+.1f})"
        for e in explanation
    )
    return payloads.anomaly_event(
        device_id, now_s, event_id=event["id"], severity=event["severity"], metrics=metrics,
        value={e["feature"]: e["value"] for e in explanation} or float("nan"),
        expected_low=top.get("expected_low"), expected_high=top.get("expected_high"),
        deviation=top.get("z"), detector=str(event.get("detector")), model_version=event.get("model_version"),
        started_ts_s=float(event["start_ts_s"]), ended_ts_s=event.get("end_ts_s"),
        score=event.get("peak_score"), explanation=text,
        contributions={e["feature"]: abs(e["z"]) for e in explanation},
    )


class DetectionComponent:
    name = "detection"

    def __init__(self, params: DetectParams = DetectParams(), schedule: TrainingSchedule = TrainingSchedule(),
                 config_path: str | None = None) -> None:
        self.params = params
        self.schedule = schedule
        self._config_path = config_path
        self.detector = Detector(params)
        self.events: EventLog | None = None
        self._models: Any = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._proc_started_mono = 0.0
        self._next_training_mono: float | None = None
        self._warned_no_sklearn = False
        self.inference_s_sum = 0.0
        self.inference_count = 0
        self.trainings = {"started": 0, "succeeded": 0, "failed": 0}
        self.last_severity = "normal"

    # -- lifecycle ------------------------------------------------------------------
    def start(self, ctx: Any) -> None:
        self.ctx = ctx
        self.events = EventLog(ctx.store)
        self._models = ctx.extras.get("models")
        if self._models is not None:
            self._models.subscribe("forest", self._on_forest)
        else:  # no update manager (tests, minimal set-ups): load whatever is installed
            from agent.updates import current_model_dir

            self._on_forest(current_model_dir(ctx.config.agent.state_dir, "forest"), None)

    def _on_forest(self, model_dir: Path | None, pointer: dict[str, Any] | None) -> None:
        if model_dir is None:
            self.detector.set_forest(None)
            return
        try:
            self.detector.set_forest(load_forest_model(model_dir))
        except (OSError, ValueError, KeyError) as exc:
            log.error("cannot load forest from %s: %s; staying on the z-score detector", model_dir, exc)
            self.detector.set_forest(None)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
        now = self.ctx.clock.time()
        for event in self.detector.flush():  # an episode open at shutdown ends here, honestly labelled
            event["closed_by"] = "shutdown"
            self._publish(event, now)

    # -- hot path -------------------------------------------------------------------
    def on_sample(self, sample: Sample) -> None:
        t0 = time.perf_counter()
        row, events = self.detector.update(sample.ts_s, sample.values)
        elapsed_s = time.perf_counter() - t0
        self.inference_s_sum += elapsed_s
        self.inference_count += 1
        self.last_severity = row.severity
        forest = self.detector.forest
        if self._models is not None and forest is not None and row.forest_score is not None:
            # Judge the forest on its own verdicts: a z-score episode already open must not fail a new model.
            self._models.observe("forest", math.isfinite(row.forest_score),
                                 row.forest_score >= forest.thresholds["warning"], elapsed_s)
        for event in events:
            self._publish(event, sample.ts_s)

    def _publish(self, event: dict[str, Any], now_s: float) -> None:
        assert self.events is not None
        self.events.record(event, now_s)
        if event.get("action") in ("open", "update", "close"):
            log.log(logging.WARNING if event["action"] != "close" else logging.INFO,
                    "anomaly %s %s (%s): %s", event["action"], event["id"][:8], event["severity"],
                    ", ".join(event.get("features") or []))
        self.ctx.emit("anomaly", anomaly_payload(self.ctx.config.device_id, now_s, event), PRIORITY_HIGH)

    # -- training -------------------------------------------------------------------
    def tick(self, now_mono_s: float) -> None:
        if self._proc is not None:
            self._poll_training(now_mono_s)
            return
        if not self.schedule.bootstrap:
            return
        if self._next_training_mono is None:
            # With a forest installed, the daily retrain counts from now; without one, decide at once.
            installed_now = self.detector.forest is not None
            self._next_training_mono = now_mono_s + (self.schedule.retrain_interval_s if installed_now else 0.0)
        if now_mono_s < self._next_training_mono:
            return
        installed = self.detector.forest is not None
        if installed and self._installed_from_fleet():
            self._next_training_mono = now_mono_s + self.schedule.retrain_interval_s
            return  # the fleet ships this device's model: local training would only be ignored
        # Headroom: the first sample (no rates yet) and samples inside anomaly episodes are not training
        # rows, so starting at exactly min_samples would fail the trainer's own count.
        needed = self.schedule.min_samples + max(10, self.schedule.min_samples // 5)
        if self.detector.n_samples < needed and not installed:
            if self._stored_samples() < needed:
                self._next_training_mono = now_mono_s + self.schedule.wait_s
                return
        if importlib.util.find_spec("sklearn") is None:
            if not self._warned_no_sklearn:
                log.warning("scikit-learn is not installed: no forest is trained on this device; "
                            "detection runs on the z-score baseline (install the 'train' extra or push a bundle)")
                self._warned_no_sklearn = True
            self._next_training_mono = now_mono_s + self.schedule.retrain_interval_s
            return
        self._start_training(now_mono_s)

    def _installed_from_fleet(self) -> bool:
        from agent.updates import read_pointer

        pointer = read_pointer(self.ctx.config.agent.state_dir, "forest")
        return bool(pointer) and (pointer.get("target") or {}).get("type") != "local"

    def _stored_samples(self) -> int:
        try:
            return int(self.ctx.store.sample_stats()["count"])
        except Exception:  # database unavailable: try again later
            return 0

    def _start_training(self, now_mono_s: float) -> None:
        cmd = [sys.executable, "-m", "agent.cli", "train", "--kind", "forest"]
        if self._config_path:
            cmd += ["--config", self._config_path]
        self.ctx.store.flush()  # the subprocess reads what is committed
        log.info("training a forest in a subprocess: %s", " ".join(cmd))
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=dict(os.environ))
        except OSError as exc:
            log.error("cannot start training: %s", exc)
            self._next_training_mono = now_mono_s + self.schedule.retry_after_s
            return
        self._proc_started_mono = now_mono_s
        self.trainings["started"] += 1

    def _poll_training(self, now_mono_s: float) -> None:
        assert self._proc is not None
        rc = self._proc.poll()
        if rc is None:
            if now_mono_s - self._proc_started_mono > self.schedule.timeout_s:
                log.error("training took longer than %.0f s; killed", self.schedule.timeout_s)
                self._proc.kill()
                self._proc.wait()
                rc = -9
            else:
                return
        self._proc = None
        if rc == 0:
            self.trainings["succeeded"] += 1
            self._next_training_mono = now_mono_s + self.schedule.retrain_interval_s
            if self._models is None:  # without the manager nobody watches the pointer: load now
                from agent.updates import current_model_dir

                self._on_forest(current_model_dir(self.ctx.config.agent.state_dir, "forest"), None)
        else:
            self.trainings["failed"] += 1
            log.warning("forest training exited with %s; retrying in %.0f s", rc, self.schedule.retry_after_s)
            self._next_training_mono = now_mono_s + self.schedule.retry_after_s

    def status(self) -> dict[str, Any]:
        counts = dict(self.events.counts) if self.events else {}
        return {
            "anomalies": {"warning": counts.get("warning", 0), "critical": counts.get("critical", 0)},
            "detection": {
                **self.detector.status(),
                "last_severity": self.last_severity,
                "inference_ms_mean": round(1000 * self.inference_s_sum / self.inference_count, 4)
                if self.inference_count else None,
                "training": dict(self.trainings, running=self._proc is not None),
            },
        }
