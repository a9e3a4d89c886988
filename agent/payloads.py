"""Outbound message bodies: plain values in, plain dicts out.

Every message carries the same envelope — `messageId` (unique, so receivers
can drop the duplicates that at-least-once delivery produces), `deviceId`,
`kind` and `timestamp` (ISO 8601 UTC, which the origin twin stores as is).
Times inside a body are ISO 8601 strings too, except telemetry rows, whose
first column `ts_s` is epoch seconds to keep batches small.  Keys are
camelCase like the origin's metric names; non-finite floats become null
because JSON has no NaN.
"""
from __future__ import annotations

import json
import math
import uuid
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

# The origin twin's reported-state names; the twin carries these at least.
TWIN_REQUIRED_METRICS = (
    "system.cpuUsage", "system.memoryUsed", "system.memoryTotal", "system.diskUsed",
    "system.diskTotal", "system.uptime", "network.bytesReceived", "network.bytesSent",
)
SEVERITIES = ("normal", "warning", "critical")
MODEL_EVENTS = ("installed", "rejected", "rolled_back", "health_check_failed", "activated")


def new_message_id() -> str:
    return uuid.uuid4().hex


def iso_utc(ts_s: float) -> str:
    return (datetime.fromtimestamp(ts_s, tz=timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"))


def _num(value: Any) -> float | int | None:
    """JSON-safe number: NaN/inf -> None, numpy scalars -> Python."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def envelope(kind: str, device_id: str, ts_s: float, message_id: str | None = None) -> dict:
    return {
        "messageId": message_id or new_message_id(),
        "deviceId": device_id,
        "kind": kind,
        "timestamp": iso_utc(ts_s),
    }


def twin_reported(device_id: str, ts_s: float, metrics: Mapping[str, float], *,
                  health: Mapping[str, Any], models: Sequence[Mapping[str, Any]],
                  agent_version: str, extra: Mapping[str, Any] | None = None,
                  message_id: str | None = None) -> dict:
    """Origin-compatible `{"state": {"reported": {...}}, "timestamp": ...}`.

    Metric keys stay flat and dotted ("system.cpuUsage") because that is how the
    origin twin names them; a required metric missing from the sample is
    reported as null rather than silently left out.
    """
    reported: dict[str, Any] = {name: None for name in TWIN_REQUIRED_METRICS}
    reported.update({name: _num(v) for name, v in metrics.items()})
    reported["health"] = dict(health)
    reported["models"] = [dict(m) for m in models]
    reported["agentVersion"] = agent_version
    reported["lastUpdated"] = iso_utc(ts_s)
    if extra:
        reported.update(extra)
    msg = envelope("twin", device_id, ts_s, message_id)
    msg["state"] = {"reported": reported}
    return msg


def telemetry_batch(device_id: str, ts_s: float,
                    samples: Iterable[tuple[float, Mapping[str, float]]], *,
                    interval_s: float | None = None, metrics: Sequence[str] | None = None,
                    message_id: str | None = None,
                    seq_range: tuple[int, int] | None = None) -> dict:
    """Columnar batch: one header row of names, one row per sample.

    Columnar because a 60-sample batch of ~25 metrics would otherwise repeat
    every name 60 times on a metered uplink.  A metric absent from a sample
    (rates on the first sample) is null.  ``seq_range`` (first, last) are the
    device's sample sequence numbers: consecutive batches chain (the next
    ``firstSeq`` follows the last ``lastSeq``), so a receiver can tell a gap
    from a quiet device.
    """
    rows_in = list(samples)
    if metrics is None:
        names: list[str] = []
        seen: set[str] = set()
        for _, values in rows_in:
            for name in values:
                if name not in seen:
                    seen.add(name)
                    names.append(name)
    else:
        names = list(metrics)
    rows = [[_num(ts)] + [_num(values.get(n)) for n in names] for ts, values in rows_in]
    msg = envelope("telemetry", device_id, ts_s, message_id)
    msg["intervalSeconds"] = _num(interval_s)
    msg["columns"] = ["ts_s"] + names
    msg["rows"] = rows
    if seq_range is not None:
        msg["firstSeq"], msg["lastSeq"] = int(seq_range[0]), int(seq_range[1])
    return msg


def anomaly_event(device_id: str, ts_s: float, *, event_id: str, severity: str,
                  metrics: Sequence[str], value: float | Mapping[str, float],
                  expected_low: float | None, expected_high: float | None,
                  deviation: float | None, detector: str, model_version: int | None,
                  started_ts_s: float, ended_ts_s: float | None = None,
                  score: float | None = None, explanation: str = "",
                  contributions: Mapping[str, float] | None = None,
                  message_id: str | None = None) -> dict:
    """One event per anomaly episode; `id` is the episode id, stable across the
    opening and closing messages, while `messageId` differs per message."""
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, not {severity!r}")
    if not metrics:
        raise ValueError("an anomaly names at least one metric")
    msg = envelope("anomaly", device_id, ts_s, message_id)
    msg.update({
        "id": event_id,
        "severity": severity,
        "metric": metrics[0],
        "metrics": list(metrics),
        "value": ({k: _num(v) for k, v in value.items()} if isinstance(value, Mapping)
                  else _num(value)),
        "expected": {"low": _num(expected_low), "high": _num(expected_high)},
        "deviation": _num(deviation),
        "score": _num(score),
        "detector": detector,
        "modelVersion": model_version,
        "startedAt": iso_utc(started_ts_s),
        "endedAt": None if ended_ts_s is None else iso_utc(ended_ts_s),
        "explanation": explanation,
    })
    if contributions:
        msg["contributions"] = {k: _num(v) for k, v in contributions.items()}
    return msg


def forecast(device_id: str, ts_s: float, *, metric: str, origin_ts_s: float, step_s: float,
             values: Sequence[float], intervals: Mapping[str, tuple[Sequence[float], Sequence[float]]],
             model: str, model_version: int | None = None,
             eta_threshold: float | None = None, eta_ts_s: float | None = None,
             message_id: str | None = None) -> dict:
    """`intervals` maps a coverage label ("80", "95") to (lower, upper) lists
    as long as `values`; `eta` says when the forecast crosses a threshold."""
    n = len(values)
    out_intervals = {}
    for label, (lower, upper) in intervals.items():
        if len(lower) != n or len(upper) != n:
            raise ValueError(f"interval {label!r} length differs from values ({n})")
        out_intervals[str(label)] = {"lower": [_num(v) for v in lower],
                                     "upper": [_num(v) for v in upper]}
    eta = None
    if eta_threshold is not None:
        eta = {"threshold": _num(eta_threshold),
               "at": None if eta_ts_s is None else iso_utc(eta_ts_s),
               "seconds": None if eta_ts_s is None else _num(eta_ts_s - origin_ts_s)}
    msg = envelope("forecast", device_id, ts_s, message_id)
    msg.update({
        "metric": metric,
        "origin": iso_utc(origin_ts_s),
        "stepSeconds": _num(step_s),
        "horizonSteps": n,
        "values": [_num(v) for v in values],
        "intervals": out_intervals,
        "model": model,
        "modelVersion": model_version,
        "eta": eta,
    })
    return msg


def model_event(device_id: str, ts_s: float, *, event: str, model_kind: str,
                version: int | None, previous_version: int | None = None,
                target: str | None = None, reason: str = "",
                message_id: str | None = None) -> dict:
    if event not in MODEL_EVENTS:
        raise ValueError(f"model event must be one of {MODEL_EVENTS}, not {event!r}")
    msg = envelope("model", device_id, ts_s, message_id)
    msg.update({"event": event, "modelKind": model_kind, "version": version,
                "previousVersion": previous_version, "target": target, "reason": reason})
    return msg


def command_response(device_id: str, ts_s: float, *, request_id: str | None, command: str | None,
                     ok: bool, result: Mapping[str, Any] | None = None,
                     error_code: str | None = None, error_message: str | None = None,
                     message_id: str | None = None) -> dict:
    msg = envelope("command_response", device_id, ts_s, message_id)
    msg.update({"id": request_id, "command": command, "ok": ok})
    if ok:
        msg["result"] = dict(result or {})
    else:
        msg["error"] = {"code": error_code or "error", "message": error_message or ""}
    return msg


def _sanitize(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def encode(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON; NaN/inf anywhere become null (strict JSON parsers
    reject NaN, and one bad float must not make a message unsendable)."""
    try:
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False, default=_default)
    except ValueError:
        text = json.dumps(_sanitize(json.loads(json.dumps(payload, default=_default))),
                          separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")
