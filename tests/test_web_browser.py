"""The device page, the static report and the fleet page in a real headless browser (Debian's chromium).

Each page is loaded with ``chromium --headless --dump-dom --virtual-time-budget``:
the DOM is printed after the page's scripts ran and its fetches completed.
The page records script errors and console.error calls in ``data-errors`` on
<html> (agent/static/boot.js), marks each chart with what uPlot drew, and the
test reads all that back.  Screenshots are saved under the test's tmp_path
(the path is printed) and checked for the history line's colour.
Nothing is downloaded: chromium is a system package (CI installs it).
"""
from __future__ import annotations

import json
import re
import time

import pytest

from agent import report
from agent.web import DeviceApp, HttpService, WebParams
from tests.web_helpers import (CHROMIUM, agent_config, count_color, fleet_service, record_episode, run_chromium,
                               spike, synthetic_metrics, write_forecast, write_samples)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

START = 1_700_000_000.0
HISTORY_RGB = (0x25, 0x63, 0xEB)


def attrs(html: str, tag: str) -> dict[str, str]:
    m = re.search(rf"<{tag}\b([^>]*)>", html)
    assert m, f"no <{tag}> in the DOM"
    return dict(re.findall(r'([\w-]+)="([^"]*)"', m.group(1)))


def cards(html: str) -> list[dict[str, str]]:
    return [dict(re.findall(r'([\w-]+)="([^"]*)"', m)) for m in re.findall(r'<div (class="panel chart-card"[^>]*)>', html)]


def assert_clean(html: str) -> None:
    assert attrs(html, "body").get("data-ready") == "1", "the page never finished rendering"
    errors = json.loads(attrs(html, "html").get("data-errors", "null").replace("&quot;", '"'))
    assert errors == [], errors


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    cfg = agent_config(tmp)
    t, cols = synthetic_metrics(6 * 3600, START)
    spike(cols, "system.cpuUsage", 10_000, 10_300, 97.0)
    write_samples(cfg.db_path, t, cols)
    record_episode(cfg.db_path, t[10_000], t[10_299], "critical", ["system.cpuUsage"])
    record_episode(cfg.db_path, t[15_000], t[15_600], "warning", ["system.memoryPercent"])
    write_forecast(cfg.db_path, "system.diskPercent", t, cols["system.diskPercent"], float(t[-1]), 60, 60, limit_value=90.0)
    write_forecast(cfg.db_path, "system.cpuUsage", t, cols["system.cpuUsage"], float(t[-1]), 60, 60)
    svc = HttpService(WebParams(enabled=True, port=0), DeviceApp(cfg, clock=lambda: float(t[-1]) + 2))
    svc.start()
    yield cfg, t, svc
    svc.stop()


def check_device_dom(html: str) -> list[dict[str, str]]:
    assert_clean(html)
    found = cards(html)
    assert len(found) == int(attrs(html, "body")["data-charts"]) == 5
    assert html.count("<canvas") == len(found)
    for c in found:
        assert int(c["data-points"]) > 100 and c.get("data-drawn-history") == "1", c
    by_metric = {c["data-metric"]: c for c in found}
    assert by_metric["system.diskPercent"]["data-forecast"] == "1"
    assert by_metric["system.diskPercent"].get("data-drawn-forecast") == "1"
    assert by_metric["system.diskPercent"].get("data-drawn-band") == "1"
    assert by_metric["system.memoryPercent"]["data-forecast"] == "0"
    assert int(by_metric["system.cpuUsage"]["data-spans"]) == 2
    assert len(re.findall(r'class="anomaly-span sev-critical involved"', html)) == 1  # on the CPU chart
    assert len(re.findall(r'class="anomaly-span sev-critical"', html)) == 4  # the other charts, fainter
    assert len(re.findall(r'class="anomaly-span sev-warning', html)) == 5
    assert re.search(r'class="eta">reaches 90.0 % in ~[\d.]+ h', html)
    assert "MQTT" not in html or "not running" in html
    return found


