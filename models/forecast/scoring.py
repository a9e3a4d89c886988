"""Scores for past forecasts once their actuals exist; pure functions on arrays.

MASE (Hyndman & Koehler 2006) divides a forecast's MAE by the in-sample MAE of
a benchmark forecast on the training part of the same series, so values are
comparable across metrics of different units: < 1 beats the benchmark's
in-sample one-step error. We scale by the one-step naive MAE (``season=1``) by
default because a daily season is not guaranteed on device metrics; pass
``season=m`` for the seasonal-naive scale. The scale is the same for every model
of a series, so ranking models by MASE equals ranking them by MAE.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np


def _finite_pairs(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    arrs = [np.asarray(a, dtype=np.float64) for a in arrays]
    ok = np.logical_and.reduce([np.isfinite(a) for a in arrs])
    return tuple(a[ok] for a in arrs)


def mae(actual: np.ndarray, forecast: np.ndarray) -> float:
    a, f = _finite_pairs(actual, forecast)
    return float(np.mean(np.abs(a - f))) if len(a) else math.nan


def naive_scale(insample: np.ndarray, season: int = 1) -> float:
    """In-sample MAE of the (seasonal) naive one-step forecast: mean |y_t - y_{t-season}|."""
    y = np.asarray(insample, dtype=np.float64)
    if len(y) <= season:
        return math.nan
    d = np.abs(y[season:] - y[:-season])
    d = d[np.isfinite(d)]
    return float(d.mean()) if len(d) else math.nan


def mase(actual: np.ndarray, forecast: np.ndarray, scale: float) -> float:
    """MAE / scale; NaN when the scale is 0 or unknown (a constant training series)."""
    if not (math.isfinite(scale) and scale > 0):
        return math.nan
    return mae(actual, forecast) / scale


def coverage(actual: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
    """Share of actuals inside [lower, upper] among rows that have a band."""
    a, lo, hi = _finite_pairs(actual, lower, upper)
    return float(np.mean((a >= lo) & (a <= hi))) if len(a) else math.nan


def mean_width(lower: np.ndarray, upper: np.ndarray) -> float:
    lo, hi = _finite_pairs(lower, upper)
    return float(np.mean(hi - lo)) if len(lo) else math.nan


def score_table(rows: Iterable[Mapping[str, float | str]], scale: float,
                levels: Sequence[str] = ("80", "95")) -> dict[str, dict[str, float]]:
    """Backtest rows (origin, step, actual, forecast, lower_XX, upper_XX, model) -> per-model scores.

    Rows of every model present are scored separately, plus "all" over all rows.
    """
    by_model: dict[str, list[Mapping]] = {}
    for r in rows:
        by_model.setdefault(str(r.get("model", "")), []).append(r)
        by_model.setdefault("all", []).append(r)
    out: dict[str, dict[str, float]] = {}
    for name, rs in by_model.items():
        def col(key: str) -> np.ndarray:
            return np.asarray([_num(r.get(key)) for r in rs], dtype=np.float64)
        a, f = col("actual"), col("forecast")
        s = {"n": float(len(rs)), "mae": mae(a, f), "mase": mase(a, f, scale)}
        for lv in levels:
            s[f"coverage_{lv}"] = coverage(a, col(f"lower_{lv}"), col(f"upper_{lv}"))
            s[f"width_{lv}"] = mean_width(col(f"lower_{lv}"), col(f"upper_{lv}"))
        out[name] = s
    return out


def _num(v) -> float:
    if v is None or v == "":
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan
