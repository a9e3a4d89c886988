"""Forecasting in the daemon: the ForecastEngine wired to samples, SQLite, MQTT and the model store.

The models are pure code in ``models.forecast``; this module is the device
wiring around them:

- start: build the engine, follow the installed ``lstm`` model through the
  model manager (a pushed or locally trained LSTM joins, a removed one leaves),
  then warm-start from the buffered samples, aggregated to step means by SQLite
  (one row per step, not one per sample: a week of 1 Hz samples is 600 k rows);
- on_sample: ``engine.observe`` (steps close every ``step_s``; only then does
  any model run), exhaustion episodes per limited metric;
- tick: at most one fallback refit per loop, and every ``publish_every_s`` the
  newest forecast of each metric goes to the ``forecasts`` / ``forecast_runs``
  tables (through the store's periodic commit) and out as one MQTT
  ``forecast`` message per metric;
- scores: per metric and candidate, the engine's rolling MAE and realised
  interval coverage, plus MASE against the one-step naive MAE of the series
  seen so far, upserted into ``forecast_scores``.

Exhaustion: a metric with a limit (disk, memory) whose ETA falls under
``warning_eta_s`` / ``critical_eta_s`` becomes an event of kind "exhaustion",
debounced with the same episode rules as anomalies (models.episodes), stored in
the ``events`` table and published on the anomalies topic.

A wall-clock step larger than one forecasting step (NTP on a Pi without RTC)
restarts the engine's histories: the steps before and after would not line up,
and a clock set back would otherwise hold the open step until wall time caught
up. Models re-fit within minutes; the LSTM, if any, stays loaded.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import sqlite3
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from agent import payloads
from agent.events import EventLog
from agent.outbox import PRIORITY_HIGH, PRIORITY_NORMAL
from agent.sampling import Sample
from agent.store import RateLimitedLog, quote_ident
from models.episodes import EpisodeParams, EpisodeTracker
from models.forecast import ForecastEngine, ForecastParams, InvalidModel
from models.forecast.conformal import level_key
from models.forecast.exhaustion import limit_for, parse_limits

log = logging.getLogger(__name__)

MIGRATIONS = [
    """
    CREATE TABLE forecasts (
        made_at REAL NOT NULL, metric TEXT NOT NULL, step INTEGER NOT NULL, ts_s REAL NOT NULL,
        value REAL, lower_80 REAL, upper_80 REAL, lower_95 REAL, upper_95 REAL,
        model TEXT, version INTEGER,
        PRIMARY KEY (made_at, metric, step)
    );
    CREATE INDEX forecasts_metric_ts ON forecasts (metric, ts_s);
    CREATE TABLE forecast_runs (
        made_at REAL NOT NULL, metric TEXT NOT NULL, model TEXT, version INTEGER, step_s REAL,
        limit_value REAL, eta_s REAL, eta_lower_s REAL, eta_upper_s REAL,
        PRIMARY KEY (made_at, metric)
    );
    CREATE TABLE forecast_scores (
        metric TEXT NOT NULL, model TEXT NOT NULL, n INTEGER, mae REAL, mase REAL,
        coverage_80 REAL, coverage_95 REAL, updated_at REAL,
        PRIMARY KEY (metric, model)
    )
    """,
]
MAX_PENDING_RUNS = 2000            # forecast runs held in memory while the disk refuses writes
TRIM_EVERY_S = 3600.0


@dataclass(frozen=True)
class ForecastingParams:
    engine: ForecastParams = field(default_factory=ForecastParams)
    publish_every_s: float = 300.0     # how often forecasts are stored and sent
    retention_s: float = 7 * 86400.0   # forecasts and runs older than this are deleted
    episodes: EpisodeParams = field(default_factory=EpisodeParams)   # exhaustion debounce, in steps
    stale_after_steps: int = 5         # a metric absent this long is no longer published

    def __post_init__(self) -> None:
        if self.publish_every_s <= 0 or self.retention_s <= 0 or self.stale_after_steps < 1:
            raise ValueError("publish_every_s > 0, retention_s > 0 and stale_after_steps >= 1 required")


ENGINE_KEYS = ("metrics", "step_s", "horizon", "season_s", "history_max_steps", "refit_every_steps", "limits",
               "warning_eta_s", "critical_eta_s", "trend_window_s", "conformal_window", "aci_gamma",
               "selector_margin")


def params_from_section(section: Any) -> ForecastingParams:
    """The ``[forecast]`` config section (agent.config.ForecastSection) -> component params."""
    flat = {k: getattr(section, k) for k in ENGINE_KEYS if hasattr(section, k)}
    return ForecastingParams(engine=ForecastParams.from_flat(**flat), publish_every_s=section.publish_every_s,
                             retention_s=section.retention_s)


def wanted_metrics(names: Iterable[str], params: ForecastParams, extra: Sequence[str] = ()) -> list[str]:
    """The stored metrics the engine would track (configured globs, metrics with a limit, LSTM inputs)."""
    limits = parse_limits(params.limits)
    return [n for n in names
            if n in extra or any(fnmatch.fnmatchcase(n, p) for p in params.metrics) or limit_for(n, limits) is not None]


def step_means(store: Any, since_s: float, step_s: float, metrics: Sequence[str],
               until_s: float | None = None, max_rows: int | None = None) -> list[tuple[float, dict[str, float]]]:
    """Committed samples since ``since_s`` averaged per ``step_s`` bucket by SQLite, oldest first, stamped
    mid-bucket (what ForecastEngine.observe and the LSTM trainer aggregate to anyway). ``step_s`` 0 =
    the raw samples (the newest ``max_rows``)."""
    known = set(store.metric_names())
    names = [m for m in metrics if m in known]
    if not names:
        return []
    if step_s <= 0:
        return store.samples(since_s=since_s, until_s=until_s, metrics=names, limit=max_rows)
    cols = ", ".join(f"avg({quote_ident(n)})" for n in names)
    sql = f"SELECT CAST(ts_s / ? AS INTEGER) AS b, {cols} FROM samples WHERE ts_s >= ?"
    args: list[float] = [step_s, since_s]
    if until_s is not None:
        sql += " AND ts_s <= ?"
        args.append(until_s)
    sql += " GROUP BY b ORDER BY b"
    rows = [((b + 0.5) * step_s, {n: v for n, v in zip(names, vals) if v is not None})
            for b, *vals in store.conn.execute(sql, args)]
    return rows[-max_rows:] if max_rows else rows


class NaiveScale:
    """Running in-sample MAE of the one-step naive forecast (the MASE denominator) per metric."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._sum: dict[str, float] = {}
        self._n: dict[str, int] = {}

    def add(self, metric: str, y: float) -> None:
        if not math.isfinite(y):
            return
        prev = self._last.get(metric)
        self._last[metric] = y
        if prev is not None:
            self._sum[metric] = self._sum.get(metric, 0.0) + abs(y - prev)
            self._n[metric] = self._n.get(metric, 0) + 1

    def reset_last(self) -> None:
        self._last.clear()

    def scale(self, metric: str) -> float:
        n = self._n.get(metric, 0)
        return self._sum[metric] / n if n else math.nan


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _round(v: Any, digits: int = 6) -> Any:
    """Significant digits for the wire: a forecast is not more precise than that, and it halves messages."""
    if isinstance(v, float):
        return float(f"{v:.{digits}g}") if math.isfinite(v) else None
    if isinstance(v, list):
        return [_round(x, digits) for x in v]
    if isinstance(v, dict):
        return {k: _round(x, digits) for k, x in v.items()}
    return v


