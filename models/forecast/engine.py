"""The forecasting loop the daemon drives: samples in, per-metric forecasts out.

    engine = ForecastEngine(ForecastParams(...))
    engine.warm_start(store.iter_samples(since_s=now - engine.history_s()))   # at start
    engine.observe(sample.ts_s, sample.values)    # on_sample: cheap, returns results of a closed step
    engine.maintain(now_s)                        # tick: refits at most ``max_fits`` due fallbacks
    (or, off the main thread: job = engine.prepare_refit(m); fit = job.run() in a worker;
     engine.apply_refit(job, fit) back on the main thread)
    engine.forecast(now_s)                        # latest per-metric results, ETAs relative to now
    engine.load_lstm(model_dir) / engine.unload_lstm()

Steps: samples are averaged into buckets of ``step_s`` seconds (0 = every
sample is a step), stamped with the bucket's end time. Missing buckets up to
``max_gap_steps`` are forward-filled (not scored); a longer gap restarts the
histories (the daily season's phase is lost anyway).

At each step every candidate forecasts (the fallback, the LSTM when one covers
the metric, and the ``baselines``: naive by default, snaive on request); every
earlier forecast whose target is this step is scored
(residual -> that candidate's conformal calibrator, |error| -> the selector,
published band -> realised coverage). The selector's choice among
``selectable`` is published with its conformal bands and, for metrics with a
limit, an exhaustion ETA. Naive is selectable by default: the fallback's
structure is chosen on in-sample error, and on some series (NAB ec2 CPU, grok)
the last value beats it out of sample; publishing it then cut the fallback-only
mean MASE on NAB realAWSCloudwatch from 1.205 to 1.136 (bench/forecast.py).
Once an LSTM covers the metric, naive stops competing (still scored): the LSTM
predicts changes from the last value, so "no change" is already its zero
output, and a third candidate only added switching noise (auto 1.060 vs 1.033).
"""
from __future__ import annotations

import fnmatch
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from models.forecast.conformal import ConformalCalibrator, ConformalParams, CoverageTracker, level_key
from models.forecast.exhaustion import (DEFAULT_LIMITS, ExhaustionParams, exhaustion_eta, limit_for,
                                        parse_limits, trend_estimate)
from models.forecast.fallback import (FallbackParams, FitResult, NaiveModel, PointForecaster,
                                      SeasonalNaiveModel, fit_fallback)
from models.forecast.lstm import InvalidModel, LSTMForecaster
from models.forecast.selector import ModelSelector, SelectorParams
from models.forecast.series import season_steps
from models.features import metric_domain

log = logging.getLogger(__name__)

DEFAULT_METRICS: tuple[str, ...] = (
    "system.cpuUsage",
    "system.memoryPercent",
    "system.diskPercent",
    "system.load1",
    "system.temperature",
)
FALLBACK = "fallback"
LSTM = "lstm"
BASELINES = ("naive", "snaive")


