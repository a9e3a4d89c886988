"""JSON documents for the web page and the static report, read from the agent database.

Every function takes a READ-ONLY sqlite3 connection of the caller's own: the
daemon's store connection belongs to the main loop thread, and WAL lets any
number of readers run beside the writer without blocking it.  Nothing here
writes, caches or keeps state, so the HTTP server, the ``report`` command and
the tests all share one code path.

Downsampling keeps the minimum and the maximum of every time bucket rather
than an average or every n-th row: a one-second CPU spike in a week of 1 Hz
data (604,800 rows) still reaches the chart, where an average would flatten it
and a stride would usually skip it.  It runs in SQLite (one GROUP BY over the
time index for all requested metrics), so a week costs one scan and the
response holds at most ``points`` values per series.  Within a bucket the
minimum is placed at the bucket's first sample time and the maximum at its
last: the envelope is exact, the order of the two inside one bucket (less
than a pixel wide) is not kept.
"""
from __future__ import annotations

import json
import math
import sqlite3
from typing import Any, Iterable, Sequence

from agent.status import has_table, open_readonly  # noqa: F401  (webdata.open_readonly is the web's entry)
from agent.store import quote_ident

MAX_POINTS = 2000
MIN_POINTS = 10
DEFAULT_RANGE_S = 6 * 3600.0

# Cumulative counters and constants are never charted: a counter is a ramp with no information
# the rate beside it lacks, and a total is a flat line.
COUNTER_METRICS = frozenset({"disk.readBytes", "disk.writeBytes", "network.bytesReceived", "network.bytesSent",
                             "system.uptime"})
PREFERRED_ORDER = ("system.cpuUsage", "system.memoryPercent", "system.diskPercent", "system.load1",
                   "network.bytesReceivedPerSec", "network.bytesSentPerSec", "disk.readBytesPerSec",
                   "disk.writeBytesPerSec", "system.swapPercent", "system.temperature", "system.processCount")


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def clamp_points(points: int | None, max_points: int = MAX_POINTS) -> int:
    if points is None:
        return max_points
    return max(MIN_POINTS, min(int(points), max_points))


# -- metrics --------------------------------------------------------------------------------
def metric_names(conn: sqlite3.Connection) -> list[str]:
    if not has_table(conn, "samples"):
        return []
    return [r[1] for r in conn.execute("PRAGMA table_info(samples)") if r[1] not in ("seq", "ts_s")]


def chart_metrics(names: Iterable[str]) -> list[str]:
    """The metrics worth a chart: no counters, no totals, no byte counts that have a percentage."""
    names = list(dict.fromkeys(names))
    have = set(names)
    keep = []
    for n in names:
        base, _, mount = n.partition(":")
        if n in COUNTER_METRICS or base.endswith("Total"):
            continue
        if base.endswith("Used") and (base[: -len("Used")] + "Percent" + (":" + mount if mount else "")) in have:
            continue
        keep.append(n)
    rank = {n: i for i, n in enumerate(PREFERRED_ORDER)}
    return sorted(keep, key=lambda n: (rank.get(n, len(rank)), n))


def sample_range(conn: sqlite3.Connection) -> dict[str, Any]:
    if not has_table(conn, "samples"):
        return {"count": 0, "oldest": None, "newest": None}
    count, oldest, newest = conn.execute("SELECT count(*), min(ts_s), max(ts_s) FROM samples").fetchone()
    return {"count": count, "oldest": oldest, "newest": newest}


def meta(conn: sqlite3.Connection, device_id: str) -> dict[str, Any]:
    """What the page needs before it asks for data: which charts, which time span exists."""
    names = metric_names(conn)
    return {"device_id": device_id, "metrics": chart_metrics(names), "all_metrics": names,
            "samples": sample_range(conn), "max_points": MAX_POINTS}


def resolve_range(conn: sqlite3.Connection, since_s: float | None, until_s: float | None,
                  default_range_s: float = DEFAULT_RANGE_S) -> tuple[float | None, float | None]:
    """Missing ends default to the newest sample and ``default_range_s`` before it.

    Anchored at the newest sample, not the wall clock, so a device whose agent
    stopped (or a replayed database) still shows its last hours.
    """
    if until_s is None:
        until_s = sample_range(conn)["newest"]
    if since_s is None and until_s is not None:
        since_s = until_s - default_range_s
    return since_s, until_s


