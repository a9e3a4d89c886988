"""``edge-fleet serve``: the fleet page, and each device's charts from the fleet store.

The fleet page lists every device the collector has heard from: online or
offline (heard from within ``offline_after_s``: devices send telemetry and twin
state every minute), last seen, open anomaly episodes by severity, the failure
risk (``failureRisk24h``) and cluster deviation (``clusterDistance`` against
``clusterRadius``) from the reported twin where a device reports them, and its
model versions.  A device's page is the device page itself (agent/static:
index.html and app.js, the same chart code) fed from the fleet store through
the same JSON shapes as the device's own endpoints, under
``/api/devices/<id>/``.

The HTTP server, access control and exposure rules are the device's
(agent/web.py): loopback by default, token or basic auth required beyond it.
Each request opens its own store connection, so the collector keeps writing.
Samples are stored as one JSON document per row; downsampling runs in the
database (``json_extract`` on SQLite, ``->>`` on PostgreSQL) with the same
per-bucket minimum and maximum as on the device.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
import urllib.parse
from typing import Any, Callable, Mapping

from agent import webdata
from agent.web import (BadRequest, HttpService, Response, WebParams, error, json_response, page_response,
                       query_float, query_int, query_list, static_response)
from fleet.store import SEVERITIES, Store, iso_to_s

log = logging.getLogger(__name__)

DEFAULT_PORT = 9851


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def failure_risk(reported: Mapping[str, Any]) -> float | None:
    """``failureRisk24h`` as a probability: a number, or {"probability"|"risk"|"value": number}."""
    v = reported.get("failureRisk24h")
    if isinstance(v, Mapping):
        v = next((v[k] for k in ("probability", "risk", "value") if k in v), None)
    return _num(v)


def cluster_deviation(reported: Mapping[str, Any]) -> dict[str, Any] | None:
    distance, radius = _num(reported.get("clusterDistance")), _num(reported.get("clusterRadius"))
    if distance is None:
        return None
    ratio = distance / radius if radius else None
    return {"distance": distance, "radius": radius, "ratio": ratio,
            "cluster": reported.get("cluster", reported.get("clusterId"))}


def _models(reported: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for m in reported.get("models") or ():
        if isinstance(m, Mapping) and "kind" in m:
            out.append({k: m.get(k) for k in ("kind", "version", "target", "health") if m.get(k) is not None})
    return out


# -- fleet summary ---------------------------------------------------------------------------
def fleet_summary(store: Store, now_s: float, offline_after_s: float) -> dict[str, Any]:
    twins = store.twins()
    episodes = store.anomaly_episodes(limit=5000)
    open_by_device: dict[str, dict[str, int]] = {}
    for ep in episodes:
        if not ep.get("endedAt"):
            sev = str(ep.get("severity"))
            counts = open_by_device.setdefault(str(ep.get("deviceId")), {})
            counts[sev] = counts.get(sev, 0) + 1
    devices = []
    for d in store.devices():
        reported = twins.get(d["device_id"], {})
        devices.append({
            "device_id": d["device_id"], "last_seen_s": d["last_seen_s"], "first_seen_s": d["first_seen_s"],
            "online": now_s - d["last_seen_s"] <= offline_after_s, "samples": d["samples"],
            "open_alerts": open_by_device.get(d["device_id"], {}),
            "failure_risk_24h": failure_risk(reported), "cluster": cluster_deviation(reported),
            "models": _models(reported), "agent_version": reported.get("agentVersion"),
            "health": (reported.get("health") or {}).get("status") if isinstance(reported.get("health"), Mapping) else None,
        })
    totals = {s: sum(d["open_alerts"].get(s, 0) for d in devices) for s in SEVERITIES if s != "normal"}
    recent = [webdata.event_view("anomaly", e.get("severity"), "closed" if e.get("endedAt") else "open",
                                 iso_to_s(e.get("startedAt")), iso_to_s(e.get("endedAt")), e.get("detector"),
                                 e.get("modelVersion"), e) | {"device_id": e.get("deviceId")}
              for e in episodes[:30]]
    return {"now": now_s, "offline_after_s": offline_after_s, "devices": devices, "open_alerts": totals,
            "online": sum(d["online"] for d in devices), "recent_alerts": recent}


# -- one device, in the device page's shapes ------------------------------------------------------
def device_metric_names(store: Store, device_id: str) -> list[str]:
    names: dict[str, None] = {}
    for _, values in store.samples(device_id, limit=50):
        names.update(dict.fromkeys(values))
    return list(names)


def device_meta(store: Store, device_id: str, max_points: int) -> dict[str, Any]:
    count, oldest, newest = store.sample_range(device_id)
    names = device_metric_names(store, device_id)
    return {"device_id": device_id, "metrics": webdata.chart_metrics(names), "all_metrics": names,
            "samples": {"count": count, "oldest": oldest, "newest": newest}, "max_points": max_points}


def _json_value(store: Store, column: str = "metrics") -> str:
    return f"CAST(({column}->>?) AS DOUBLE PRECISION)" if store.is_postgres else f"json_extract({column}, ?)"


def _json_path(store: Store, name: str) -> str:
    return name if store.is_postgres else '$."' + name.replace('"', '\\"') + '"'


def device_series(store: Store, device_id: str, metrics: list[str] | None, since_s: float | None,
                  until_s: float | None, points: int | None, max_points: int) -> dict[str, Any]:
    points = webdata.clamp_points(points, max_points)
    known = device_metric_names(store, device_id)
    wanted = metrics or webdata.chart_metrics(known)
    names = [m for m in wanted if m in known]
    _, _, newest = store.sample_range(device_id)
    until_s = newest if until_s is None else until_s
    if since_s is None and until_s is not None:
        since_s = until_s - webdata.DEFAULT_RANGE_S
    doc: dict[str, Any] = {"since": since_s, "until": until_s, "points": points, "rows": 0, "bucket_s": None,
                           "downsampled": False, "t": [], "series": {m: [] for m in names},
                           "unknown": [m for m in wanted if m not in known]}
    if since_s is None or until_s is None or not names:
        return doc
    rows = int(store.one("SELECT COUNT(*) FROM samples WHERE device_id = ? AND ts_s >= ? AND ts_s <= ?",
                         (device_id, since_s, until_s))[0])
    doc["rows"] = rows
    t: list[float] = []
    values: list[list[float | None]] = [[] for _ in names]
    if rows <= points:
        for ts, raw in store.query("SELECT ts_s, metrics FROM samples WHERE device_id = ? AND ts_s >= ? AND ts_s <= ? "
                                   "ORDER BY ts_s", (device_id, since_s, until_s)):
            sample = store.unjson(raw)
            t.append(float(ts))
            for i, n in enumerate(names):
                values[i].append(webdata._finite(sample.get(n)) if isinstance(sample.get(n), (int, float)) else None)
    else:
        width = max((until_s - since_s) / max(1, points // 2) * (1 + 1e-9), 1e-9)  # until in the last bucket
        expr = _json_value(store)
        aggs = ", ".join(f"MIN({expr}), MAX({expr})" for _ in names)
        params: list[Any] = [since_s, width]
        for n in names:
            params += [_json_path(store, n), _json_path(store, n)]
        params += [device_id, since_s, until_s]
        sql = (f"SELECT CAST(FLOOR((ts_s - ?) / ?) AS INTEGER) AS b, MIN(ts_s), MAX(ts_s), {aggs} FROM samples "
               "WHERE device_id = ? AND ts_s >= ? AND ts_s <= ? GROUP BY b ORDER BY b") if store.is_postgres else (
               f"SELECT CAST((ts_s - ?) / ? AS INTEGER) AS b, MIN(ts_s), MAX(ts_s), {aggs} FROM samples "
               "WHERE device_id = ? AND ts_s >= ? AND ts_s <= ? GROUP BY b ORDER BY b")
        for row in store.query(sql, params):
            t_first, t_last = float(row[1]), float(row[2])
            t.append(t_first)
            if t_last != t_first:
                t.append(t_last)
            for i in range(len(names)):
                lo, hi = row[3 + 2 * i], row[4 + 2 * i]
                values[i].append(webdata._finite(lo))
                if t_last != t_first:
                    values[i].append(webdata._finite(hi))
        doc["bucket_s"] = width
        doc["downsampled"] = True
    doc["t"] = t
    doc["series"] = dict(zip(names, values))
    return doc


def forecast_view(doc: Mapping[str, Any]) -> dict[str, Any] | None:
    """A forecast message (README "Forecast") -> the device page's forecast shape."""
    origin, step_s = iso_to_s(doc.get("origin")), _num(doc.get("stepSeconds"))
    values = doc.get("values") or []
    if origin is None or not step_s or not isinstance(values, list):
        return None
    intervals = doc.get("intervals") or {}

    def band(level: str, side: str) -> list[float | None]:
        arr = (intervals.get(level) or {}).get(side) or [None] * len(values)
        return [_num(v) for v in arr]

    eta = doc.get("eta") if isinstance(doc.get("eta"), Mapping) else {}
    return {"metric": doc.get("metric"), "made_at": origin, "model": doc.get("model"),
            "version": doc.get("modelVersion"), "step_s": step_s, "limit_value": _num(eta.get("threshold")),
            "eta_s": _num(eta.get("seconds")), "eta_lower_s": _num(eta.get("lowerSeconds", eta.get("lower_s"))),
            "eta_upper_s": _num(eta.get("upperSeconds", eta.get("upper_s"))), "score": None,
            "t": [origin + (k + 1) * step_s for k in range(len(values))], "value": [_num(v) for v in values],
            "lower_80": band("80", "lower"), "upper_80": band("80", "upper"),
            "lower_95": band("95", "lower"), "upper_95": band("95", "upper")}