@dataclass(frozen=True)
class ForecastParams:
    metrics: tuple[str, ...] = DEFAULT_METRICS     # names or fnmatch globs; metrics with a limit are added
    step_s: float = 60.0                            # bucket length; 0 = one step per observation
    horizon: int = 12
    season_s: float = 86400.0
    history_max_steps: int = 6000                   # per metric ring (fit window + trend window)
    refit_every_steps: int = 60
    max_gap_steps: int = -1                         # -1 = one season; longer gaps reset histories
    limits: tuple[str, ...] = DEFAULT_LIMITS        # "METRIC_OR_GLOB=LIMIT"
    baselines: tuple[str, ...] = ("naive",)         # extra candidates: "naive", "snaive" (always scored)
    selectable: tuple[str, ...] = ("lstm", "fallback", "naive")   # candidates the selector may publish
    baselines_compete_with_lstm: bool = False       # see module docstring
    fallback: FallbackParams = field(default_factory=FallbackParams)
    conformal: ConformalParams = field(default_factory=ConformalParams)
    selector: SelectorParams = field(default_factory=SelectorParams)
    exhaustion: ExhaustionParams = field(default_factory=ExhaustionParams)

    @classmethod
    def from_flat(cls, **kw) -> "ForecastParams":
        """Build from the flat ``[forecast]`` config keys (see FLAT_KEYS); unknown keys raise TypeError."""
        unknown = set(kw) - set(FLAT_KEYS)
        if unknown:
            raise TypeError(f"unknown forecast keys {sorted(unknown)}")
        nested: dict[str, dict] = {"fallback": {}, "conformal": {}, "selector": {}, "exhaustion": {}}
        top = {}
        for key, value in kw.items():
            where, name = FLAT_KEYS[key]
            if where == "":
                top[name] = tuple(value) if isinstance(value, (list, tuple)) else value
            else:
                nested[where][name] = value
        return cls(**top, fallback=FallbackParams(**nested["fallback"]),
                   conformal=ConformalParams(**nested["conformal"]), selector=SelectorParams(**nested["selector"]),
                   exhaustion=ExhaustionParams(**nested["exhaustion"]))

    def __post_init__(self) -> None:
        if self.horizon < 1 or self.step_s < 0 or self.refit_every_steps < 1 or self.history_max_steps < 16:
            raise ValueError("horizon >= 1, step_s >= 0, refit_every_steps >= 1, history_max_steps >= 16 required")
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)}; allowed: {BASELINES}")
        if FALLBACK not in self.selectable or not set(self.selectable) <= {LSTM, FALLBACK, *self.baselines}:
            raise ValueError("selectable must include 'fallback' and only name lstm, fallback or configured baselines")
        parse_limits(self.limits)


# flat config key -> (nested params field or "" for ForecastParams itself, attribute)
FLAT_KEYS: dict[str, tuple[str, str]] = {
    "metrics": ("", "metrics"),
    "step_s": ("", "step_s"),
    "horizon": ("", "horizon"),
    "season_s": ("", "season_s"),
    "history_max_steps": ("", "history_max_steps"),
    "refit_every_steps": ("", "refit_every_steps"),
    "max_gap_steps": ("", "max_gap_steps"),
    "limits": ("", "limits"),
    "fit_max_seasons": ("fallback", "fit_max_seasons"),
    "robust": ("fallback", "robust"),
    "conformal_window": ("conformal", "window"),
    "conformal_min_residuals": ("conformal", "min_residuals"),
    "aci_gamma": ("conformal", "aci_gamma"),
    "selector_window": ("selector", "window"),
    "selector_min_errors": ("selector", "min_errors"),
    "selector_margin": ("selector", "margin"),
    "warning_eta_s": ("exhaustion", "warning_eta_s"),
    "critical_eta_s": ("exhaustion", "critical_eta_s"),
    "trend_window_s": ("exhaustion", "trend_window_s"),
    "trend_max_eta_s": ("exhaustion", "trend_max_eta_s"),
}


