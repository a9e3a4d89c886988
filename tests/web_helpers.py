"""Real agent databases for the web tests and the screenshot tool: samples, events, forecasts.

The forecast tables are created with the schema documented in the helpers'
contracts (agent/forecasting.py owns them on a device); the rows are a real
forecast computed here (a linear trend with widening intervals), not canned
numbers.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from agent import config as config_mod
from agent.events import EventLog
from agent.sampling import Sample
from agent.store import Store, migrate, quote_ident
from agent.timeparse import iso_utc

FORECAST_MIGRATIONS = [
    """
    CREATE TABLE forecasts (made_at REAL, metric TEXT, step INTEGER, ts_s REAL, value REAL, lower_80 REAL,
        upper_80 REAL, lower_95 REAL, upper_95 REAL, model TEXT, version INTEGER, PRIMARY KEY (made_at, metric, step));
    CREATE TABLE forecast_runs (made_at REAL, metric TEXT, model TEXT, version INTEGER, step_s REAL,
        limit_value REAL, eta_s REAL, eta_lower_s REAL, eta_upper_s REAL, PRIMARY KEY (made_at, metric));
    CREATE TABLE forecast_scores (metric TEXT, model TEXT, n INTEGER, mae REAL, mase REAL, coverage_80 REAL,
        coverage_95 REAL, updated_at REAL, PRIMARY KEY (metric, model))
    """,
]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def agent_config(state_dir: Path, device_id: str = "dev-1", **sections: dict[str, Any]):
    data = {"agent": {"state_dir": str(state_dir), "device_id": device_id}, "mqtt": {"enabled": False}}
    data.update(sections)
    return config_mod.parse(data, environ={}, source="test")


def synthetic_metrics(n: int, start_s: float, interval_s: float = 1.0, seed: int = 7) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A day-shaped CPU, a slowly filling disk, memory, load and a network rate."""
    rng = np.random.default_rng(seed)
    t = start_s + np.arange(n) * interval_s
    day = np.sin(2 * math.pi * (t % 86400) / 86400)
    cpu = np.clip(20 + 10 * day + rng.normal(0, 3, n), 0, 100)
    disk = 40 + 30 * np.arange(n) / max(n, 1) + rng.normal(0, 0.05, n)
    mem = np.clip(55 + 5 * day + rng.normal(0, 1, n), 0, 100)
    load = np.clip(0.5 + 0.3 * day + rng.normal(0, 0.05, n), 0, None)
    net = np.abs(2e5 + 5e4 * day + rng.normal(0, 2e4, n))
    return t, {"system.cpuUsage": cpu, "system.diskPercent": disk, "system.memoryPercent": mem,
               "system.load1": load, "network.bytesReceivedPerSec": net,
               "network.bytesReceived": np.cumsum(net), "system.memoryTotal": np.full(n, 4e9)}


def write_samples(db: Path, t: np.ndarray, cols: dict[str, np.ndarray]) -> None:
    """Through the real Store for its schema, then one executemany for speed (a week is 604,800 rows)."""
    store = Store(db)
    store.add_sample(Sample(ts_s=float(t[0]), values={k: float(v[0]) for k, v in cols.items()}))
    store.flush()
    store.close()
    conn = sqlite3.connect(db, isolation_level=None)
    names = list(cols)
    sql = f"INSERT INTO samples (ts_s, {', '.join(map(quote_ident, names))}) VALUES ({', '.join('?' * (len(names) + 1))})"
    conn.execute("BEGIN")
    conn.executemany(sql, zip(t[1:].tolist(), *(cols[n][1:].tolist() for n in names)))
    conn.execute("COMMIT")
    conn.close()


def spike(cols: dict[str, np.ndarray], metric: str, lo: int, hi: int, value: float) -> None:
    cols[metric][lo:hi] = value


def record_episode(db: Path, start_s: float, end_s: float | None, severity: str, features: Sequence[str],
                   kind: str = "anomaly", score: float = 7.5) -> str:
    """An anomaly event as models/episodes.py makes it, stored through the real EventLog."""
    store = Store(db)
    log = EventLog(store)
    ev_id = f"ep-{int(start_s)}-{severity}"
    event = {"id": ev_id, "kind": kind, "state": "closed" if end_s is not None else "open", "start_ts_s": start_s,
             "end_ts_s": end_s, "severity": severity, "peak_score": score, "features": list(features),
             "explanation": [{"feature": features[0], "value": 99.0, "z": score, "expected_low": 7.1,
                              "expected_high": 32.9}] if features else [],
             "detector": "zscore", "model_version": None, "action": "close" if end_s is not None else "open"}
    log.record(event, end_s or start_s)
    store.close()
    return ev_id