def device_forecast(store: Store, device_id: str, until_s: float | None) -> dict[str, Any]:
    latest: dict[str, dict[str, Any]] = {}
    for doc in store.forecasts(device_id):
        view = forecast_view(doc)
        if view is None or (until_s is not None and view["made_at"] > until_s):
            continue
        latest[str(view["metric"])] = view  # ordered by origin: the last one wins
    return {"forecasts": [latest[m] for m in sorted(latest)]}


def device_events(store: Store, device_id: str, since_s: float | None, until_s: float | None) -> dict[str, Any]:
    out = []
    for e in reversed(store.anomaly_episodes(device_id, since_s=since_s, limit=500)):
        start = iso_to_s(e.get("startedAt"))
        if until_s is not None and start is not None and start > until_s:
            continue
        out.append(webdata.event_view("anomaly", e.get("severity"), "closed" if e.get("endedAt") else "open", start,
                                      iso_to_s(e.get("endedAt")), e.get("detector"), e.get("modelVersion"), e))
    by_severity: dict[str, int] = {}
    for e in out:
        by_severity[str(e["severity"])] = by_severity.get(str(e["severity"]), 0) + 1
    return {"events": out, "by_severity": by_severity}


def device_status(store: Store, device_id: str, now_s: float, offline_after_s: float) -> dict[str, Any]:
    seen = store.one("SELECT last_seen_s FROM devices WHERE device_id = ?", (device_id,))
    reported = store.twin(device_id) or {}
    count, oldest, newest = store.sample_range(device_id)
    extra = []
    risk = failure_risk(reported)
    if risk is not None:
        extra.append(["failure risk 24 h", f"{risk * 100:.0f} %"])
    cluster = cluster_deviation(reported)
    if cluster is not None:
        extra.append(["cluster deviation", f"{cluster['distance']:.3g}" +
                      (f" of radius {cluster['radius']:.3g}" if cluster["radius"] else "")])
    health = reported.get("health") if isinstance(reported.get("health"), Mapping) else None
    doc: dict[str, Any] = {"device_id": device_id, "online": bool(seen) and now_s - seen[0] <= offline_after_s,
                           "last_seen_s": seen[0] if seen else None, "models": _models(reported),
                           "agent_version": reported.get("agentVersion"),
                           "samples": {"count": count, "oldest": oldest, "newest": newest}, "extra": extra}
    if health is not None:
        doc["health"] = {"ok": health.get("status") == "healthy",
                         "problems": [p if isinstance(p, Mapping) else {"message": str(p)}
                                      for p in health.get("problems") or ()]}
    return doc