def _fmt_duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


class ForecastComponent:
    """The "forecast" daemon component; see the module docstring."""

    name = "forecast"

    def __init__(self, params: ForecastingParams = ForecastingParams()) -> None:
        self.params = params
        self.engine = ForecastEngine(params.engine)
        self.ctx: Any = None
        self.events: EventLog | None = None
        self._models: Any = None
        self._lstm: Any = None                       # the loaded LSTMForecaster (survives engine restarts)
        self._lstm_version: int | None = None
        self._pending: deque[tuple[list[tuple], tuple]] = deque(maxlen=MAX_PENDING_RUNS)
        self._writing = 0
        self._scores_pending: list[tuple] = []
        self._scores_writing: list[tuple] | None = None
        self._published: dict[str, float] = {}      # metric -> newest origin stored and sent
        self._last_seen: dict[str, float] = {}      # metric -> wall time it was last sampled
        self._trackers: dict[str, EpisodeTracker] = {}
        self._scale = NaiveScale()
        self._prev: tuple[float, float] | None = None   # (wall, mono) of the previous sample
        self._next_publish: float | None = None
        self._next_trim = 0.0
        self._errors = RateLimitedLog(log)
        self.counts = {"published": 0, "rows": 0, "errors": 0, "write_errors": 0, "dropped": 0,
                       "clock_resets": 0, "exhaustion_events": 0, "warm_start_steps": 0}

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, ctx: Any) -> None:
        self.ctx = ctx
        ctx.store.migrate("forecast", MIGRATIONS)
        self.events = EventLog(ctx.store)
        ctx.store.add_flush_participant(self)
        self._models = ctx.extras.get("models")
        if self._models is not None:
            self._models.subscribe("lstm", self._on_lstm)
        else:  # no update manager (minimal set-ups): load whatever is installed
            from agent.updates import current_model_dir

            self._on_lstm(current_model_dir(ctx.config.agent.state_dir, "lstm"), None)
        self._warm_start(ctx.clock.time())

    def _warm_start(self, now_s: float) -> None:
        t0 = time.perf_counter()
        try:
            extra = list(self._lstm.inputs) if self._lstm is not None else []
            names = wanted_metrics(self.ctx.store.metric_names(), self.params.engine, extra)
            rows = step_means(self.ctx.store, now_s - self.engine.history_s(), self.engine.step_s, names,
                              until_s=now_s, max_rows=self.params.engine.history_max_steps)
            for _, values in rows:
                for m, v in values.items():
                    self._scale.add(m, v)
            n = self.engine.warm_start(rows)
        except (sqlite3.Error, ArithmeticError, ValueError, LookupError) as exc:
            self.counts["errors"] += 1
            log.error("forecast warm start failed (%s); starting from live samples", exc)
            return
        self.counts["warm_start_steps"] = n
        if n:
            log.info("forecast warm start: %d steps of history in %.2f s", n, time.perf_counter() - t0)

    def _on_lstm(self, model_dir: Path | None, pointer: dict[str, Any] | None) -> None:
        if model_dir is None:
            if self._lstm is not None:
                log.info("LSTM forecaster removed; forecasting with the fallback models")
            self._lstm = self._lstm_version = None
            self.engine.unload_lstm()
            return
        try:
            model = self.engine.load_lstm(model_dir)
        except (InvalidModel, OSError, ValueError, KeyError) as exc:
            self.counts["errors"] += 1
            log.error("cannot use the LSTM forecaster in %s: %s; staying on the fallback models", model_dir, exc)
            self._lstm = self._lstm_version = None
            self.engine.unload_lstm()
            return
        self._lstm, self._lstm_version = model, int(model.version)
        log.info("LSTM forecaster v%s active for %s", model.version, ", ".join(model.targets))

    def stop(self) -> None:
        if self.ctx is None:
            return
        now = self.ctx.clock.time()
        self._publish(now)                       # the newest forecasts go into the final commit
        for tracker in self._trackers.values():  # an open warning ends here, honestly labelled
            for event in tracker.flush():
                event.update(kind="exhaustion", metric=event["features"][0], closed_by="shutdown")
                self._publish_event(event, now)

    # -- hot path -----------------------------------------------------------------------
    def on_sample(self, sample: Sample) -> None:
        mono = self.ctx.clock.monotonic()
        prev, self._prev = self._prev, (sample.ts_s, mono)
        if prev is not None:
            jump_s = (sample.ts_s - prev[0]) - (mono - prev[1])
            if abs(jump_s) > max(self.engine.step_s, 2.0):
                self._restart_engine(jump_s)
        t0 = time.perf_counter()
        try:
            results = self.engine.observe(sample.ts_s, sample.values)
        except (ArithmeticError, ValueError, LookupError) as exc:
            self.counts["errors"] += 1
            self._errors.warning("observe", "forecast step failed: %s", exc)
            return
        if not results:
            return
        elapsed_s = time.perf_counter() - t0
        for res in results:
            metric = res["metric"]
            if metric in sample.values:
                self._last_seen[metric] = sample.ts_s
                self._scale.add(metric, res["last_value"])
            self._track_exhaustion(res, sample.ts_s)
        self._observe_lstm(results, elapsed_s)

    def _restart_engine(self, jump_s: float) -> None:
        self.counts["clock_resets"] += 1
        log.warning("wall clock jumped by %+.0f s: forecast histories restart", jump_s)
        self.engine = ForecastEngine(self.params.engine)
        if self._lstm is not None:
            try:
                self.engine.set_lstm(self._lstm)
            except InvalidModel as exc:
                log.error("LSTM forecaster dropped: %s", exc)
                self._lstm = self._lstm_version = None
        self._scale.reset_last()
        self._published.clear()
        self._last_seen.clear()
        self._next_trim = 0.0

    def _observe_lstm(self, results: list[dict], elapsed_s: float) -> None:
        """Feed the trial of a newly installed LSTM: its outputs must stay finite and fast."""
        if self._models is None or self._lstm is None:
            return
        finite = None
        for metric in self._lstm.targets:
            issued = self.engine.issued(metric)
            points = (issued or {}).get("points", {}).get("lstm")
            if points is not None:
                ok = bool(all(math.isfinite(float(v)) for v in points))
                finite = ok if finite is None else finite and ok
        if finite is not None:
            self._models.observe("lstm", finite, False, elapsed_s)

    # -- exhaustion ---------------------------------------------------------------------
    def _track_exhaustion(self, res: dict, now_s: float) -> None:
        eta = res.get("exhaustion")
        if eta is None:
            return
        metric = res["metric"]
        tracker = self._trackers.get(metric)
        if tracker is None:
            tracker = self._trackers[metric] = EpisodeTracker(self.params.episodes)
        warning_s = self.params.engine.exhaustion.warning_eta_s
        eta_s = _finite(eta.get("eta_s"))
        urgency = 0.0 if eta_s is None else 1.0 - min(eta_s, warning_s) / warning_s if warning_s > 0 else 1.0
        explanation = [{k: eta.get(k) for k in ("metric", "limit", "value", "eta_s", "eta_lower_s", "eta_upper_s",
                                                  "eta_ts_s", "method", "status")}]
        for event in tracker.update(res["origin_ts_s"], eta.get("severity") or "normal", urgency, [metric],
                                    explanation, detector=f"forecast:{res['model']}",
                                    model_version=self._lstm_version if res["candidate"] == "lstm" else None):
            event["kind"] = "exhaustion"
            event["metric"] = metric
            self._publish_event(event, now_s)

    def _publish_event(self, event: dict[str, Any], now_s: float) -> None:
        """Store the episode durably and send it on the anomalies topic, like detection's episodes."""
        assert self.events is not None
        self.events.record(event, now_s)
        eta = (event.get("explanation") or [{}])[0]
        if event.get("action") == "open":
            self.counts["exhaustion_events"] += 1
        text = self._eta_text(eta)
        log.log(logging.WARNING if event.get("action") != "close" else logging.INFO,
                "exhaustion %s %s (%s): %s", event.get("action"), event["id"][:8], event["severity"], text)
        msg = payloads.anomaly_event(
            self.ctx.config.device_id, now_s, event_id=event["id"], severity=event["severity"],
            metrics=[event["metric"]], value=_finite(eta.get("value")), expected_low=None,
            expected_high=_finite(eta.get("limit")), deviation=None, detector=str(event.get("detector")),
            model_version=event.get("model_version"), started_ts_s=float(event["start_ts_s"]),
            ended_ts_s=event.get("end_ts_s"), score=event.get("peak_score"), explanation=text)
        msg["value"], msg["score"] = _round(msg["value"]), _round(msg["score"])
        msg["eventKind"] = "exhaustion"
        msg["eta"] = self._eta_doc(eta.get("limit"), eta.get("eta_ts_s"), eta.get("eta_s"), eta.get("eta_lower_s"),
                                   eta.get("eta_upper_s"))
        self.ctx.emit("anomaly", msg, PRIORITY_HIGH)

    @staticmethod
    def _eta_text(eta: Mapping[str, Any]) -> str:
        metric, limit, value = eta.get("metric"), eta.get("limit"), eta.get("value")
        eta_s = _finite(eta.get("eta_s"))
        if eta_s is None:
            return f"{metric} = {value:.4g}: no longer expected to reach {limit:g}"
        lo, hi = _finite(eta.get("eta_lower_s")), _finite(eta.get("eta_upper_s"))
        band = f" ({_fmt_duration(lo)} .. {_fmt_duration(hi)})" if lo is not None and hi is not None else ""
        return f"{metric} = {value:.4g} reaches {limit:g} in {_fmt_duration(eta_s)}{band} ({eta.get('method')})"

    @staticmethod
    def _eta_doc(limit: Any, eta_ts_s: Any, eta_s: Any, lower_s: Any, upper_s: Any) -> dict[str, Any]:
        eta_ts = _finite(eta_ts_s)
        return _round({"threshold": _finite(limit), "at": None if eta_ts is None else payloads.iso_utc(eta_ts),
                       "seconds": _finite(eta_s), "lowerSeconds": _finite(lower_s), "upperSeconds": _finite(upper_s)})

    # -- schedule -----------------------------------------------------------------------
    def tick(self, now_mono_s: float) -> None:
        try:
            self.engine.maintain(max_fits=1)
        except (ArithmeticError, ValueError, LookupError) as exc:
            self.counts["errors"] += 1
            self._errors.warning("refit", "forecast refit failed: %s", exc)
        if self._next_publish is None:
            self._next_publish = now_mono_s + self.params.publish_every_s
        if now_mono_s < self._next_publish:
            return
        self._next_publish = now_mono_s + self.params.publish_every_s
        self._publish(self.ctx.clock.time())

    def _publish(self, now_s: float) -> None:
        stale_s = self.params.stale_after_steps * max(self.engine.step_s, self.ctx.config.agent.interval_s)
        scores = self._scores(now_s)
        try:
            results = self.engine.forecast()
        except (ArithmeticError, ValueError, LookupError) as exc:
            self.counts["errors"] += 1
            self._errors.warning("forecast", "forecast results unavailable: %s", exc)
            return
        for res in results:
            metric, made_at = res["metric"], float(res["origin_ts_s"])
            if self._published.get(metric) == made_at:
                continue                            # nothing new since the last publication
            if now_s - self._last_seen.get(metric, -math.inf) > stale_s:
                continue                            # the metric disappeared: no forecast from stale data
            self._published[metric] = made_at
            self._queue(res)
            self.ctx.emit("forecast", self._message(res, now_s), PRIORITY_NORMAL)
            self.counts["published"] += 1
        if scores:
            self._scores_pending = scores
        if now_s >= self._next_trim:
            self._next_trim = now_s + TRIM_EVERY_S
            self._trim(now_s)

    def _version_of(self, res: Mapping[str, Any]) -> int | None:
        return self._lstm_version if res.get("candidate") == "lstm" else None

    def _queue(self, res: Mapping[str, Any]) -> None:
        made_at, metric, step_s = float(res["origin_ts_s"]), res["metric"], float(res["step_s"])
        version = self._version_of(res)
        rows = []
        for k, value in enumerate(res["forecast"]):
            bands = [(res.get(key) or [None] * (k + 1))[k] for key in ("lower_80", "upper_80", "lower_95", "upper_95")]
            rows.append((made_at, metric, k + 1, made_at + (k + 1) * step_s, _finite(value),
                         *map(_finite, bands), res["model"], version))
        eta = res.get("exhaustion") or {}
        run = (made_at, metric, res["model"], version, step_s, _finite(eta.get("limit")), _finite(eta.get("eta_s")),
               _finite(eta.get("eta_lower_s")), _finite(eta.get("eta_upper_s")))
        if len(self._pending) == self._pending.maxlen:
            self.counts["dropped"] += 1
        self._pending.append((rows, run))

    def _message(self, res: Mapping[str, Any], now_s: float) -> dict[str, Any]:
        values = list(res["forecast"])
        intervals = {}
        for lv in self.params.engine.conformal.levels:
            key = level_key(lv)
            lo, hi = res.get(f"lower_{key}"), res.get(f"upper_{key}")
            if lo is not None and hi is not None:
                intervals[key] = (lo, hi)
        eta = res.get("exhaustion")
        msg = payloads.forecast(self.ctx.config.device_id, now_s, metric=res["metric"],
                                origin_ts_s=float(res["origin_ts_s"]), step_s=float(res["step_s"]), values=values,
                                intervals=intervals, model=res["model"], model_version=self._version_of(res),
                                eta_threshold=None if eta is None else eta.get("limit"),
                                eta_ts_s=None if eta is None else _finite(eta.get("eta_ts_s")))
        if eta is not None:
            msg["eta"].update({"lowerSeconds": _finite(eta.get("eta_lower_s")),
                               "upperSeconds": _finite(eta.get("eta_upper_s")),
                               "method": eta.get("method"), "severity": eta.get("severity")})
        for key in ("values", "intervals", "eta"):
            msg[key] = _round(msg[key])
        return msg

    # -- scores -------------------------------------------------------------------------
    def _label(self, candidate: str) -> str:
        if candidate == "lstm" and self._lstm_version is not None:
            return f"lstm:v{self._lstm_version}"
        return candidate

    def _scores(self, now_s: float) -> list[tuple]:
        """(metric, model, n, mae, mase, coverage_80, coverage_95, updated_at) per metric and candidate."""
        rows = []
        for metric, st in self.engine.status()["metrics"].items():
            sel = st["selector"]
            scale = self._scale.scale(metric)
            for cand, mae in sel["mae"].items():
                if mae is None:
                    continue
                cov = (st["calibration"].get(cand) or {}).get("coverage", {})
                mase = mae / scale if math.isfinite(scale) and scale > 0 else None
                rows.append((metric, self._label(cand), int(sel["n"].get(cand, 0)), float(mae), mase,
                             (cov.get("80") or {}).get("coverage"), (cov.get("95") or {}).get("coverage"), now_s))
        return rows

    # -- flush participant: forecasts ride on the store's periodic commit ---------------
    def write(self, conn: sqlite3.Connection) -> None:
        self._writing = len(self._pending)
        for rows, run in self._pending:
            conn.executemany("INSERT OR REPLACE INTO forecasts (made_at, metric, step, ts_s, value, lower_80, "
                             "upper_80, lower_95, upper_95, model, version) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
            conn.execute("INSERT OR REPLACE INTO forecast_runs (made_at, metric, model, version, step_s, "
                         "limit_value, eta_s, eta_lower_s, eta_upper_s) VALUES (?,?,?,?,?,?,?,?,?)", run)
        self._scores_writing = self._scores_pending
        if self._scores_writing:
            conn.executemany("INSERT OR REPLACE INTO forecast_scores (metric, model, n, mae, mase, coverage_80, "
                             "coverage_95, updated_at) VALUES (?,?,?,?,?,?,?,?)", self._scores_writing)

    def committed(self) -> None:
        """Drop what the transaction wrote (only now: a failed commit keeps it for the next one)."""
        for _ in range(min(self._writing, len(self._pending))):
            self.counts["rows"] += len(self._pending.popleft()[0])
        self._writing = 0
        if self._scores_writing is self._scores_pending:
            self._scores_pending = []
        self._scores_writing = None

    def _trim(self, now_s: float) -> None:
        cutoff = now_s - self.params.retention_s
        try:
            with self.ctx.store.transaction() as conn:
                conn.execute("DELETE FROM forecasts WHERE made_at < ?", (cutoff,))
                conn.execute("DELETE FROM forecast_runs WHERE made_at < ?", (cutoff,))
        except sqlite3.Error as exc:
            self.counts["write_errors"] += 1
            self._errors.warning("trim", "cannot trim old forecasts: %s", exc)

    # -- reporting ----------------------------------------------------------------------
    def twin(self) -> dict[str, Any]:
        out = {}
        for res in self.engine.forecast():
            eta = res.get("exhaustion") or {}
            out[res["metric"]] = {"model": res["model"], "etaSeconds": _finite(eta.get("eta_s"))}
        return {"forecast": out}

    def status(self) -> dict[str, Any]:
        eng = self.engine.status()
        metrics, coverage, mase = {}, [], []
        for metric, st in eng["metrics"].items():
            cov = {k: v.get("recent") for k, v in st["coverage"].items()}
            cand = st["selector"]["current"]
            mae = st["selector"]["mae"].get(cand)
            scale = self._scale.scale(metric)
            m = mae / scale if mae is not None and math.isfinite(scale) and scale > 0 else None
            metrics[metric] = {"model": st["model"], "steps": st["steps"], "coverage": cov, "mase": m}
            for key, value in cov.items():
                if value is not None:
                    coverage.append({"metric": metric, "level": float(key) / 100.0, "coverage": value})
            if m is not None:
                mase.append({"metric": metric, "model": st["model"], "mase": m})
        return {
            "forecast": {"step_s": eng["step_s"], "horizon": eng["horizon"], "steps": eng["steps"],
                         "fits": eng["fits"], "lstm": self._lstm_version, "metrics": metrics,
                         **self.counts, "pending": len(self._pending)},
            "forecast_coverage": coverage,
            "forecast_mase": mase,
        }
