"""Engine results -> compact JSON bodies for the ``forecast`` outbox kind (pure functions).

The engine's result dicts carry diagnostics (per-candidate MAE, rolling
coverage windows) that a fleet does not need every minute; these builders keep
what a dashboard or an alert rule uses and round floats to ``digits``
significant digits, which typically halves the message size. The transport adds
the message id and device id.
"""
from __future__ import annotations

import math
from typing import Any

_SERIES = ("forecast", "lower_80", "upper_80", "lower_95", "upper_95")


def _round(v: Any, digits: int) -> Any:
    if isinstance(v, float):
        if not math.isfinite(v):
            return None
        return float(f"{v:.{digits}g}")
    if isinstance(v, list):
        return [_round(x, digits) for x in v]
    if isinstance(v, dict):
        return {k: _round(x, digits) for k, x in v.items()}
    return v


def exhaustion_payload(eta: dict | None, digits: int = 6) -> dict | None:
    if eta is None:
        return None
    keep = ("metric", "limit", "value", "status", "method", "eta_s", "eta_lower_s", "eta_upper_s", "eta_ts_s",
            "severity", "horizon_s")
    out = {k: eta.get(k) for k in keep}
    trend = eta.get("trend")
    if trend:
        out["trend_slope_per_s"] = trend.get("slope_per_s")
        out["trend_window_s"] = trend.get("window_s")
    return _round(out, digits)


def forecast_payload(result: dict, digits: int = 6) -> dict:
    """One metric's forecast (an item of ``ForecastEngine.forecast()``) -> message body."""
    body: dict[str, Any] = {
        "metric": result["metric"],
        "origin_ts_s": result["origin_ts_s"],
        "step_s": result["step_s"],
        "horizon": result["horizon"],
        "model": result["model"],
        "last_value": result["last_value"],
    }
    for key in _SERIES:
        if key in result:
            body[key] = result[key]
    body["coverage"] = {lv: c.get("coverage") for lv, c in (result.get("coverage") or {}).items()}
    body["exhaustion"] = exhaustion_payload(result.get("exhaustion"), digits)
    return _round(body, digits)