class FleetApp:
    def __init__(self, open_store: Callable[[], Store], clock: Callable[[], float] = time.time,
                 offline_after_s: float = 180.0, max_points: int = webdata.MAX_POINTS) -> None:
        self.open_store = open_store
        self.clock = clock
        self.offline_after_s = offline_after_s
        self.max_points = max_points

    def __call__(self, path: str, query: Mapping[str, list[str]]) -> Response:
        if path in ("/", "/index.html"):
            return page_response("fleet.html")
        if path.startswith("/devices/"):
            return page_response("index.html")
        if path.startswith("/static/"):
            return static_response(path[len("/static/"):])
        if path == "/api/fleet":
            with self.open_store() as store:
                return json_response(fleet_summary(store, self.clock(), self.offline_after_s))
        if path.startswith("/api/devices/"):
            device, _, name = path[len("/api/devices/"):].partition("/")
            return self.device_api(urllib.parse.unquote(device), name, query)
        return error(404, "not found")

    def device_api(self, device_id: str, name: str, query: Mapping[str, list[str]]) -> Response:
        now = self.clock()
        with self.open_store() as store:
            if store.one("SELECT 1 FROM devices WHERE device_id = ?", (device_id,)) is None:
                return error(404, f"unknown device {device_id!r}")
            since, until = query_float(query, "since", now), query_float(query, "until", now)
            if name == "meta":
                return json_response(device_meta(store, device_id, self.max_points))
            if name == "status":
                return json_response(device_status(store, device_id, now, self.offline_after_s))
            if name == "series":
                return json_response(device_series(store, device_id, query_list(query, "metrics", "metric"), since,
                                                   until, query_int(query, "points"), self.max_points))
            if name == "forecast":
                return json_response(device_forecast(store, device_id, until))
            if name == "events":
                return json_response(device_events(store, device_id, since, until))
        raise BadRequest(f"no endpoint {name!r}")