def test_device_page_renders_charts_spans_and_forecast(device, tmp_path):
    cfg, t, svc = device
    html, wall_s = run_chromium(svc.url)
    check_device_dom(html)
    assert '<tr class="ev sev-critical">' in html and "expected 7.1 .. 32.9" in html
    shot = tmp_path / "device.png"
    run_chromium(svc.url, screenshot=shot, window="1000,700")
    print(f"\nscreenshot: {shot} (page in {wall_s:.2f} s wall, chromium start included)")
    assert count_color(shot, HISTORY_RGB) > 2000  # the history lines were painted


def test_static_report_renders_offline_the_same_view(device, tmp_path):
    cfg, t, svc = device
    out = tmp_path / "report.html"
    report.write_report(cfg, out, float(t[-1]), float(t[0]), None)
    svc_requests = svc.requests
    html, _ = run_chromium(out.as_uri())
    check_device_dom(html)
    assert svc.requests == svc_requests  # nothing was fetched from the server
    assert "Report generated" in html


def test_token_protected_page_works_after_token_in_the_address(device):
    cfg, t, _ = device
    svc = HttpService(WebParams(enabled=True, bind="0.0.0.0", port=0, token="s3cret"),
                      DeviceApp(cfg, clock=lambda: float(t[-1])))
    svc.start()
    try:
        base = f"http://127.0.0.1:{svc.address[1]}/"
        refused, _ = run_chromium(base, budget_ms=3000)
        assert "authentication required" in refused and "chart-card" not in refused
        html, _ = run_chromium(base + "?token=s3cret")  # the cookie carries the token to app.js and the API
        check_device_dom(html)
    finally:
        svc.stop()


def test_fleet_page_and_device_view(tmp_path):
    now = 1_800_000_000.0
    with fleet_service(tmp_path / "fleet.db", now) as svc:
        html, _ = run_chromium(svc.url)
        assert_clean(html)
        assert attrs(html, "body")["data-devices"] == "2"
        assert "62 %" in html and "outside" in html and "forest v3, lstm v1" in html
        assert '<span class="sev sev-critical">1 critical</span>' in html and "1 / 2 online" in html
        dev, _ = run_chromium(svc.url + "devices/pi-01")
        assert_clean(dev)
        found = cards(dev)
        assert {c["data-metric"] for c in found} == {"system.cpuUsage", "system.diskPercent"}
        assert all(c.get("data-drawn-history") == "1" for c in found)
        assert {c["data-metric"]: c["data-forecast"] for c in found} == {"system.cpuUsage": "0", "system.diskPercent": "1"}
        assert 'class="anomaly-span sev-critical involved"' in dev and "failure risk 24 h" in dev
        shot = tmp_path / "fleet.png"
        run_chromium(svc.url, screenshot=shot, window="1000,400")
        print(f"\nscreenshot: {shot}")


def test_a_week_of_1hz_data_loads_downsampled(tmp_path):
    """604,800 rows: the page asks for the week and gets at most max_points values per chart."""
    cfg = agent_config(tmp_path)
    t, cols = synthetic_metrics(7 * 86400, START)
    cols = {k: cols[k] for k in ("system.cpuUsage", "system.diskPercent", "system.memoryPercent")}
    write_samples(cfg.db_path, t, cols)
    svc = HttpService(WebParams(enabled=True, port=0), DeviceApp(cfg, clock=lambda: float(t[-1])))
    svc.start()
    try:
        started = time.perf_counter()
        html, wall_s = run_chromium(svc.url + "#range=7d")
        assert_clean(html)
        found = cards(html)
        assert len(found) == 3 and all(int(c["data-points"]) <= 2000 for c in found)
        assert html.count("min/max of 10 min buckets") == 3  # 7 d / 1000 buckets = 604.8 s
        print(f"\nweek of 1 Hz ({len(t)} rows): page rendered in {wall_s:.2f} s wall "
              f"(headless chromium start included; {time.perf_counter() - started:.2f} s total)")
    finally:
        svc.stop()
