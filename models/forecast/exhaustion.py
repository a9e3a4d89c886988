"""When will a resource run out? ETA to a limit from the forecast, and beyond it from a trend.

Two horizons, two methods:

1. Within the forecast horizon (12 steps): the point ETA is the first time the
   point forecast reaches the limit (linear interpolation between steps, the
   last observed value as step 0). Its interval comes from the conformal 95 %
   band: the earliest plausible crossing is where the UPPER band first reaches
   the limit, the latest where the LOWER band does (None = not within the
   horizon). No point crossing is "not_within_horizon".
2. Beyond the horizon (a disk that fills 1 % a day never crosses in 12 steps):
   a robust linear trend over a longer window (``trend_window_s``, default one
   day). History is reduced to at most ``trend_max_points`` chunk medians, the
   slope is the Theil-Sen estimator (median of pairwise slopes: immune to up to
   29 % outliers such as a log rotation) with Sen's distribution-free confidence
   interval (Kendall's S normal approximation). The trend ETA is reported only
   when the slope's lower confidence bound is > 0 (significantly rising) and the
   ETA is within ``trend_max_eta_s``; its interval combines the slope's bounds
   with a prediction band of the level (noise touches the limit early).
   Linear extrapolation is a simplification: it is the usual shape of disk
   filling and memory leaks, and the interval says how sure we are.

Limits are upper limits ("crossed" = value >= limit). Severity comes from the
ETA used (forecast first, else trend): <= ``critical_eta_s`` critical,
<= ``warning_eta_s`` warning, otherwise normal; a value already at or above its
limit is critical with ETA 0.
"""
from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_LIMITS: tuple[str, ...] = ("system.diskPercent*=95", "system.memoryPercent=95")


@dataclass(frozen=True)
class ExhaustionParams:
    warning_eta_s: float = 86400.0     # ETA at or below this -> warning
    critical_eta_s: float = 3600.0     # ETA at or below this -> critical
    trend_window_s: float = 86400.0    # history used by the trend extrapolation
    trend_min_points: int = 30         # steps of history before a trend is estimated
    trend_max_points: int = 120        # chunk medians the Theil-Sen fit runs on (O(n^2) pairs)
    trend_confidence: float = 0.95
    trend_max_eta_s: float = 30 * 86400.0

    def __post_init__(self) -> None:
        if self.critical_eta_s > self.warning_eta_s:
            raise ValueError("critical_eta_s must be <= warning_eta_s")