# -- command ---------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from fleet.config import load_config
    from fleet.store import open_store

    config = load_config(args.config)
    url, timeout_s = config.store_url, config.store.busy_timeout_s
    open_store(url, timeout_s).close()  # fail now, on one line, if the store cannot be opened
    params = WebParams(enabled=True, bind=args.bind, port=args.port,
                       token=args.token or os.environ.get("EDGE_FLEET_SERVE_TOKEN", ""),
                       basic_user=args.basic_user or "",
                       basic_password=os.environ.get("EDGE_FLEET_SERVE_PASSWORD", "") if args.basic_user else "",
                       allow_unauthenticated=args.allow_unauthenticated, max_points=args.max_points)
    app = FleetApp(lambda: open_store(url, timeout_s), offline_after_s=args.offline_after_s,
                   max_points=args.max_points)
    service = HttpService(params, app, name="fleet")
    service.start()
    print(f"fleet page on {service.url}" + (" (authentication required)" if params.has_auth else ""), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    service.stop()
    return 0


def register(subparsers: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    from fleet.commands import _guard

    p = subparsers.add_parser("serve", help="serve the fleet page: devices, alerts, risk, models, each device's charts")
    p.add_argument("--bind", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"listen port (default: {DEFAULT_PORT})")
    p.add_argument("--token", help="access token (default: $EDGE_FLEET_SERVE_TOKEN); required beyond loopback "
                   "unless basic auth is set")
    p.add_argument("--basic-user", help="HTTP basic auth user; the password comes from $EDGE_FLEET_SERVE_PASSWORD")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve beyond loopback without any credential (behind a firewall you trust)")
    p.add_argument("--offline-after-s", type=float, default=180.0, metavar="S",
                   help="a device not heard from for this long is offline (default: 180)")
    p.add_argument("--max-points", type=int, default=webdata.MAX_POINTS, help="values per chart at most")
    return {"serve": _guard("serve", cmd_serve)}
