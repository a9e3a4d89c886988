"""Failure labels from what devices report: the ground truth a fleet never gets handed.

A real fleet has no failure log; it has telemetry, anomaly episodes and the
status topic. These rules turn that history into failure times (the targets
of the predictive-maintenance model). Each rule yields *evidence*:

    reboot             ``system.uptime`` advanced less than the wall clock between two samples (it
                       restarted), unless a clean
                       ``offline`` status (a planned shutdown) lies in that gap
    offline            an ``offline`` status with clean=False (the last will: the device vanished), or,
                       without status data, a telemetry gap longer than ``max_gap_s`` with no clean
                       offline in it; the failure time is the last sample before the gap
    disk_exhaustion    ``system.diskPercent`` reaches ``exhaustion_pct`` (98 %): the first sample of the run
    memory_exhaustion  ``system.memoryPercent`` reaches ``exhaustion_pct``
    critical_episode   an anomaly episode of peak severity critical lasting >= ``critical_min_s`` (30 min)

Evidence starting within ``merge_s`` (2 h) of the end of the previous piece (an exhaustion run or
an episode lasts) is one incident:
a crash is usually seen as exhaustion, then offline, then a reboot. The
incident's time is its earliest *hard* evidence (reboot, offline, exhaustion)
and, only when there is none, the start of the critical episode; its cause
is that evidence's rule. Planned reboots therefore need status data to be
told apart; without it (telemetry only) every reboot counts as a failure.

Status events live in ``device_status`` (created here through the store's
component migrations); fleet.simulate writes them, and a collector that
stores the status topic with a clean flag would too.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

HARD = ("reboot", "offline", "disk_exhaustion", "memory_exhaustion")
STATUS_MIGRATIONS = [
    """
    CREATE TABLE device_status (
        device_id TEXT NOT NULL, ts_s {real} NOT NULL, status TEXT NOT NULL, clean {int} NOT NULL,
        PRIMARY KEY (device_id, ts_s, status))
    """,
]


@dataclass(frozen=True)
class LabelRules:
    max_gap_s: float | None = None        # default: 3 x the median sample step, at least 900 s
    uptime_slack_s: float = 60.0
    exhaustion_pct: float = 98.0
    critical_min_s: float = 1800.0
    merge_s: float = 2 * 3600.0


@dataclass(frozen=True)
class DerivedFailure:
    device_id: str
    ts_s: float
    cause: str                    # the rule that dated it (see module docstring)
    evidence: tuple[str, ...]     # every rule that fired in the incident


def _clean_offline_in(events: Sequence[Mapping[str, Any]], lo: float, hi: float) -> bool:
    return any(e["kind"] == "offline" and e.get("clean") and lo <= e["ts_s"] <= hi for e in events)


def evidence(ts_s: np.ndarray, values: Mapping[str, np.ndarray], events: Sequence[Mapping[str, Any]] = (),
             rules: LabelRules = LabelRules()) -> list[tuple[float, str, float]]:
    """Every (ts_s, rule, end_ts_s) that fired, time ordered (end: a run's or episode's last time)."""
    ts = np.asarray(ts_s, dtype=np.float64)
    out: list[tuple[float, str, float]] = []
    if len(ts) >= 2:
        dt = np.diff(ts)
        step = float(np.median(dt))
        max_gap = rules.max_gap_s if rules.max_gap_s is not None else max(3 * step, 900.0)
        has_status = any(e["kind"] in ("offline", "online") for e in events)
        up = values.get("system.uptime")
        if up is not None:
            up = np.asarray(up, dtype=np.float64)
            reset = np.flatnonzero(up[1:] + rules.uptime_slack_s < up[:-1] + dt)
            for i in reset:
                if not _clean_offline_in(events, ts[i], ts[i + 1]):
                    out.append((float(ts[i]), "reboot", float(ts[i])))
        if not has_status:
            for i in np.flatnonzero(dt > max_gap):
                out.append((float(ts[i]), "offline", float(ts[i])))
    for e in events:
        if e["kind"] == "offline" and not e.get("clean"):
            out.append((float(e["ts_s"]), "offline", float(e["ts_s"])))
        elif (e["kind"] == "anomaly" and e.get("severity") == "critical" and e.get("end_ts_s") is not None
              and e["end_ts_s"] - e["ts_s"] >= rules.critical_min_s):
            out.append((float(e["ts_s"]), "critical_episode", float(e["end_ts_s"])))
    for metric, rule in (("system.diskPercent", "disk_exhaustion"), ("system.memoryPercent", "memory_exhaustion")):
        v = values.get(metric)
        if v is None or not len(ts):
            continue
        hit = np.nan_to_num(np.asarray(v, dtype=np.float64), nan=0.0) >= rules.exhaustion_pct
        starts = np.flatnonzero(hit & ~np.r_[False, hit[:-1]])
        ends = np.flatnonzero(hit & ~np.r_[hit[1:], False])
        out.extend((float(ts[a]), rule, float(ts[b])) for a, b in zip(starts, ends))
    out.sort()
    return out


def derive_failures(device_id: str, ts_s: np.ndarray, values: Mapping[str, np.ndarray],
                    events: Sequence[Mapping[str, Any]] = (), rules: LabelRules = LabelRules()
                    ) -> list[DerivedFailure]:
    """Incidents (merged evidence) of one device, oldest first."""
    groups: list[list[tuple[float, str, float]]] = []
    group_end = -np.inf
    for item in evidence(ts_s, values, events, rules):
        if groups and item[0] - group_end <= rules.merge_s:
            groups[-1].append(item)
        else:
            groups.append([item])
            group_end = -np.inf
        group_end = max(group_end, item[2])
    out = []
    for g in groups:
        hard = [x for x in g if x[1] in HARD]
        ts, cause, _ = (hard or g)[0]
        out.append(DerivedFailure(device_id, ts, cause, tuple(sorted({x[1] for x in g}))))
    return out


def match(derived: Sequence[DerivedFailure], truth: Sequence[Any], *, before_s: float = 900.0,
          after_s: float = 1800.0) -> dict[str, Any]:
    """Which true failures a derived label falls on: within [onset (or ts) - before_s, ts + after_s]."""
    found, used = [], set()
    for f in truth:
        lo = (f.onset_ts_s if f.onset_ts_s is not None else f.ts_s) - before_s
        hit = None
        for j, d in enumerate(derived):
            if j not in used and d.device_id == f.device_id and lo <= d.ts_s <= f.ts_s + after_s:
                hit = j
                break
        if hit is not None:
            used.add(hit)
        found.append((f, None if hit is None else derived[hit]))
    spurious = [d for j, d in enumerate(derived) if j not in used]
    return {"pairs": found, "spurious": spurious,
            "recall": sum(1 for _, d in found if d is not None) / len(found) if found else float("nan")}


# -- the fleet store ------------------------------------------------------------------------
def ensure_schema(store: Any) -> None:
    store.migrate("status", STATUS_MIGRATIONS)


def record_status(store: Any, rows: Iterable[tuple[str, float, str, bool]]) -> int:
    """(device_id, ts_s, "offline"|"online", clean) rows; duplicates are ignored."""
    ensure_schema(store)
    with store.transaction():
        return store.executemany("INSERT INTO device_status (device_id, ts_s, status, clean) VALUES (?, ?, ?, ?) "
                                 "ON CONFLICT (device_id, ts_s, status) DO NOTHING",
                                 [(d, float(t), s, int(bool(c))) for d, t, s, c in rows])


def events_from_store(store: Any, device_id: str, since_s: float | None = None,
                      until_s: float | None = None) -> list[dict]:
    """Status events and anomaly episodes of a device in the labels' event shape."""
    from fleet.store import iso_to_s

    ensure_schema(store)
    out: list[dict] = []
    for ts, status, clean in store.query("SELECT ts_s, status, clean FROM device_status WHERE device_id = ? "
                                         "ORDER BY ts_s", (device_id,)):
        out.append({"ts_s": float(ts), "kind": str(status), "clean": bool(clean), "severity": None,
                    "end_ts_s": None, "metric": None})
    for ep in store.anomaly_episodes(device_id=device_id):
        start = iso_to_s(ep.get("startedAt"))
        if start is None:
            continue
        out.append({"ts_s": start, "kind": "anomaly", "clean": False, "severity": ep.get("severity"),
                    "end_ts_s": iso_to_s(ep.get("endedAt")), "metric": ep.get("metric")})
    out = [e for e in out if (since_s is None or e["ts_s"] >= since_s) and (until_s is None or e["ts_s"] < until_s)]
    out.sort(key=lambda e: e["ts_s"])
    return out


def history_from_store(store: Any, device_id: str, metrics: Sequence[str] | None = None,
                       since_s: float | None = None, until_s: float | None = None
                       ) -> tuple[np.ndarray, dict[str, np.ndarray], list[dict]]:
    """(ts_s, {metric: array (NaN where absent)}, events) of one device from the fleet store."""
    rows = store.samples(device_id, since_s=since_s, until_s=until_s)
    ts = np.array([r[0] for r in rows], dtype=np.float64)
    names = list(metrics) if metrics is not None else sorted({k for _, v in rows for k in v})
    values = {n: np.array([v.get(n, np.nan) for _, v in rows], dtype=np.float64) for n in names}
    return ts, values, events_from_store(store, device_id, since_s, until_s)