def parse_limits(specs: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """("system.diskPercent*=95", ...) -> ((pattern, limit), ...); patterns are fnmatch globs."""
    out = []
    for spec in specs:
        name, sep, value = spec.rpartition("=")
        if not sep or not name.strip():
            raise ValueError(f"limit {spec!r}: expected METRIC=LIMIT, e.g. system.diskPercent=95")
        try:
            out.append((name.strip(), float(value)))
        except ValueError:
            raise ValueError(f"limit {spec!r}: {value!r} is not a number") from None
    return tuple(out)


def limit_for(metric: str, limits: Sequence[tuple[str, float]]) -> float | None:
    """The first matching limit (exact names before globs)."""
    for pattern, value in limits:
        if pattern == metric:
            return value
    for pattern, value in limits:
        if fnmatch.fnmatchcase(metric, pattern):
            return value
    return None


def _first_crossing_s(values: np.ndarray, start: float, limit: float, step_s: float) -> float | None:
    """Seconds after the origin at which the path start, values[0], values[1], ... reaches ``limit``."""
    prev = start
    for k, v in enumerate(values):
        if not math.isfinite(v):
            return None
        if v >= limit:
            frac = 1.0 if v == prev else min(max((limit - prev) / (v - prev), 0.0), 1.0)
            return (k + frac) * step_s
        prev = v
    return None


def theil_sen(t: np.ndarray, y: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(slope, slope_lo, slope_hi, intercept) with Sen's (1968) confidence interval for the slope."""
    t = np.asarray(t, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(t)
    if n < 3:
        raise ValueError("need at least 3 points")
    i, j = np.triu_indices(n, k=1)
    dt = t[j] - t[i]
    ok = dt != 0
    slopes = np.sort((y[j] - y[i])[ok] / dt[ok])
    N = len(slopes)
    slope = float(np.median(slopes))
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    c = z * math.sqrt(n * (n - 1) * (2 * n + 5) / 18.0)
    lo_rank = int(math.floor((N - c) / 2.0))            # 1-based ranks
    hi_rank = int(math.ceil((N + c) / 2.0)) + 1
    slope_lo = float(slopes[max(lo_rank, 1) - 1])
    slope_hi = float(slopes[min(hi_rank, N) - 1])
    intercept = float(np.median(y - slope * t))
    return slope, slope_lo, slope_hi, intercept


def trend_estimate(ts_s: np.ndarray, values: np.ndarray, now_s: float,
                   params: ExhaustionParams = ExhaustionParams()) -> dict | None:
    """Robust linear trend over the last ``trend_window_s`` (or None with too little history).

    The level at ``now_s`` gets a prediction band too (z x robust scale of the
    residuals around the line): a noisy series touches the limit before its
    trend line does, so the earliest ETA uses the upper level and the steepest
    slope, the latest the lower level and the flattest slope.
    """
    ts_s = np.asarray(ts_s, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values) & np.isfinite(ts_s) & (ts_s >= now_s - params.trend_window_s)
    ts_s, values = ts_s[keep], values[keep]
    if len(ts_s) < params.trend_min_points:
        return None
    chunks = min(params.trend_max_points, len(ts_s))
    parts = np.array_split(np.arange(len(ts_s)), chunks)
    tt = np.array([np.median(ts_s[p]) for p in parts]) - now_s      # seconds relative to now
    yy = np.array([np.median(values[p]) for p in parts])
    slope, lo, hi, intercept = theil_sen(tt, yy, params.trend_confidence)
    resid = yy - (intercept + slope * tt)
    z = NormalDist().inv_cdf(0.5 + params.trend_confidence / 2.0)
    level_ci = z * 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
    return {"slope_per_s": slope, "slope_lower_per_s": lo, "slope_upper_per_s": hi,
            "level": intercept, "level_lower": intercept - level_ci, "level_upper": intercept + level_ci,
            "at_s": float(now_s), "window_s": float(now_s - ts_s[0]), "n": int(len(ts_s)),
            "significant": bool(lo > 0)}


def trend_eta(trend: dict, limit: float, now_s: float, params: ExhaustionParams = ExhaustionParams()
              ) -> tuple[float, float, float] | None:
    """(eta, earliest, latest) seconds from ``now_s`` along a significantly rising trend, else None."""
    if not trend or trend["slope_lower_per_s"] <= 0:
        return None
    dt = now_s - trend["at_s"]                      # the trend may have been fitted a few steps ago
    slope, lo, hi = trend["slope_per_s"], trend["slope_lower_per_s"], trend["slope_upper_per_s"]
    eta = max(limit - (trend["level"] + slope * dt), 0.0) / slope
    if eta > params.trend_max_eta_s:
        return None
    earliest = max(limit - (trend["level_upper"] + hi * dt), 0.0) / hi
    latest = max(limit - (trend["level_lower"] + lo * dt), 0.0) / lo
    return eta, min(earliest, eta), max(latest, eta)


def severity_for(eta_s: float | None, params: ExhaustionParams) -> str:
    if eta_s is None:
        return "normal"
    if eta_s <= params.critical_eta_s:
        return "critical"
    if eta_s <= params.warning_eta_s:
        return "warning"
    return "normal"


def exhaustion_eta(metric: str, limit: float, now_s: float, origin_ts_s: float, step_s: float,
                   last_value: float, forecast: np.ndarray, band95: tuple[np.ndarray, np.ndarray] | None,
                   trend: dict | None = None, params: ExhaustionParams = ExhaustionParams()) -> dict:
    """Plain result dict for one metric and limit (see module doc for the rules)."""
    forecast = np.asarray(forecast, dtype=np.float64)
    horizon_s = len(forecast) * step_s
    lag = max(0.0, now_s - origin_ts_s)        # the forecast was made a little before now

    def rel(x: float | None) -> float | None:
        return None if x is None else max(0.0, x - lag)

    result = {"metric": metric, "limit": float(limit), "value": float(last_value), "now_s": float(now_s),
              "horizon_s": float(horizon_s), "status": "not_within_horizon", "method": None,
              "eta_s": None, "eta_lower_s": None, "eta_upper_s": None, "eta_ts_s": None,
              "within_horizon": False, "severity": "normal", "trend": trend}
    if math.isfinite(last_value) and last_value >= limit:
        result.update(status="exceeded", method="observed", eta_s=0.0, eta_lower_s=0.0, eta_upper_s=0.0,
                      eta_ts_s=float(now_s), within_horizon=True, severity="critical")
        return result
    point = rel(_first_crossing_s(forecast, last_value, limit, step_s))
    if band95 is not None:
        lower, upper = band95
        result["eta_lower_s"] = rel(_first_crossing_s(np.asarray(upper), last_value, limit, step_s))
        result["eta_upper_s"] = rel(_first_crossing_s(np.asarray(lower), last_value, limit, step_s))
    if point is not None:
        result.update(status="within_horizon", method="forecast", eta_s=point, within_horizon=True,
                      eta_ts_s=float(now_s + point))
    elif (t_eta := trend_eta(trend, limit, now_s, params)) is not None:
        eta, earliest, latest = t_eta
        band_earliest = result["eta_lower_s"]          # the upper band may already cross within the horizon
        result.update(status="trend", method="trend", eta_s=eta,
                      eta_lower_s=min(earliest, band_earliest) if band_earliest is not None else earliest,
                      eta_upper_s=latest, eta_ts_s=float(now_s + eta))
    result["severity"] = severity_for(result["eta_s"], params)
    return result