# -- series -----------------------------------------------------------------------------------
def series(conn: sqlite3.Connection, metrics: Sequence[str] | None, since_s: float | None = None,
           until_s: float | None = None, points: int | None = None, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """Aligned series ``{"t": [...], "series": {metric: [...]}}``, at most ``points`` values each.

    ``None`` in a series is a gap (no sample, or the metric was absent).  Unknown
    metric names are left out and listed under ``unknown``.
    """
    points = clamp_points(points, max_points)
    known = metric_names(conn)
    wanted = list(metrics) if metrics else chart_metrics(known)
    names = [m for m in wanted if m in known]
    since_s, until_s = resolve_range(conn, since_s, until_s)
    doc: dict[str, Any] = {"since": since_s, "until": until_s, "points": points, "rows": 0, "bucket_s": None,
                           "downsampled": False, "t": [], "series": {m: [] for m in names},
                           "unknown": [m for m in wanted if m not in known]}
    if since_s is None or until_s is None or not names:
        return doc
    rows = conn.execute("SELECT count(*) FROM samples WHERE ts_s >= ? AND ts_s <= ?", (since_s, until_s)).fetchone()[0]
    doc["rows"] = rows
    cols = [quote_ident(m) for m in names]
    if rows <= points:
        t, values = [], [[] for _ in names]
        sql = f"SELECT ts_s, {', '.join(cols)} FROM samples WHERE ts_s >= ? AND ts_s <= ? ORDER BY ts_s"
        for row in conn.execute(sql, (since_s, until_s)):
            t.append(row[0])
            for i, v in enumerate(row[1:]):
                values[i].append(_finite(v))
    else:
        buckets = max(1, points // 2)
        # a hair wider than span / buckets, so a sample at exactly ``until`` falls in the last bucket
        width = max((until_s - since_s) / buckets * (1 + 1e-9), 1e-9)
        aggs = ", ".join(f"min({c}), max({c})" for c in cols)
        sql = (f"SELECT CAST((ts_s - ?) / ? AS INTEGER) AS b, min(ts_s), max(ts_s), {aggs} FROM samples "
               "WHERE ts_s >= ? AND ts_s <= ? GROUP BY b ORDER BY b")
        t, values = [], [[] for _ in names]
        for row in conn.execute(sql, (since_s, width, since_s, until_s)):
            t_first, t_last = row[1], row[2]
            t.append(t_first)
            if t_last != t_first:
                t.append(t_last)
            for i in range(len(names)):
                lo, hi = _finite(row[3 + 2 * i]), _finite(row[4 + 2 * i])
                values[i].append(lo)
                if t_last != t_first:
                    values[i].append(hi)
        doc["bucket_s"] = width
        doc["downsampled"] = True
    doc["t"] = t
    doc["series"] = dict(zip(names, values))
    return doc


# -- forecasts -------------------------------------------------------------------------------
def forecast(conn: sqlite3.Connection, metric: str | None = None, until_s: float | None = None) -> dict[str, Any]:
    """The latest forecast run per metric (made at or before ``until_s``), with its bands and ETA."""
    if not (has_table(conn, "forecast_runs") and has_table(conn, "forecasts")):
        return {"forecasts": []}
    where, args = [], []
    if metric:
        where.append("metric = ?")
        args.append(metric)
    if until_s is not None:
        where.append("made_at <= ?")
        args.append(until_s)
    cond = (" WHERE " + " AND ".join(where)) if where else ""
    runs = conn.execute(
        "SELECT r.made_at, r.metric, r.model, r.version, r.step_s, r.limit_value, r.eta_s, r.eta_lower_s, "
        f"r.eta_upper_s FROM forecast_runs r JOIN (SELECT metric AS m, max(made_at) AS latest FROM forecast_runs{cond} "
        "GROUP BY metric) l ON r.metric = l.m AND r.made_at = l.latest ORDER BY r.metric", args).fetchall()
    scores: dict[tuple[str, str], dict[str, Any]] = {}
    if has_table(conn, "forecast_scores"):
        for m, model, n, mae, mase, c80, c95, upd in conn.execute(
                "SELECT metric, model, n, mae, mase, coverage_80, coverage_95, updated_at FROM forecast_scores"):
            scores[(m, model)] = {"n": n, "mae": _finite(mae), "mase": _finite(mase), "coverage_80": _finite(c80),
                                  "coverage_95": _finite(c95), "updated_at": upd}
    out = []
    for made_at, m, model, version, step_s, limit_value, eta_s, eta_lo, eta_hi in runs:
        doc: dict[str, Any] = {"metric": m, "made_at": made_at, "model": model, "version": version,
                               "step_s": step_s, "limit_value": _finite(limit_value), "eta_s": _finite(eta_s),
                               "eta_lower_s": _finite(eta_lo), "eta_upper_s": _finite(eta_hi),
                               "score": scores.get((m, model)),
                               "t": [], "value": [], "lower_80": [], "upper_80": [], "lower_95": [], "upper_95": []}
        for row in conn.execute("SELECT ts_s, value, lower_80, upper_80, lower_95, upper_95 FROM forecasts "
                                "WHERE made_at = ? AND metric = ? ORDER BY step", (made_at, m)):
            doc["t"].append(row[0])
            for key, v in zip(("value", "lower_80", "upper_80", "lower_95", "upper_95"), row[1:]):
                doc[key].append(_finite(v))
        out.append(doc)
    return {"forecasts": out}


# -- events ----------------------------------------------------------------------------------
def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _explain_text(e: Any) -> str:
    """{"feature", "value", "z", "expected_low", "expected_high"} -> 'cpu = 99 (expected 7.1 .. 12.9, z +41.3)'."""
    if not isinstance(e, dict):
        return str(e)
    if "limit" in e and "eta_s" in e:  # an exhaustion warning: {metric, limit, value, eta_s, eta_lower_s, ...}
        text = f"{e.get('metric', '?')} = {_num(e.get('value'))}, reaches {_num(e.get('limit'))}"
        if isinstance(e.get("eta_s"), (int, float)):
            text += f" in {e['eta_s'] / 3600:.1f} h"
        return text
    text = f"{e.get('feature', '?')} = {_num(e.get('value'))}"
    if e.get("expected_low") is not None or e.get("expected_high") is not None:
        text += f" (expected {_num(e.get('expected_low'))} .. {_num(e.get('expected_high'))}"
        text += f", z {e['z']:+.1f})" if isinstance(e.get("z"), (int, float)) else ")"
    return text


def event_view(kind: str, severity: str | None, state: str | None, started: float | None, ended: float | None,
                detector: str | None, model_version: int | None, doc: dict[str, Any]) -> dict[str, Any]:
    """One event in the shape the page draws (the same for device and fleet)."""
    features = [str(f) for f in doc.get("features") or doc.get("metrics") or ()]
    if not features and isinstance(doc.get("metric"), str):
        features = [doc["metric"]]
    explanation = doc.get("explanation")
    if isinstance(explanation, list):  # the detector's structured explanation: [{feature, value, low, high, z}]
        explanation = "; ".join(_explain_text(e) for e in explanation[:3])
    return {"id": str(doc.get("id", "")), "kind": kind, "severity": severity, "state": state,
            "start_s": _finite(started), "end_s": _finite(ended), "detector": detector,
            "model_version": model_version,
            "features": list(dict.fromkeys(f.split("|", 1)[0] for f in features)),
            "explanation": explanation if isinstance(explanation, str) else None,
            "score": _finite(doc.get("peak_score", doc.get("score")))
            if isinstance(doc.get("peak_score", doc.get("score")), (int, float)) else None,
            "message": doc.get("message") if isinstance(doc.get("message"), str) else None}


def events(conn: sqlite3.Connection, since_s: float | None = None, until_s: float | None = None,
           kind: str | None = None, limit: int = 500) -> dict[str, Any]:
    """Events overlapping [since, until], oldest first (open episodes overlap everything after their start)."""
    if not has_table(conn, "events"):
        return {"events": [], "by_severity": {}}
    where, args = [], []
    if since_s is not None:
        where.append("(state = 'open' OR coalesce(ended_at, updated_at, started_at) >= ?)")
        args.append(since_s)
    if until_s is not None:
        where.append("coalesce(started_at, updated_at) <= ?")
        args.append(until_s)
    if kind:
        where.append("kind = ?")
        args.append(kind)
    cond = (" WHERE " + " AND ".join(where)) if where else ""
    rows = conn.execute(
        "SELECT kind, severity, state, started_at, ended_at, detector, model_version, doc FROM "
        f"(SELECT * FROM events{cond} ORDER BY coalesce(started_at, updated_at) DESC LIMIT ?) "
        "ORDER BY coalesce(started_at, updated_at)", (*args, int(limit))).fetchall()
    out = []
    for kind_, severity, state, started, ended, detector, version, doc in rows:
        try:
            parsed = json.loads(doc)
        except ValueError:
            parsed = {}
        out.append(event_view(kind_, severity, state, started, ended, detector, version, parsed))
    by_severity: dict[str, int] = {}
    for e in out:
        if e["kind"] == "anomaly":
            by_severity[str(e["severity"])] = by_severity.get(str(e["severity"]), 0) + 1
    return {"events": out, "by_severity": by_severity}


# -- status ----------------------------------------------------------------------------------
def status(config: Any, now_s: float) -> dict[str, Any]:
    """The ``edge-agent status --json`` document (same readers, same health verdict)."""
    from agent import health
    from agent import status as status_mod
    from agent.daemon import health_params

    doc = status_mod.collect(config, now_s)
    problems = health.evaluate(doc, now_s, health_params(config), interval_s=config.agent.interval_s)
    doc["health"] = {"ok": not problems, "problems": [{"code": p.code, "message": p.message} for p in problems]}
    doc.pop("config", None)  # the file path is nobody's business on a web page
    doc.pop("database", None)
    return doc


def bundle(conn: sqlite3.Connection, config: Any, now_s: float, since_s: float | None, until_s: float | None,
           points: int = MAX_POINTS) -> dict[str, Any]:
    """Everything one view needs, for the static report (the page asks endpoint by endpoint instead)."""
    since_s, until_s = resolve_range(conn, since_s, until_s)
    info = meta(conn, config.device_id)
    return {"meta": info, "series": series(conn, info["metrics"], since_s, until_s, points),
            "forecast": forecast(conn, until_s=until_s), "events": events(conn, since_s, until_s),
            "status": status(config, now_s), "generated_at": now_s}
