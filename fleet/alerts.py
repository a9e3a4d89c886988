"""``edge-fleet alerts``: anomaly events across the fleet, listed or followed, from the store.

Listing shows one line per anomaly episode (its latest message: an episode is
opened, maybe updated, then closed, all under one episode id), newest first.
``--follow`` prints every anomaly message as the collector stores it (poll of
the store's arrival sequence), so it needs ``edge-fleet collect`` running.
``--severity warning`` means warning and worse. ``--json``: one JSON array when
listing, one JSON object per line when following.
"""
from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping

from fleet.store import SEVERITIES, Store

SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}


def at_least(severity: str | None) -> list[str] | None:
    if severity is None:
        return None
    if severity not in SEVERITY_RANK:
        raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}, got {severity!r}")
    return [s for s in SEVERITIES if SEVERITY_RANK[s] >= SEVERITY_RANK[severity]]


def _num(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "?" if v is None else str(v)
    return f"{v:.4g}"


def _short_time(text: Any) -> str:
    if not isinstance(text, str):
        return "-"
    return text.replace("T", " ").split(".")[0].rstrip("Z")


def format_alert(doc: Mapping[str, Any]) -> str:
    """One line: start, severity, device, metric=value (expected low..high), detector, state, explanation."""
    value = doc.get("value")
    if isinstance(value, Mapping):
        shown = ", ".join(f"{k}={_num(v)}" for k, v in list(value.items())[:3])
    else:
        shown = f"{doc.get('metric', '?')}={_num(value)}"
    exp = doc.get("expected") or {}
    expected = f" (expected {_num(exp.get('low'))}..{_num(exp.get('high'))})" \
        if isinstance(exp, Mapping) and (exp.get("low") is not None or exp.get("high") is not None) else ""
    state = f"closed {_short_time(doc.get('endedAt'))}" if doc.get("endedAt") else "open"
    version = f" v{doc['modelVersion']}" if doc.get("modelVersion") is not None else ""
    text = (f"{_short_time(doc.get('startedAt'))}  {str(doc.get('severity', '?')):8s} {doc.get('deviceId', '?')}  "
            f"{shown}{expected}  [{doc.get('detector', '?')}{version}, {state}]")
    if doc.get("explanation"):
        text += f"  {doc['explanation']}"
    return text


def list_alerts(store: Store, *, device: str | None = None, severity: str | None = None,
                since_s: float | None = None, limit: int | None = 100) -> list[dict[str, Any]]:
    return store.anomaly_episodes(device, at_least(severity), since_s, limit)


def follow(store: Store, emit: Callable[[dict[str, Any]], None], stop: threading.Event, *,
           device: str | None = None, severity: str | None = None, since_s: float | None = None,
           poll_s: float = 1.0) -> int:
    """Emit anomaly messages as they are stored (those since ``since_s`` first); returns how many."""
    sev = at_least(severity)
    seq = 0 if since_s is not None else store.last_anomaly_seq()
    count = 0
    while True:
        for doc in store.anomaly_messages_after(seq, device, sev, since_s):
            seq = max(seq, int(doc["seq"]))
            emit(doc)
            count += 1
        if stop.wait(poll_s):
            return count


def render(docs: Iterable[Mapping[str, Any]], as_json: bool) -> str:
    docs = list(docs)
    if as_json:
        return json.dumps([_public(d) for d in docs], indent=1)
    if not docs:
        return "no anomaly events"
    return "\n".join(format_alert(d) for d in docs)


def render_one(doc: Mapping[str, Any], as_json: bool) -> str:
    return json.dumps(_public(doc), separators=(",", ":")) if as_json else format_alert(doc)


def _public(doc: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in doc.items() if k != "seq"}
    if isinstance(out.get("received_s"), (int, float)):
        out["receivedAt"] = datetime.fromtimestamp(out.pop("received_s"), tz=timezone.utc).isoformat() \
            .replace("+00:00", "Z")
    return out
