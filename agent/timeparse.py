"""Time arguments people type: ISO 8601, epoch seconds, or an age such as ``24h``.

Every parser returns a finite time within datetime's years 1..9999 or raises
ValueError naming the text: ``float("1e400")`` is infinity, which no JSON
encoder, SQLite comparison or date formatter downstream should ever see (the
web API answered such a ``since`` with a 500).
"""
from __future__ import annotations

import math
import re
from datetime import datetime, timezone

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
MIN_TIME_S = datetime(1, 1, 1, tzinfo=timezone.utc).timestamp()
MAX_TIME_S = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()


def _in_range(value_s: float, text: str) -> float:
    if not math.isfinite(value_s) or not MIN_TIME_S <= value_s <= MAX_TIME_S:
        raise ValueError(f"time {text!r} is out of range (years 1 to 9999)")
    return value_s


def parse_duration_s(text: str) -> float:
    """'90s', '15m', '24h', '7d', '2w' -> seconds."""
    match = _AGE.match(text)
    if not match:
        raise ValueError(f"expected a duration such as 30s, 15m, 24h or 7d, got {text!r}")
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if not math.isfinite(seconds) or seconds > MAX_TIME_S - MIN_TIME_S:
        raise ValueError(f"duration {text!r} is out of range")
    return seconds


def parse_timestamp_s(text: str) -> float:
    """ISO 8601 (naive means UTC) or epoch seconds -> epoch seconds."""
    text = text.strip()
    try:
        epoch_s = float(text)
    except ValueError:
        pass
    else:
        return _in_range(epoch_s, text)  # refuses 'nan', 'inf' and '1e400' (which float makes inf)
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
        return _in_range(now_s - parse_duration_s(text), text)
    return parse_timestamp_s(text)


def iso_utc(ts_s: float) -> str:
    return datetime.fromtimestamp(ts_s, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
