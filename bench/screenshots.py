"""Render the README's screenshots from real replayed data: docs/images/device.png and fleet.png.

Device page: two NAB series with labelled anomalies (realKnownCause:
machine_temperature_system_failure as ``system.temperature`` and
cpu_utilization_asg_misconfiguration as ``system.cpuUsage``; 5-minute data,
the temperature series shifted in time so both end at the same instant, three
days after its last labelled window) go through the agent's own components,
sample by sample, into a real agent database: the DetectionComponent (robust
z-score, episodes into ``events``) and the ForecastComponent (fallback
forecaster, conformal bands, exhaustion ETA into ``forecasts``/``forecast_runs``).
The page is then served by agent/web.py and shot with headless chromium.

Fleet page: a fleet store filled through fleet.store's ingest with three
devices (telemetry from the same NAB series, twin state with model versions,
failure risk and cluster distance, the replayed anomaly episodes).

    python bench/screenshots.py [--out docs/images] [--week]

``--week`` also measures the page for a week of 1 Hz data (604,800 rows in a
temporary database): the API's series call and the whole page in chromium.
Needs chromium (apt-get install chromium) and the NAB data
($EDGE_DATASETS or ../shared/datasets).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent import webdata  # noqa: E402
from agent.daemon import Context  # noqa: E402
from agent.detection import DetectionComponent, detect_params  # noqa: E402
from agent.forecasting import ForecastComponent, params_from_section  # noqa: E402
from agent.sampling import Sample  # noqa: E402
from agent.store import Store  # noqa: E402
from agent.web import DeviceApp, HttpService, WebParams  # noqa: E402
from tests.web_helpers import agent_config, run_chromium, synthetic_metrics, write_samples  # noqa: E402

NAB = Path(os.environ.get("EDGE_DATASETS", REPO.parent / "shared" / "datasets")) / "nab"
SERIES = {  # metric -> (NAB file, last timestamp to keep)
    "system.cpuUsage": ("realKnownCause/cpu_utilization_asg_misconfiguration.csv", "2014-07-15 17:19:00"),
    "system.temperature": ("realKnownCause/machine_temperature_system_failure.csv", "2014-02-12 14:05:00"),
}


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.split(".")[0]).replace(tzinfo=timezone.utc).timestamp()


def load_series() -> tuple[list[float], dict[str, list[float]], dict[str, list[tuple[float, float]]]]:
    """Aligned (shifted) timestamps, values per metric, and each metric's labelled windows (shifted too)."""
    labels = json.loads((NAB / "labels" / "combined_windows.json").read_text())
    cols: dict[str, tuple[list[float], list[float]]] = {}
    for metric, (name, last) in SERIES.items():
        with open(NAB / "data" / name) as f:
            rows = [(_ts(r["timestamp"]), float(r["value"])) for r in csv.DictReader(f)]
        rows = [r for r in rows if r[0] <= _ts(last)]
        cols[metric] = ([r[0] for r in rows], [r[1] for r in rows])
    n = min(len(v[0]) for v in cols.values())
    ref_t = cols["system.cpuUsage"][0][-n:]
    values, windows = {}, {}
    for metric, (name, _) in SERIES.items():
        t, v = cols[metric]
        shift = ref_t[-1] - t[-1]
        values[metric] = v[-n:]
        windows[metric] = [(_ts(a) + shift, _ts(b) + shift) for a, b in labels[name]]
    return ref_t, values, windows


class Clock:
    def __init__(self) -> None:
        self.wall = self.mono = 0.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


def replay_into_agent(state_dir: Path) -> tuple[object, dict]:
    """Every NAB row as a sample through the agent's detection and forecasting components."""
    t, values, windows = load_series()
    cfg = agent_config(state_dir, device_id="pi-lab-07",
                       detect={"forest_bootstrap": False},
                       forecast={"metrics": list(SERIES), "step_s": 300.0, "horizon": 72,
                                 "limits": ["system.temperature=110"]})
    store = Store(cfg.db_path)
    clock = Clock()
    ctx = Context(config=cfg, store=store, clock=clock, emit=lambda *a: None, daemon=None)  # type: ignore[arg-type]
    detection = DetectionComponent(detect_params(cfg.detect))
    forecasting = ForecastComponent(params_from_section(cfg.forecast))
    clock.wall, clock.mono = t[0], 1000.0
    detection.start(ctx)
    forecasting.start(ctx)
    started = time.perf_counter()
    for i, ts in enumerate(t):
        clock.wall, clock.mono = ts, 1000.0 + (ts - t[0])
        sample = Sample(ts_s=ts, values={m: values[m][i] for m in values})
        store.add_sample(sample)
        detection.on_sample(sample)
        forecasting.on_sample(sample)
        if hasattr(forecasting, "tick"):
            forecasting.tick(clock.mono)
        if i % 12 == 0:
            store.flush()
    forecasting.stop()
    store.flush()
    store.close()
    info = {"rows": len(t), "seconds": time.perf_counter() - started, "windows": windows}
    return cfg, info


def overlap_report(cfg: object, windows: dict) -> list[str]:
    conn = webdata.open_readonly(cfg.db_path)  # type: ignore[attr-defined]
    try:
        evs = webdata.events(conn, limit=5000)["events"]
    finally:
        conn.close()
    lines = []
    for metric, wins in windows.items():
        mine = [e for e in evs if metric in e["features"]]
        hit = sum(any(e["start_s"] <= b and (e["end_s"] or e["start_s"]) >= a for e in mine) for a, b in wins)
        lines.append(f"{metric}: {len(mine)} episodes, {hit}/{len(wins)} labelled windows overlapped")
    return lines