class RingBuffer:
    """Fixed-capacity float history with O(1) append and a contiguous view of the last n values.

    Every value is written twice (at i and i + capacity) so the newest ``capacity``
    values are always one contiguous slice: no copy per step for the LSTM window.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._buf = np.full(2 * capacity, np.nan)
        self._i = -1           # slot of the newest value
        self.size = 0

    def append(self, x: float) -> None:
        self._i = (self._i + 1) % self.capacity
        self._buf[self._i] = x
        self._buf[self._i + self.capacity] = x
        self.size = min(self.size + 1, self.capacity)

    def last(self, n: int) -> np.ndarray:
        """A read-only view of the newest ``min(n, size)`` values, oldest first."""
        n = min(n, self.size)
        end = self._i + self.capacity + 1
        view = self._buf[end - n:end]
        view.flags.writeable = False
        return view

    def values(self) -> np.ndarray:
        return self.last(self.size).copy()

    def clear(self) -> None:
        self._i = -1
        self.size = 0

    def __len__(self) -> int:
        return self.size


@dataclass
class _Issued:
    index: int                                  # step index of the origin
    points: dict[str, np.ndarray]               # candidate -> point forecast (horizon,)
    bands: dict[str, dict | None]               # candidate -> {level: (lower, upper)} or None
    published: str                              # candidate published at this origin


class _MetricState:
    def __init__(self, name: str, params: ForecastParams, m: int, limit: float | None) -> None:
        self.name = name
        self.m = m
        self.limit = limit
        self.ts = RingBuffer(params.history_max_steps)
        self.ys = RingBuffer(params.history_max_steps)
        self.index = -1                          # step index of the newest value
        self.fallback: PointForecaster | None = None
        self.fallback_kind = "none"
        self.fit_info: dict = {}
        self.steps_at_fit = 0
        self.steps_since_fit = 0
        self.baselines: dict[str, PointForecaster] = {}
        self.calibrators: dict[str, ConformalCalibrator] = {}
        self.selector = ModelSelector(params.selector, default=FALLBACK)
        self.pending: deque[_Issued] = deque(maxlen=params.horizon)
        self.published_coverage = {lv: CoverageTracker(params.conformal.coverage_window)
                                   for lv in params.conformal.levels}
        self.latest: dict | None = None
        self.trend: dict | None = None
        self.steps_since_trend = 10**9

    def calibrator(self, name: str, params: ForecastParams) -> ConformalCalibrator:
        cal = self.calibrators.get(name)
        if cal is None:
            cal = self.calibrators[name] = ConformalCalibrator(params.horizon, params.conformal)
        return cal


class StepAggregator:
    """Bucket means over ``step_s``; yields (step_ts_s, values, filled) for every closed bucket."""

    def __init__(self, step_s: float, max_gap_steps: int) -> None:
        self.step_s = step_s
        self.max_gap_steps = max_gap_steps
        self._bucket: int | None = None
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, ts_s: float, values: Mapping[str, float]) -> list[tuple[float, dict[str, float], bool]]:
        """Returns closed steps; an empty list while the bucket is still open. A gap longer than
        ``max_gap_steps`` is signalled by a single (nan, {}, True) entry before the new bucket."""
        b = int(math.floor(ts_s / self.step_s))
        out: list[tuple[float, dict[str, float], bool]] = []
        if self._bucket is not None and b > self._bucket:
            means = {k: self._sums[k] / self._counts[k] for k in self._sums if self._counts[k]}
            out.append(((self._bucket + 1) * self.step_s, means, False))
            missing = b - self._bucket - 1
            if missing > self.max_gap_steps:
                out.append((math.nan, {}, True))
            else:
                for j in range(missing):
                    out.append(((self._bucket + 2 + j) * self.step_s, means, True))
            self._sums, self._counts = {}, {}
        if self._bucket is None or b > self._bucket:
            self._bucket = b
        # a sample from an earlier bucket (wall clock stepped back) joins the open bucket
        for k, v in values.items():
            if v is not None and math.isfinite(v):
                self._sums[k] = self._sums.get(k, 0.0) + float(v)
                self._counts[k] = self._counts.get(k, 0) + 1
        return out


def _bands_at(bands: dict | None, k: int) -> dict[float, tuple[float, float]] | None:
    if not bands:
        return None
    return {lv: (float(lo[k]), float(hi[k])) for lv, (lo, hi) in bands.items()}


@dataclass
class RefitJob:
    """A fallback refit detached from the engine (see ForecastEngine.prepare_refit)."""

    metric: str
    y: np.ndarray
    index: int
    season_steps: int
    horizon: int
    params: FallbackParams

    def run(self) -> FitResult:
        return fit_fallback(self.y, self.season_steps, self.horizon, self.params)


class ForecastEngine:
    """Per-metric forecasters, calibrators and selectors; see the module docstring for the protocol."""

    def __init__(self, params: ForecastParams = ForecastParams(), step_s: float | None = None) -> None:
        self.params = params
        self.step_s = float(params.step_s if step_s is None else step_s)
        self._limits = parse_limits(params.limits)
        self._season = season_steps(self.step_s, params.season_s) if self.step_s > 0 else 0
        max_gap = params.max_gap_steps if params.max_gap_steps >= 0 else max(self._season, params.horizon)
        self._agg = StepAggregator(self.step_s, max_gap) if self.step_s > 0 else None
        self._metrics: dict[str, _MetricState] = {}
        self._ignored: set[str] = set()
        self._inflight: set[str] = set()
        self.lstm: LSTMForecaster | None = None
        self._quiet = False
        self.steps = 0
        self.fits = 0
        self.last_step_ts_s: float | None = None

    # -- configuration ------------------------------------------------------------------------
    def _wanted(self, metric: str) -> bool:
        if metric in self._ignored:
            return False
        ok = any(fnmatch.fnmatchcase(metric, p) for p in self.params.metrics) or \
            limit_for(metric, self._limits) is not None or \
            (self.lstm is not None and metric in self.lstm.inputs)
        if not ok:
            self._ignored.add(metric)
        return ok

    def _state(self, metric: str) -> _MetricState:
        st = self._metrics.get(metric)
        if st is None:
            st = self._metrics[metric] = _MetricState(metric, self.params, self._season,
                                                      limit_for(metric, self._limits))
            if self.lstm is not None and metric in self.lstm.targets:
                self._attach_lstm(st)
        return st

    def history_s(self) -> float:
        """How much sample history ``warm_start`` can use (the ring capacity in seconds)."""
        return self.params.history_max_steps * (self.step_s or 1.0)

    def load_lstm(self, model_dir: str | Path) -> LSTMForecaster:
        """Load and validate an LSTM directory; it becomes the preferred candidate of its metrics."""
        model = LSTMForecaster.from_dir(model_dir)
        self.set_lstm(model)
        return model

    def set_lstm(self, model: LSTMForecaster) -> None:
        if model.horizon != self.params.horizon:
            raise InvalidModel(f"LSTM horizon {model.horizon} != engine horizon {self.params.horizon}")
        if self.step_s > 0 and abs(model.step_s - self.step_s) > 0.01 * self.step_s:
            raise InvalidModel(f"LSTM step {model.step_s}s != engine step {self.step_s}s")
        self.unload_lstm()
        self.lstm = model
        self._ignored.difference_update(model.inputs)        # its inputs must be tracked
        for metric in model.targets:
            if metric in self._metrics:
                self._attach_lstm(self._metrics[metric])

    def _attach_lstm(self, st: _MetricState) -> None:
        assert self.lstm is not None
        cal = st.calibrators[LSTM] = ConformalCalibrator(self.params.horizon, self.params.conformal)
        cal.seed(self.lstm.calibration_residuals(st.name))
        st.selector.set_preferred(LSTM)

    def unload_lstm(self) -> None:
        if self.lstm is None:
            return
        for st in self._metrics.values():
            st.calibrators.pop(LSTM, None)
            st.selector.errors.pop(LSTM, None)
            if st.selector.preferred == LSTM:
                st.selector.set_preferred(None)
        self.lstm = None

    # -- input ----------------------------------------------------------------------------------
    def observe(self, ts_s: float, values: Mapping[str, float]) -> list[dict]:
        """One sample. Returns the new per-metric results when a step closed, else []."""
        if self._agg is None:
            return self.observe_step(ts_s, values)
        results: list[dict] = []
        for step_ts, means, filled in self._agg.add(ts_s, values):
            if math.isnan(step_ts):
                self.reset_history()
                continue
            results = self.observe_step(step_ts, means, filled=filled)
        return results

    def warm_start(self, samples: Iterable[tuple[float, Mapping[str, float]]]) -> int:
        """Feed stored history without forecasting, then fit every metric. Returns samples read."""
        n = 0
        self._quiet = True
        try:
            for ts_s, values in samples:
                self.observe(ts_s, values)
                n += 1
        finally:
            self._quiet = False
        self.maintain(max_fits=None)
        return n

    def reset_history(self) -> None:
        log.info("forecast: gap longer than max_gap_steps, restarting histories")
        for st in self._metrics.values():
            st.ts.clear()
            st.ys.clear()
            st.pending.clear()
            st.fallback = None
            st.fallback_kind = "none"
            st.baselines.clear()
            st.steps_since_fit = 0
            st.steps_at_fit = 0

    def observe_step(self, step_ts_s: float, values: Mapping[str, float], filled: bool = False) -> list[dict]:
        """One step (already aggregated). ``filled`` steps update models but are not scored."""
        self.steps += 1
        self.last_step_ts_s = step_ts_s
        touched: list[_MetricState] = []
        for metric, v in values.items():
            if v is None or not math.isfinite(v) or not self._wanted(metric):
                continue
            st = self._state(metric)
            st.index += 1
            st.ts.append(step_ts_s)
            st.ys.append(float(v))
            touched.append(st)
        # metrics seen before but absent now keep their last value (same step index for all)
        for st in self._metrics.values():
            if st not in touched and len(st.ys):
                st.index += 1
                st.ts.append(step_ts_s)
                st.ys.append(float(st.ys.last(1)[0]))
                touched.append(st)
        if self._quiet:
            for st in touched:
                st.steps_since_fit += 1
            return []
        lstm_out = self._run_lstm()
        results = []
        for st in touched:
            y = float(st.ys.last(1)[0])
            if not filled:
                self._score(st, y)
            self._update_models(st, y)
            res = self._issue(st, step_ts_s, y, lstm_out)
            if res is not None:
                results.append(res)
        return results

    # -- per step -----------------------------------------------------------------------------
    def _score(self, st: _MetricState, actual: float) -> None:
        """Every pending forecast whose target is this step meets its actual."""
        due = [(st.index - iss.index, iss) for iss in st.pending if 1 <= st.index - iss.index <= self.params.horizon]
        if not due:
            return
        levels = self.params.conformal.levels
        for name in {name for _, iss in due for name in iss.points}:
            rows = [(k, iss) for k, iss in due if name in iss.points]
            steps = np.array([k for k, _ in rows])
            f = np.array([iss.points[name][k - 1] for k, iss in rows])
            issued = None
            if any(iss.bands.get(name) for _, iss in rows):
                issued = {lv: (np.array([iss.bands[name][lv][0][k - 1] if iss.bands.get(name) else np.nan
                                         for k, iss in rows]),
                               np.array([iss.bands[name][lv][1][k - 1] if iss.bands.get(name) else np.nan
                                         for k, iss in rows]))
                          for lv in levels}
            st.calibrator(name, self.params).observe_steps(steps, actual, f, issued)
            st.selector.record_many(name, np.abs(actual - f))
        for k, iss in due:
            issued_pub = _bands_at(iss.bands.get(iss.published), k - 1)
            if issued_pub:
                for lv, (lo, hi) in issued_pub.items():
                    if math.isfinite(lo) and math.isfinite(hi):
                        st.published_coverage[lv].add(lo <= actual <= hi)

    def _update_models(self, st: _MetricState, y: float) -> None:
        st.steps_since_fit += 1
        if st.fallback is None:
            st.fallback = NaiveModel(y)
            st.fallback_kind = "naive"
        else:
            st.fallback.update(y)
        for name in self.params.baselines:
            model = st.baselines.get(name)
            if model is not None:
                model.update(y)
            elif name == "naive":
                st.baselines[name] = NaiveModel(y)
            elif name == "snaive" and st.m > 1 and len(st.ys) >= st.m:
                st.baselines[name] = SeasonalNaiveModel(st.ys.last(st.m))

    def _run_lstm(self) -> dict[str, np.ndarray]:
        model = self.lstm
        if model is None:
            return {}
        cols = []
        for name in model.inputs:
            st = self._metrics.get(name)
            if st is None or len(st.ys) < model.seq_len:
                return {}
            cols.append(st.ys.last(model.seq_len))
        ts_state = self._metrics[model.inputs[0]]
        window = np.stack(cols, axis=1)
        out = model.predict(window, ts_state.ts.last(model.seq_len))
        return {t: out[:, i] for i, t in enumerate(model.targets)}

    def _issue(self, st: _MetricState, origin_ts_s: float, y: float, lstm_out: dict[str, np.ndarray]) -> dict | None:
        h = self.params.horizon
        points: dict[str, np.ndarray] = {}
        if st.fallback is not None:
            points[FALLBACK] = st.fallback.forecast(h)
        if st.name in lstm_out:
            points[LSTM] = lstm_out[st.name]
        for name, model in st.baselines.items():
            points[name] = model.forecast(h)
        bands = {name: st.calibrator(name, self.params).bands(p) for name, p in points.items()}
        selectable = [n for n in self.params.selectable if n in points]
        if LSTM in selectable and not self.params.baselines_compete_with_lstm:
            selectable = [n for n in selectable if n not in BASELINES]
        chosen = st.selector.choose(selectable)
        st.pending.append(_Issued(st.index, points, bands, chosen))
        st.latest = self._result(st, origin_ts_s, y, chosen, points[chosen], bands[chosen])
        return st.latest

    def _model_label(self, st: _MetricState, name: str) -> str:
        if name == FALLBACK:
            return f"fallback:{st.fallback_kind}"
        if name == LSTM and self.lstm is not None:
            return f"lstm:v{self.lstm.version}"
        return name

    def _result(self, st: _MetricState, origin_ts_s: float, y: float, chosen: str, point: np.ndarray,
                bands: dict | None) -> dict:
        h = self.params.horizon
        step = self.step_s or 0.0
        low, high = metric_domain(st.name)  # no band below 0 % or above 100 %
        res: dict = {
            "metric": st.name,
            "origin_ts_s": origin_ts_s,
            "step_s": step,
            "horizon": h,
            "model": self._model_label(st, chosen),
            "candidate": chosen,
            "last_value": y,
            "forecast": [float(v) for v in np.clip(point, low, high)],
        }
        for lv in self.params.conformal.levels:
            key = level_key(lv)
            if bands is None:
                res[f"lower_{key}"] = res[f"upper_{key}"] = None
            else:
                lo, hi = (np.clip(np.asarray(b, dtype=float), low, high) for b in bands[lv])
                res[f"lower_{key}"] = [None if not math.isfinite(v) else float(v) for v in lo]
                res[f"upper_{key}"] = [None if not math.isfinite(v) else float(v) for v in hi]
        res["coverage"] = {level_key(lv): t.summary() for lv, t in st.published_coverage.items()}
        res["mae"] = {n: (None if math.isnan(e.mae) else e.mae) for n, e in st.selector.errors.items()}
        res["exhaustion"] = None
        if st.limit is not None and step > 0:
            st.steps_since_trend += 1
            if st.steps_since_trend >= 5:
                # a step's mean describes the middle of its bucket, not its end
                st.trend = trend_estimate(st.ts.values() - step / 2.0, st.ys.values(), origin_ts_s,
                                          self.params.exhaustion)
                st.steps_since_trend = 0
            res["exhaustion"] = self._eta(st, res, origin_ts_s)
        return res

    def _eta(self, st: _MetricState, res: dict, now_s: float) -> dict:
        band = None
        key = level_key(0.95) if 0.95 in self.params.conformal.levels else level_key(max(self.params.conformal.levels))
        if res.get(f"lower_{key}") is not None:
            nan = math.nan
            band = (np.array([nan if v is None else v for v in res[f"lower_{key}"]]),
                    np.array([nan if v is None else v for v in res[f"upper_{key}"]]))
        return exhaustion_eta(st.name, st.limit, now_s, res["origin_ts_s"], self.step_s, res["last_value"],
                              np.asarray(res["forecast"]), band, st.trend, self.params.exhaustion)

    # -- schedules and output -------------------------------------------------------------------
    def refit_due(self) -> list[str]:
        due = []
        for st in self._metrics.values():
            n = len(st.ys)
            if n < 3 or st.name in self._inflight:
                continue
            every = min(self.params.refit_every_steps, max(4, st.steps_at_fit))
            if st.fallback_kind in ("none", "naive") and st.steps_at_fit == 0:
                every = 1 if n >= self.params.fallback.min_trend_steps else every
            if st.steps_since_fit >= every:
                due.append(st.name)
        return sorted(due, key=lambda m: -self._metrics[m].steps_since_fit)

    def maintain(self, now_s: float | None = None, max_fits: int | None = 1) -> list[str]:
        """Refit the fallback of due metrics (at most ``max_fits``; None = all). Call from tick():
        one fit is O(30 x window) scalar steps, so spreading fits keeps each call short."""
        done = []
        for metric in self.refit_due()[: max_fits if max_fits is not None else None]:
            self.refit(metric)
            done.append(metric)
        return done

    def refit(self, metric: str) -> None:
        """Synchronous refit of one metric's fallback."""
        job = self.prepare_refit(metric)
        self.apply_refit(job, job.run())

    def prepare_refit(self, metric: str) -> "RefitJob":
        """Snapshot for a refit that may run in a worker thread: ``job.run()`` is pure (numpy on a
        copy) and ``apply_refit`` - on the engine's thread - catches up with steps seen meanwhile."""
        st = self._metrics[metric]
        self._inflight.add(metric)
        return RefitJob(metric, st.ys.values(), st.index, st.m, self.params.horizon, self.params.fallback)

    def apply_refit(self, job: "RefitJob", fit: FitResult | None) -> bool:
        """Install a finished fit (``None`` = the job failed: just release it)."""
        self._inflight.discard(job.metric)
        st = self._metrics.get(job.metric)
        if fit is None:
            return False
        if st is None:
            return False
        behind = st.index - job.index
        if behind < 0 or behind > len(st.ys):          # histories restarted meanwhile: drop the fit
            return False
        for v in st.ys.last(behind).tolist() if behind else []:
            fit.model.update(v)
        cal = st.calibrator(FALLBACK, self.params)
        if fit.kind != st.fallback_kind and len(fit.residuals) >= self.params.conformal.min_residuals:
            # another model structure: its own predictive residuals describe it better than the old ones
            cal.reset_residuals()
        cal.seed(fit.residuals)
        st.fallback = fit.model
        st.fallback_kind = fit.kind
        st.fit_info = {"kind": fit.kind, "criterion": fit.criterion, "n_steps": fit.n_steps,
                       "coeffs": {k: v for k, v in fit.coeffs.items() if k in ("alpha", "beta", "phi", "gamma", "m")}}
        st.steps_at_fit = len(job.y)
        st.steps_since_fit = behind
        self.fits += 1
        return True

    def issued(self, metric: str) -> dict | None:
        """The newest origin's forecasts of EVERY candidate (for backtests and benches):
        {"index", "published", "points": {name: array}, "bands": {name: {level: (lo, hi)} | None}}."""
        st = self._metrics.get(metric)
        if st is None or not st.pending:
            return None
        iss = st.pending[-1]
        return {"index": iss.index, "published": iss.published, "points": iss.points, "bands": iss.bands,
                "model": self._model_label(st, iss.published)}

    def forecast(self, now_s: float | None = None) -> list[dict]:
        """Latest result per metric; exhaustion ETAs are re-based on ``now_s`` when given."""
        out = []
        for st in self._metrics.values():
            if st.latest is None:
                continue
            res = dict(st.latest)
            if now_s is not None and st.limit is not None and res.get("exhaustion") is not None:
                res["exhaustion"] = self._eta(st, res, now_s)
            out.append(res)
        return out

    def status(self) -> dict:
        metrics = {}
        for st in self._metrics.values():
            metrics[st.name] = {
                "steps": len(st.ys), "model": self._model_label(st, st.selector.current),
                "fallback": st.fit_info or {"kind": st.fallback_kind},
                "selector": st.selector.summary(),
                "coverage": {level_key(lv): t.summary() for lv, t in st.published_coverage.items()},
                "calibration": {n: c.summary() for n, c in st.calibrators.items()},
                "limit": st.limit,
            }
        return {"step_s": self.step_s, "horizon": self.params.horizon, "steps": self.steps, "fits": self.fits,
                "lstm": self.lstm.describe() if self.lstm else None, "metrics": metrics}