def write_forecast(db: Path, metric: str, t: np.ndarray, values: np.ndarray, made_at: float, step_s: float,
                   horizon: int, limit_value: float | None = None, model: str = "linear", version: int = 1) -> dict:
    """A trend forecast from the last hour before ``made_at`` with widening 80/95 % intervals."""
    conn = sqlite3.connect(db, isolation_level=None)
    migrate(conn, "forecast", FORECAST_MIGRATIONS)
    mask = (t <= made_at) & (t > made_at - 3600)
    slope, intercept = np.polyfit(t[mask] - made_at, values[mask], 1)
    resid = float(np.std(values[mask] - (intercept + slope * (t[mask] - made_at))))
    rows = []
    for step in range(1, horizon + 1):
        ts = made_at + step * step_s
        v = intercept + slope * step * step_s
        w = resid * math.sqrt(step)
        rows.append((made_at, metric, step, ts, v, v - 1.28 * w, v + 1.28 * w, v - 1.96 * w, v + 1.96 * w, model, version))
    eta = eta_lo = eta_hi = None
    if limit_value is not None and slope > 0:
        eta = (limit_value - intercept) / slope
        eta_lo, eta_hi = eta * 0.8, eta * 1.25
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO forecasts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.execute("INSERT INTO forecast_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (made_at, metric, model, version, step_s, limit_value, eta, eta_lo, eta_hi))
    conn.execute("INSERT OR REPLACE INTO forecast_scores VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (metric, model, 120, resid * 0.8, 0.91, 0.82, 0.95, made_at))
    conn.execute("COMMIT")
    conn.close()
    return {"slope": slope, "intercept": intercept, "eta_s": eta, "rows": rows}


def run_chromium(url: str, screenshot: Path | None = None, budget_ms: int = 15000,
                 window: str = "1280,1600", timeout_s: float = 90.0) -> tuple[str, float]:
    """The DOM after scripts ran (and optionally a PNG); returns (html, wall seconds)."""
    assert CHROMIUM, "chromium is not installed"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", "--no-first-run", "--disable-extensions", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--metrics-recording-only", "--mute-audio",
            f"--window-size={window}", f"--virtual-time-budget={budget_ms}", "--run-all-compositor-stages-before-draw"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    env = {**os.environ, "HOME": os.environ.get("TMPDIR", "/tmp")}
    started = time.perf_counter()
    proc = subprocess.run([*args, url], capture_output=True, text=True, timeout=timeout_s, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout, wall


def png_pixels(path: Path) -> tuple[int, int, int, bytes]:
    """(width, height, channels, raw rows) of an 8-bit non-interlaced PNG (what chromium writes); stdlib only."""
    import struct
    import zlib

    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and interlace == 0 and color in (2, 6), (depth, color, interlace)
            channels = 4 if color == 6 else 3
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    out = bytearray(height * stride)
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - channels] if x >= channels else 0
            b = prev[x]
            c = prev[x - channels] if x >= channels else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out[y * stride:(y + 1) * stride] = line
        prev = line
    return width, height, channels, bytes(out)


def count_color(path: Path, rgb: tuple[int, int, int], tolerance: int = 40) -> int:
    """Pixels close to ``rgb``: how a test sees that a line of that colour was drawn on the canvas."""
    width, height, ch, px = png_pixels(path)
    n = 0
    r0, g0, b0 = rgb
    for i in range(0, len(px), ch):
        if abs(px[i] - r0) + abs(px[i + 1] - g0) + abs(px[i + 2] - b0) <= tolerance:
            n += 1
    return n


def fleet_store(path: Path, now: float):
    """A fleet store with two devices (pi-02 offline for 2 h), telemetry, twins, anomalies, a forecast."""
    from fleet.store import Incoming, open_store

    store = open_store(f"sqlite:///{path}")
    t, cols = synthetic_metrics(3600, now - 3600)
    cols = {k: v for k, v in cols.items() if k in ("system.cpuUsage", "system.diskPercent")}
    spike(cols, "system.cpuUsage", 1000, 1001, 99.0)
    rows = tuple((float(t[i]), {k: float(v[i]) for k, v in cols.items()}) for i in range(len(t)))
    msgs = [Incoming(f"tel-{i}", "pi-01", "telemetry", rows[i + 599][0], {}, rows[i:i + 600]) for i in range(0, 3600, 600)]
    msgs += [
        Incoming("tw-1", "pi-01", "twin", now, {"state": {"reported": {
            "agentVersion": "0.1.0", "failureRisk24h": 0.62, "clusterDistance": 3.1, "clusterRadius": 2.0,
            "models": [{"kind": "forest", "version": 4, "health": "confirmed"}], "health": {"status": "healthy"}}}}),
        Incoming("tw-2", "pi-02", "twin", now - 7200, {"state": {"reported": {
            "models": [{"kind": "forest", "version": 3}, {"kind": "lstm", "version": 1}]}}}),
        Incoming("an-1", "pi-01", "anomaly", now - 2600, {"id": "e1", "severity": "critical", "metric": "system.cpuUsage",
                 "metrics": ["system.cpuUsage"], "startedAt": iso_utc(now - 2600), "endedAt": None, "detector": "zscore",
                 "explanation": "system.cpuUsage = 99", "deviceId": "pi-01"}),
        Incoming("an-2", "pi-01", "anomaly", now - 3000, {"id": "e2", "severity": "warning", "startedAt": iso_utc(now - 3000),
                 "endedAt": iso_utc(now - 2990), "deviceId": "pi-01", "metrics": ["system.diskPercent"]}),
        Incoming("fc-1", "pi-01", "forecast", now, {"metric": "system.diskPercent", "origin": iso_utc(now - 1),
                 "stepSeconds": 300, "values": [70.0, 71.0], "intervals": {"80": {"lower": [69.0, 69.5], "upper": [71.0, 72.5]},
                 "95": {"lower": [68.0, 68.5], "upper": [72.0, 73.5]}}, "model": "linear", "modelVersion": 2,
                 "eta": {"threshold": 90.0, "seconds": 6000.0}}),
    ]
    store.ingest([m for m in msgs if m.device_id == "pi-01"], received_s=now - 10)
    store.ingest([m for m in msgs if m.device_id == "pi-02"], received_s=now - 7200)  # offline for 2 h
    return store, t, cols


@contextlib.contextmanager
def fleet_service(path: Path, now: float) -> Iterator[Any]:
    """The fleet page over ``fleet_store``, serving on a free local port until the block ends."""
    from agent.web import HttpService, WebParams
    from fleet.serve import FleetApp
    from fleet.store import open_store

    fleet_store(path, now)[0].close()
    app = FleetApp(lambda: open_store(f"sqlite:///{path}"), clock=lambda: now)
    svc = HttpService(WebParams(enabled=True, port=0), app, name="fleet")
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()