def build_fleet(path: Path, device_cfg: object, now: float) -> None:
    from fleet.store import Incoming, open_store

    src = Store(device_cfg.db_path)  # type: ignore[attr-defined]
    rows = src.samples()
    src.close()
    conn = webdata.open_readonly(device_cfg.db_path)  # type: ignore[attr-defined]
    evs = webdata.events(conn, limit=5000)["events"]
    conn.close()
    shift = now - 60 - rows[-1][0]
    iso = lambda s: datetime.fromtimestamp(s, tz=timezone.utc).isoformat().replace("+00:00", "Z")  # noqa: E731
    store = open_store(f"sqlite:///{path}")
    devices = [("pi-lab-07", 60, 0.71, (3.4, 2.5), [("forest", 6), ("lstm", 3)]),
               ("pi-lab-08", 90, 0.08, (0.9, 2.5), [("forest", 6), ("lstm", 3)]),
               ("pi-barn-02", 5 * 3600, None, None, [("forest", 5)])]
    for device, ago, risk, cluster, models in devices:
        received = now - ago
        msgs = []
        batch = [(ts + shift - ago + 60, v) for ts, v in rows[-288:]]
        msgs.append(Incoming(f"{device}-tel", device, "telemetry", batch[-1][0], {}, tuple(batch)))
        reported = {"agentVersion": "0.1.0", "health": {"status": "healthy"},
                    "models": [{"kind": k, "version": v, "health": "confirmed"} for k, v in models]}
        if risk is not None:
            reported["failureRisk24h"] = risk
        if cluster is not None:
            reported["clusterDistance"], reported["clusterRadius"] = cluster
        msgs.append(Incoming(f"{device}-twin", device, "twin", received, {"state": {"reported": reported}}))
        if device == "pi-lab-07":
            for e in evs[-6:]:
                end = e["end_s"] + shift if e["end_s"] is not None else None
                msgs.append(Incoming(f"{device}-an-{e['id']}", device, "anomaly", received, {
                    "id": e["id"], "deviceId": device, "severity": e["severity"], "metric": e["features"][0],
                    "metrics": e["features"], "startedAt": iso(e["start_s"] + shift),
                    "endedAt": iso(end) if end is not None and end < now - 3600 else None,
                    "detector": e["detector"], "explanation": e["explanation"]}))
        store.ingest(msgs, received_s=received)
    store.close()


def shoot(url: str, out: Path, window: str) -> None:
    html, wall = run_chromium(url)
    if 'data-ready="1"' not in html or 'data-errors="[]"' not in html:
        raise SystemExit(f"page at {url} did not render cleanly")
    run_chromium(url, screenshot=out, window=window)
    print(f"{out}: {out.stat().st_size / 1e3:.0f} kB ({wall:.2f} s to render)")


def measure_week(tmp: Path) -> None:
    cfg = agent_config(tmp / "week")
    t, cols = synthetic_metrics(7 * 86400, 1_700_000_000.0)
    cols = {k: v for k, v in cols.items() if k in webdata.chart_metrics(cols)}
    started = time.perf_counter()
    write_samples(cfg.db_path, t, cols)
    print(f"week of 1 Hz: {len(t)} rows x {len(cols)} metrics written in {time.perf_counter() - started:.1f} s")
    svc = HttpService(WebParams(enabled=True, port=0), DeviceApp(cfg, clock=lambda: float(t[-1])))
    svc.start()
    try:
        url = f"{svc.url}api/series?since={t[0]}&until={t[-1]}&points=2000"
        for _ in range(2):
            started = time.perf_counter()
            body = urllib.request.urlopen(url, timeout=60).read()
            api_s = time.perf_counter() - started
        print(f"  /api/series for 7 d, {len(cols)} metrics: {api_s * 1e3:.0f} ms, {len(body) / 1e3:.0f} kB")
        _, blank_s = run_chromium(svc.url + "static/uPlot.LICENSE", budget_ms=1000)
        html, page_s = run_chromium(svc.url + "#range=7d")
        assert 'data-ready="1"' in html and 'data-errors="[]"' in html
        print(f"  page (7 d range) in headless chromium: {page_s:.2f} s wall; chromium on a plain text page: "
              f"{blank_s:.2f} s; difference {page_s - blank_s:.2f} s")
    finally:
        svc.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    ap.add_argument("--week", action="store_true", help="also measure a week of 1 Hz data")
    args = ap.parse_args()
    if not NAB.exists():
        print(f"NAB data not found at {NAB}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-shots-") as tmp_name:
        tmp = Path(tmp_name)
        cfg, info = replay_into_agent(tmp / "device")
        print(f"replayed {info['rows']} NAB rows through detection and forecasting in {info['seconds']:.1f} s")
        for line in overlap_report(cfg, info["windows"]):
            print("  " + line)
        newest = Store(cfg.db_path).latest_sample().ts_s  # type: ignore[attr-defined, union-attr]
        svc = HttpService(WebParams(enabled=True, port=0), DeviceApp(cfg, clock=lambda: newest + 60))
        svc.start()
        try:
            shoot(svc.url + "#range=7d", args.out / "device.png", "1100,1080")
        finally:
            svc.stop()
        from fleet.serve import FleetApp
        from fleet.store import open_store

        now = time.time()
        build_fleet(tmp / "fleet.db", cfg, now)
        app = FleetApp(lambda: open_store(f"sqlite:///{tmp / 'fleet.db'}"), clock=lambda: now)
        svc = HttpService(WebParams(enabled=True, port=0), app, name="fleet")
        svc.start()
        try:
            shoot(svc.url, args.out / "fleet.png", "1100,420")
        finally:
            svc.stop()
        if args.week:
            measure_week(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
