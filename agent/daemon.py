"""The agent's main loop: the only module that wires sampling, storage and components.

Ticks are scheduled on the monotonic clock as ``start + k * interval`` so the
cadence does not drift over hours, and a wall-clock jump (NTP on a Pi without
an RTC) causes neither a burst nor a gap.  A stall longer than one interval
skips the missed ticks instead of replaying them.  Components (detectors,
forecasters, the MQTT publisher, ...) plug in through a small duck-typed
interface; a component that raises is logged and counted, never fatal.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from agent import __version__
from agent.config import AgentConfig
from agent.health import HealthParams, evaluate, loop_healthy, twin_health
from agent.liveness import LivenessLock
from agent.notify import Notifier, Watchdog
from agent.sampling import Clock, PsutilSource, Sample, Sampler, Source, SystemClock
from agent.store import RateLimitedLog, Store

log = logging.getLogger(__name__)

CLOCK_JUMP_TOLERANCE_S = 2.0
AtomicEmitter = Callable[[str, dict[str, Any], int, Callable[[Any], None]], "str | None"]
RETENTION_EVERY_S = 60.0


class Component(Protocol):
    """What a plug-in may implement; every method is optional."""

    name: str

    def start(self, ctx: "Context") -> None: ...
    def on_sample(self, sample: Sample) -> None: ...
    def tick(self, now_mono_s: float) -> None: ...
    def stop(self) -> None: ...
    def status(self) -> dict[str, Any]: ...


@dataclass
class Context:
    """What components get at start: shared services, no globals."""

    config: AgentConfig
    store: Store
    clock: Clock
    emit: Callable[[str, dict[str, Any], int], None]
    daemon: "Daemon"
    extras: dict[str, Any] = field(default_factory=dict)


class RuntimeState:
    """Flush participant that persists the live status so ``edge-agent status`` can read it."""

    def __init__(self, daemon: "Daemon") -> None:
        self._daemon = daemon

    def write(self, conn: Any) -> None:
        self._daemon.store.set_state("runtime", self._daemon.runtime_status(), conn)

    def committed(self) -> None:
        pass


class Daemon:
    def __init__(
        self,
        config: AgentConfig,
        *,
        source: Source | None = None,
        clock: Clock | None = None,
        components: list[Any] | None = None,
        sleep: Callable[[float], Any] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.interval_s = config.agent.interval_s
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._source = source
        self.components: list[Any] = list(components or [])
        self.store: Store | None = None
        self.sampler: Sampler | None = None
        self.samples_taken = 0
        self.ticks_skipped = 0
        self.clock_jumps = 0
        self.component_errors = 0
        self.loop_lag_s = 0.0
        self.last_loop_mono_s = 0.0
        self.started_at_s = 0.0
        self._errors = RateLimitedLog(log)
        self._emitter: Callable[[str, dict[str, Any], int], None] | None = None
        self._atomic_emitter: AtomicEmitter | None = None
        self.last_sample: Sample | None = None
        self._snapshot_sinks: list[Callable[[dict[str, Any]], None]] = []
        self._health_params = health_params(config)
        self._liveness = LivenessLock(config.db_path.parent)

    # -- wiring -------------------------------------------------------------------
    def set_emitter(self, emitter: Callable[[str, dict[str, Any], int], None],
                    atomic: "AtomicEmitter | None" = None) -> None:
        """The MQTT publisher registers here; without one, outbound messages are not queued.

        ``atomic(kind, payload, priority, write)`` stores one message and runs ``write(conn)``
        in the same transaction (both commit or neither); it returns the message id, None when
        the outbox refused the message, and raises sqlite3.Error when the disk did."""
        self._emitter = emitter
        self._atomic_emitter = atomic

    def emit(self, kind: str, payload: dict[str, Any], priority: int = 0) -> None:
        if self._emitter is not None:
            self._emitter(kind, payload, priority)

    @property
    def can_emit_atomic(self) -> bool:
        return self._atomic_emitter is not None

    def emit_atomic(self, kind: str, payload: dict[str, Any], priority: int,
                    write: Callable[[Any], None]) -> str | None:
        """Queue a message together with the caller's own write (e.g. a cursor); see set_emitter."""
        if self._atomic_emitter is None:
            raise RuntimeError("no publisher accepts atomic messages")
        return self._atomic_emitter(kind, payload, priority, write)

    def add_snapshot_sink(self, sink: Callable[[dict[str, Any]], None]) -> None:
        """Receivers of a per-tick status snapshot (the Prometheus endpoint)."""
        self._snapshot_sinks.append(sink)

    def snapshot(self) -> dict[str, Any]:
        snap = self.runtime_status()
        snap["device_id"] = self.config.device_id
        if self.last_sample is not None:
            snap["sample"] = {"ts_s": self.last_sample.ts_s, "values": dict(self.last_sample.values)}
        return snap

    def health(self) -> dict[str, Any]:
        """The twin's health: the status rules (agent/health.py) over what this process knows live,
        so a device the fleet sees as healthy is one whose ``edge-agent status`` exits 0."""
        runtime = self.runtime_status()
        last = self.last_sample
        doc = {"running": True, "interval_s": self.interval_s,
               "samples": {"count": self.samples_taken, "newest": last.ts_s if last else None},
               "outbox": runtime.get("outbox") or {}, "mqtt": runtime.get("mqtt") or {},
               "models": runtime.get("models") or []}
        return twin_health(evaluate(doc, self.clock.time(), self._health_params, interval_s=self.interval_s))

    def set_interval(self, interval_s: float) -> None:
        self.interval_s = float(interval_s)
        log.info("sampling interval set to %.3f s", self.interval_s)

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _call(self, component: Any, method: str, *args: Any) -> Any:
        fn = getattr(component, method, None)
        if fn is None:
            return None
        try:
            return fn(*args)
        except Exception:  # a plug-in bug must not take the sampler down
            self.component_errors += 1
            name = getattr(component, "name", type(component).__name__)
            self._errors.warning(f"{name}.{method}", "component %s.%s failed", name, method)
            log.debug("component failure", exc_info=True)
            return None

    def runtime_status(self) -> dict[str, Any]:
        components = {}
        for c in self.components:
            st = self._call(c, "status")
            if isinstance(st, dict):
                components.update(st)
        return {
            "pid": os.getpid(),
            "version": __version__,
            "started_at": self.started_at_s,
            "updated_at": self.clock.time(),
            "interval_s": self.interval_s,
            "samples_taken": self.samples_taken,
            "ticks_skipped": self.ticks_skipped,
            "clock_jumps": self.clock_jumps,
            "component_errors": self.component_errors,
            "loop_lag_s": round(self.loop_lag_s, 6),
            "store": {
                "pending": self.store.pending_count if self.store else 0,
                "dropped": self.store.samples_dropped if self.store else 0,
                "write_errors": self.store.write_errors if self.store else 0,
                "available": bool(self.store and self.store.available),
            },
            **components,
        }

    # -- lifecycle ----------------------------------------------------------------
    def _start(self) -> None:
        cfg = self.config
        self.store = Store(
            cfg.db_path,
            retention_s=cfg.store.retention_s,
            max_db_bytes=cfg.store.max_db_bytes,
            memory_buffer_rows=cfg.store.memory_buffer_rows,
        )
        self._liveness.acquire()  # after the store made the state directory; `status` probes it
        source = self._source or PsutilSource(cfg.sampling.mounts, cfg.sampling.per_cpu, cfg.sampling.temperature)
        self.sampler = Sampler(source, cfg.sampling.mounts, self.clock)
        self.started_at_s = self.clock.time()
        ctx = Context(config=cfg, store=self.store, clock=self.clock, emit=self.emit, daemon=self)
        # Sinks before sources: components (publisher first, as listed) start before the first sample.
        for component in self.components:
            self._call(component, "start", ctx)
        self.store.add_flush_participant(RuntimeState(self))
        log.info(
            "edge-agent %s started: device %s, interval %.3g s, state %s, config %s",
            __version__, cfg.device_id, self.interval_s, cfg.agent.state_dir, cfg.source,
        )

    def _shutdown(self) -> None:
        # Sources before sinks: stop sampling, let components flush, then commit and close.
        for component in reversed(self.components):
            self._call(component, "stop")
        if self.store is not None:
            if not self.store.flush():
                log.error("could not write %d buffered samples at shutdown", self.store.pending_count)
            self.store.close()
        self._liveness.release()
        log.info("edge-agent stopped after %d samples", self.samples_taken)

    def _check_clock(self, sample: Sample, prev: tuple[float, float] | None, mono_s: float) -> None:
        if prev is None:
            return
        jump_s = (sample.ts_s - prev[0]) - (mono_s - prev[1])
        if abs(jump_s) > CLOCK_JUMP_TOLERANCE_S:
            self.clock_jumps += 1
            log.warning("wall clock jumped by %+.1f s; cadence follows the monotonic clock", jump_s)

    def tick_once(self, prev: tuple[float, float] | None = None) -> tuple[Sample, tuple[float, float]] | None:
        """Sample, store and hand to components once; returns the sample and the clock pair."""
        assert self.sampler is not None and self.store is not None
        mono_s = self.clock.monotonic()
        try:
            sample = self.sampler.sample()
        except Exception:  # psutil can raise on exotic kernels; skip the tick, keep the loop
            self._errors.warning("sample", "sampling failed; tick skipped")
            log.debug("sampling failure", exc_info=True)
            return None
        self._check_clock(sample, prev, mono_s)
        self.store.add_sample(sample)
        self.samples_taken += 1
        self.last_sample = sample
        for component in self.components:
            self._call(component, "on_sample", sample)
        return sample, (sample.ts_s, mono_s)

    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        notifier = Notifier.from_environ()
        watchdog = Watchdog.from_environ(notifier, clock=self.clock.monotonic)
        self._start()
        assert self.store is not None
        notifier.ready(f"sampling every {self.interval_s:g} s")
        commit_interval_s = self.config.store.commit_interval_s
        started = next_tick = self.clock.monotonic()
        last_flush = last_retention = next_tick
        last_ok: float | None = None
        prev: tuple[float, float] | None = None
        try:
            while not self._stop.is_set():
                now = self.clock.monotonic()
                # The watchdog is fed only while samples keep coming: a hung loop gets restarted by systemd.
                watchdog.beat(*loop_healthy(now, last_ok, started, self.interval_s, self._health_params), now_mono_s=now)
                if now < next_tick:
                    self._sleep(min(next_tick - now, watchdog.max_sleep_s(now)))
                    continue
                self.loop_lag_s = now - next_tick
                if self.loop_lag_s >= self.interval_s:
                    skipped = int(self.loop_lag_s // self.interval_s)
                    self.ticks_skipped += skipped
                    next_tick += skipped * self.interval_s
                    self._errors.warning("lag", "loop fell %.1f s behind; skipped %d ticks", self.loop_lag_s, skipped)
                result = self.tick_once(prev)
                if result is not None:
                    prev = result[1]
                    last_ok = now
                for component in self.components:
                    self._call(component, "tick", now)
                if now - last_flush >= commit_interval_s:
                    self.store.flush()
                    last_flush = now
                if now - last_retention >= RETENTION_EVERY_S:
                    last_retention = now
                    try:
                        self.store.enforce_retention(self.clock.time())
                    except Exception:
                        self._errors.warning("retention", "retention pass failed")
                if self._snapshot_sinks:
                    snap = self.snapshot()
                    for sink in self._snapshot_sinks:
                        sink(snap)
                self.last_loop_mono_s = now
                next_tick += self.interval_s
        finally:
            notifier.stopping("flushing")
            self._shutdown()
            notifier.close()
        return 0


def health_params(config: AgentConfig) -> HealthParams:
    h = config.health
    return HealthParams(stale_factor=h.stale_factor, min_stale_s=h.min_stale_s, outbox_max_depth=h.outbox_max_depth,
                        required_models=h.required_models, default_interval_s=config.agent.interval_s)


def build_components(config: AgentConfig, daemon: Daemon) -> list[Any]:
    """The components a configuration asks for, sinks first (they start before sources)."""
    from agent.detection import DetectionComponent, detect_params, training_schedule
    from agent.model_manager import ManagerParams, ModelManager
    from agent.reporter import Reporter

    m = config.models
    manager = ModelManager(ManagerParams(
        trusted_keys=m.trusted_keys, max_bundle_bytes=m.max_bundle_bytes, health_samples=m.health_samples,
        health_anomaly_rate_factor=m.health_anomaly_rate_factor, health_anomaly_rate_floor=m.health_anomaly_rate_floor,
        health_inference_budget_s=m.health_inference_budget_s, poll_interval_s=m.poll_interval_s))
    components: list[Any] = []

    def twin_extra() -> dict[str, Any]:
        """Fields components add to the reported twin (a component with ``twin() -> dict``)."""
        extra: dict[str, Any] = {}
        for c in components:
            if hasattr(c, "twin"):
                extra.update(c.twin())
        return extra

    reporter = Reporter(telemetry_interval_s=config.mqtt.telemetry_interval_s, health=daemon.health,
                        models=manager.models, extra=twin_extra)
    manager.on_change(reporter.report_now)  # the twin shows a model change at once
    if config.mqtt.enabled:
        from agent.transport import MqttReporter, params_from_sections

        mqtt, outbox, commands = params_from_sections(config.mqtt, config.outbox, config.commands)
        components.append(MqttReporter(mqtt, outbox, device_id=config.device_id, groups=config.agent.groups,
                                       command_params=commands, report_now=reporter.report_now,
                                       model_handler=manager.handle_bundle))
    if config.metrics.enabled:
        from agent.prometheus import MetricsParams, MetricsServer

        mc = config.metrics
        server = MetricsServer(MetricsParams(enabled=True, bind=mc.bind, port=mc.port, token=mc.token,
                                             basic_user=mc.basic_user, basic_password=mc.basic_password,
                                             allow_unauthenticated=mc.allow_unauthenticated),
                               clock=daemon.clock.monotonic)
        daemon.add_snapshot_sink(server.publish)
        components.append(server)
    components.append(manager)  # after the publisher (its events need the emitter), before its consumers
    config_path = config.source if config.source and config.source != "built-in default" else None
    components.append(DetectionComponent(params=detect_params(config.detect), schedule=training_schedule(config.detect),
                                         config_path=config_path))
    if config.forecast.enabled:
        from agent.forecasting import ForecastComponent, params_from_section

        components.append(ForecastComponent(params_from_section(config.forecast)))
    if config.clusters.enabled:
        from agent.cluster_watch import ClusterWatch, params_from_section as cluster_params

        components.append(ClusterWatch(cluster_params(config.clusters)))
    if config.web.enabled:
        from agent.web import WebComponent, params_from_section as web_params

        components.append(WebComponent(web_params(config.web)))
    if config.maintenance.enabled:
        from agent.maintenance import MaintenanceComponent, params_from_section as maintenance_params

        components.append(MaintenanceComponent(maintenance_params(config.maintenance)))
    components.append(reporter)
    return components


def run(config: AgentConfig) -> int:
    daemon = Daemon(config)
    daemon.components = build_components(config, daemon)
    return daemon.run()
