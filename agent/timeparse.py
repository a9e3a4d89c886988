"""Time arguments people type: ISO 8601, epoch seconds, or an age such as ``24h``."""
from __future__ import annotations

import re
from datetime import datetime, timezone

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration_s(text: str) -> float:
    """'90s', '15m', '24h', '7d', '2w' -> seconds."""
    match = _AGE.match(text)
    if not match:
        raise ValueError(f"expected a duration such as 30s, 15m, 24h or 7d, got {text!r}")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def parse_timestamp_s(text: str) -> float:
    """ISO 8601 (naive means UTC) or epoch seconds -> epoch seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected ISO 8601 or epoch seconds, got {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def parse_time_arg(text: str, now_s: float) -> float:
    """An absolute time, or an age counted back from ``now_s``."""
    if _AGE.match(text):
        return now_s - parse_duration_s(text)
    return parse_timestamp_s(text)


def iso_utc(ts_s: float) -> str:
    return datetime.fromtimestamp(ts_s, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
