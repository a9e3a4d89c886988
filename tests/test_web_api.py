"""The web page's JSON endpoints, the static report and the fleet page's data, on real SQLite files."""
from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.request

import numpy as np
import pytest

from agent import cli, webdata
from agent.web import DeviceApp, HttpService, WebComponent, WebConfigError, WebParams, check_exposure
from tests.web_helpers import (agent_config, fleet_service, fleet_store, record_episode, spike, synthetic_metrics,
                               write_forecast, write_samples)

START = 1_700_000_000.0


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """Six hours at 1 Hz with a CPU spike (critical episode), a memory warning and two forecasts."""
    tmp = tmp_path_factory.mktemp("dev")
    cfg = agent_config(tmp)
    t, cols = synthetic_metrics(6 * 3600, START)
    spike(cols, "system.cpuUsage", 10_000, 10_060, 97.0)
    write_samples(cfg.db_path, t, cols)
    record_episode(cfg.db_path, t[10_000], t[10_059], "critical", ["system.cpuUsage"])
    record_episode(cfg.db_path, t[15_000], t[15_200], "warning", ["system.memoryPercent|mean10"])
    record_episode(cfg.db_path, t[-30], None, "warning", ["system.load1"])  # still open
    old = write_forecast(cfg.db_path, "system.diskPercent", t, cols["system.diskPercent"], float(t[-3600]), 60, 30,
                         limit_value=90.0)
    new = write_forecast(cfg.db_path, "system.diskPercent", t, cols["system.diskPercent"], float(t[-1]), 60, 60,
                         limit_value=90.0)
    return cfg, t, cols, old, new


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture
def server(device):
    cfg, t, *_ = device
    svc = HttpService(WebParams(enabled=True, port=0), DeviceApp(cfg, clock=lambda: float(t[-1]) + 2))
    svc.start()
    yield svc
    svc.stop()


def test_chart_metrics_leave_out_counters_totals_and_bytes_with_a_percent():
    names = ["system.memoryUsed", "system.memoryPercent", "system.memoryTotal", "network.bytesSent",
             "network.bytesSentPerSec", "system.cpuUsage", "system.diskUsed:/data", "system.diskPercent:/data",
             "system.uptime", "system.temperature"]
    assert webdata.chart_metrics(names) == ["system.cpuUsage", "system.memoryPercent", "network.bytesSentPerSec",
                                            "system.temperature", "system.diskPercent:/data"]


def test_series_small_range_is_the_stored_rows(server, device):
    cfg, t, cols, *_ = device
    since, until = t[100], t[199]
    status, _, body = get(f"{server.url}api/series?metrics=system.cpuUsage,nope&since={since}&until={until}")
    doc = json.loads(body)
    assert status == 200 and not doc["downsampled"] and doc["unknown"] == ["nope"]
    assert doc["t"] == t[100:200].tolist()
    np.testing.assert_allclose(doc["series"]["system.cpuUsage"], cols["system.cpuUsage"][100:200])


def test_series_default_range_is_the_last_hours_before_the_newest_sample(server, device):
    cfg, t, cols, *_ = device
    doc = json.loads(get(f"{server.url}api/series?points=300")[2])
    assert doc["until"] == t[-1] and doc["since"] == t[-1] - webdata.DEFAULT_RANGE_S
    assert doc["downsampled"] and len(doc["t"]) <= 300
    assert set(doc["series"]) == set(webdata.chart_metrics(cols))  # no counters, no totals by default
    # min/max downsampling keeps the 60 s spike that averaging over ~144 s buckets would flatten
    assert max(v for v in doc["series"]["system.cpuUsage"] if v is not None) == pytest.approx(97.0)
    assert min(v for v in doc["series"]["system.cpuUsage"] if v is not None) == pytest.approx(
        cols["system.cpuUsage"][t >= doc["since"]].min())


def test_forecast_is_the_latest_run_with_bands_eta_and_score(server, device):
    cfg, t, cols, old, new = device
    doc = json.loads(get(f"{server.url}api/forecast")[2])
    (fc,) = doc["forecasts"]
    assert fc["metric"] == "system.diskPercent" and fc["made_at"] == t[-1] and len(fc["t"]) == 60
    assert fc["t"][0] == t[-1] + 60 and fc["step_s"] == 60
    assert all(lo95 <= lo80 <= v <= hi80 <= hi95 for lo95, lo80, v, hi80, hi95 in
               zip(fc["lower_95"], fc["lower_80"], fc["value"], fc["upper_80"], fc["upper_95"]))
    assert fc["eta_s"] == pytest.approx(new["eta_s"]) and fc["limit_value"] == 90.0
    assert fc["score"]["mase"] == pytest.approx(0.91)
    # as of an hour ago, the older run was the latest
    (past,) = json.loads(get(f"{server.url}api/forecast?until={t[-1800]}")[2])["forecasts"]
    assert past["made_at"] == t[-3600] and len(past["t"]) == 30


def test_events_overlapping_the_range_with_severity_and_features(server, device):
    cfg, t, *_ = device
    doc = json.loads(get(f"{server.url}api/events?since={t[9_000]}&until={t[16_000]}")[2])
    assert [(e["severity"], e["features"]) for e in doc["events"]] == [
        ("critical", ["system.cpuUsage"]), ("warning", ["system.memoryPercent"])]
    assert doc["events"][0]["start_s"] == t[10_000] and doc["events"][0]["end_s"] == t[10_059]
    assert "expected 7.1 .. 32.9" in doc["events"][0]["explanation"]
    assert doc["by_severity"] == {"critical": 1, "warning": 1}
    open_ = json.loads(get(f"{server.url}api/events?since={t[-10]}")[2])["events"]
    assert [(e["state"], e["end_s"]) for e in open_] == [("open", None)]


def test_status_is_the_status_command_document(server, device):
    cfg, t, *_ = device
    doc = json.loads(get(f"{server.url}api/status")[2])
    assert doc["device_id"] == "dev-1" and doc["samples"]["count"] == len(t)
    assert doc["events"] == {"count": 3} and doc["outbox"]["depth"] == 0 and doc["models"] == []
    assert doc["health"]["ok"] is False  # the agent is not running
    assert "config" not in doc and "database" not in doc  # no file paths on a web page
    meta = json.loads(get(f"{server.url}api/meta")[2])
    assert meta["metrics"][0] == "system.cpuUsage" and meta["samples"]["newest"] == t[-1]


def test_static_files_are_a_whitelist_and_the_page_is_read_only(server):
    status, headers, body = get(server.url)
    assert status == 200 and b"/static/app.js" in body and "default-src 'none'" in headers["Content-Security-Policy"]
    assert get(server.url + "static/uPlot.LICENSE")[2].startswith(b"The MIT License")
    assert get(server.url + "static/../web.py")[0] == 404
    assert get(server.url + "static/vendor/uPlot.LICENSE")[0] == 404
    assert get(server.url + "api/nope")[0] == 404
    assert get(server.url + "api/series?since=yesterday")[0] == 400
    req = urllib.request.Request(server.url + "api/status", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 405


def test_unauthenticated_server_answers_only_to_loopback_host_names(server):
    port = server.address[1]
    assert get(f"http://127.0.0.1:{port}/api/meta", {"Host": f"localhost:{port}"})[0] == 200
    status, _, body = get(f"http://127.0.0.1:{port}/api/meta", {"Host": "attacker.example"})
    assert status == 403 and b"localhost only" in body  # DNS rebinding


def test_a_week_of_1hz_is_downsampled_to_a_bounded_response(tmp_path):
    cfg = agent_config(tmp_path)
    n = 7 * 86400
    t, cols = synthetic_metrics(n, START)
    cols = {k: cols[k] for k in ("system.cpuUsage", "system.diskPercent")}
    spike(cols, "system.cpuUsage", 400_000, 400_001, 100.0)  # one second in a week
    cols["system.cpuUsage"][500_000] = -1.0
    write_samples(cfg.db_path, t, cols)
    conn = webdata.open_readonly(cfg.db_path)
    try:
        doc = webdata.series(conn, None, t[0], t[-1], points=1_000_000)
    finally:
        conn.close()
    body = json.dumps(doc, separators=(",", ":"))
    assert doc["rows"] == n and doc["downsampled"] and doc["points"] == webdata.MAX_POINTS
    assert len(doc["t"]) <= webdata.MAX_POINTS and len(body) < 150_000, len(body)
    cpu = doc["series"]["system.cpuUsage"]
    assert max(cpu) == 100.0 and min(cpu) == -1.0  # the one-second extremes survive
    assert doc["t"] == sorted(doc["t"])
    i = cpu.index(100.0)
    assert t[0] + (doc["bucket_s"] * ((t[400_000] - t[0]) // doc["bucket_s"])) <= doc["t"][i] <= t[-1]


# -- access control -----------------------------------------------------------------------------
def test_binding_beyond_loopback_without_credentials_is_refused(caplog):
    with pytest.raises(WebConfigError, match="web.token"):
        check_exposure(WebParams(enabled=True, bind="0.0.0.0"))
    check_exposure(WebParams(enabled=True, bind="0.0.0.0", token="s3cret"))
    check_exposure(WebParams(enabled=True, bind="0.0.0.0", allow_unauthenticated=True))
    check_exposure(WebParams(enabled=True, bind="::1"))
    with pytest.raises(WebConfigError, match="together"):
        check_exposure(WebParams(enabled=True, basic_user="ops"))
    comp = WebComponent(WebParams(enabled=True, bind="0.0.0.0", port=0))
    with caplog.at_level(logging.ERROR, logger="agent.web"):
        comp.start(type("Ctx", (), {"config": None, "clock": None})())
    assert comp.service is None and "web page disabled" in caplog.text
    assert comp.status()["web"]["listening"] is None and "web.token" in comp.status()["web"]["error"]


def test_token_and_basic_auth_when_bound_beyond_loopback(device):
    cfg, t, *_ = device
    params = WebParams(enabled=True, bind="0.0.0.0", port=0, token="s3cret", basic_user="ops", basic_password="pw")
    svc = HttpService(params, DeviceApp(cfg))
    svc.start()
    try:
        base = f"http://127.0.0.1:{svc.address[1]}/"
        status, headers, _ = get(base + "api/meta")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert get(base, {"Authorization": "Bearer wrong"})[0] == 401
        assert get(base + "static/app.js")[0] == 401
        assert get(base + "api/meta", {"Authorization": "Bearer s3cret", "Host": "pi.lan"})[0] == 200
        basic = base64.b64encode(b"ops:pw").decode()
        assert get(base + "api/meta", {"Authorization": f"Basic {basic}"})[0] == 200
        assert get(base + "api/meta", {"Authorization": "Basic " + base64.b64encode(b"ops:no").decode()})[0] == 401
        status, headers, _ = get(base + "?token=s3cret")
        assert status == 200 and "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
        cookie = headers["Set-Cookie"].split(";")[0]
        assert get(base + "api/status", {"Cookie": cookie})[0] == 200
        assert get(base + "api/status", {"Cookie": "edge_agent_token=guess"})[0] == 401
        assert svc.refused >= 5
    finally:
        svc.stop()


def test_web_component_serves_from_the_daemon_config(device):
    from agent.daemon import Daemon, build_components

    cfg, t, *_ = device
    cfg = agent_config(cfg.agent.state_dir, web={"enabled": True, "port": 1})
    comps = build_components(cfg, Daemon(cfg))
    (web,) = [c for c in comps if isinstance(c, WebComponent)]
    assert web.params.bind == "127.0.0.1" and web.params.port == 1 and web.params.max_points == 2000
    comp = WebComponent(WebParams(enabled=True, port=0))
    clock = type("C", (), {"time": staticmethod(lambda: float(t[-1]))})()
    comp.start(type("Ctx", (), {"config": cfg, "clock": clock})())
    try:
        status, _, body = get(f"http://127.0.0.1:{comp.service.address[1]}/api/meta")
        assert status == 200 and json.loads(body)["device_id"] == "dev-1"
        assert comp.status()["web"]["requests"] == 1
    finally:
        comp.stop()


# -- static report ------------------------------------------------------------------------------
def test_report_command_writes_one_self_contained_file(device, tmp_path, capsys):
    cfg, t, *_ = device
    toml = tmp_path / "agent.toml"
    toml.write_text(f'[agent]\nstate_dir = "{cfg.agent.state_dir}"\ndevice_id = "dev-1"\n[mqtt]\nenabled = false\n')
    out = tmp_path / "report.html"
    assert cli.main(["report", "--config", str(toml), "--since", str(t[-7200]), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    html = out.read_text()
    assert "/static/" not in html and "src=" not in html and "http://" not in html.replace("http://www.w3.org", "")
    assert "window.EDGE_DATA = " in html and "uPlot" in html and "The%20MIT%20License" in html
    data = json.loads(html.split("window.EDGE_DATA = ", 1)[1].split(";\n</script>", 1)[0].replace("<\\/", "</"))
    assert data["series"]["since"] == t[-7200] and data["series"]["until"] == t[-1]
    assert [e["severity"] for e in data["events"]["events"]] == ["warning", "warning"]  # the critical one is older
    assert data["forecast"]["forecasts"][0]["metric"] == "system.diskPercent"
    assert cli.main(["report", "--config", str(toml), "--since", "soon", "--out", str(out)]) == 2


def test_report_without_a_database_is_a_usage_error(tmp_path, capsys):
    toml = tmp_path / "agent.toml"
    toml.write_text(f'[agent]\nstate_dir = "{tmp_path / "none"}"\n[mqtt]\nenabled = false\n')
    assert cli.main(["report", "--config", str(toml), "--out", str(tmp_path / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- fleet ----------------------------------------------------------------------------------------
def test_fleet_summary_and_device_views(tmp_path):
    from fleet.serve import device_events, device_forecast, device_series, device_status, fleet_summary

    now = 1_800_000_000.0
    store, t, cols = fleet_store(tmp_path / "fleet.db", now)
    try:
        doc = fleet_summary(store, now, 180.0)
        by_id = {d["device_id"]: d for d in doc["devices"]}
        assert by_id["pi-01"]["online"] and not by_id["pi-02"]["online"] and doc["online"] == 1
        assert by_id["pi-01"]["open_alerts"] == {"critical": 1} and doc["open_alerts"] == {"warning": 0, "critical": 1}
        assert by_id["pi-01"]["failure_risk_24h"] == 0.62 and by_id["pi-02"]["failure_risk_24h"] is None
        assert by_id["pi-01"]["cluster"]["ratio"] == pytest.approx(1.55) and by_id["pi-02"]["cluster"] is None
        assert [(m["kind"], m["version"]) for m in by_id["pi-02"]["models"]] == [("forest", 3), ("lstm", 1)]
        assert [a["severity"] for a in doc["recent_alerts"]] == ["critical", "warning"]

        full = device_series(store, "pi-01", ["system.cpuUsage"], t[0], t[-1], 10_000, 10_000)
        assert not full["downsampled"] and full["t"] == t.tolist()
        np.testing.assert_allclose(full["series"]["system.cpuUsage"], cols["system.cpuUsage"])
        small = device_series(store, "pi-01", None, t[0], t[-1], 100, 2000)
        assert small["downsampled"] and len(small["t"]) <= 100 and set(small["series"]) == set(cols)
        assert max(small["series"]["system.cpuUsage"]) == 99.0
        assert min(small["series"]["system.diskPercent"]) == pytest.approx(cols["system.diskPercent"].min())

        (fc,) = device_forecast(store, "pi-01", None)["forecasts"]
        assert fc["t"] == [now - 1 + 300, now - 1 + 600] and fc["upper_95"] == [72.0, 73.5] and fc["eta_s"] == 6000.0
        evs = device_events(store, "pi-01", t[0], t[-1])["events"]
        assert [(e["severity"], e["state"], e["features"]) for e in evs] == [
            ("warning", "closed", ["system.diskPercent"]), ("critical", "open", ["system.cpuUsage"])]
        st = device_status(store, "pi-01", now, 180.0)
        assert st["online"] and st["health"]["ok"] and ["failure risk 24 h", "62 %"] in st["extra"]
    finally:
        store.close()


def test_fleet_http_routes_and_cli_registration(tmp_path):
    from fleet import cli as fleet_cli

    now = 1_800_000_000.0
    with fleet_service(tmp_path / "fleet.db", now) as svc:
        assert b"fleet.js" in get(svc.url)[2] and b"app.js" in get(svc.url + "devices/pi-01")[2]
        assert json.loads(get(svc.url + "api/fleet")[2])["online"] == 1
        assert json.loads(get(svc.url + "api/devices/pi-01/meta")[2])["metrics"] == ["system.cpuUsage", "system.diskPercent"]
        assert get(svc.url + "api/devices/nobody/meta")[0] == 404
        assert get(svc.url + "api/devices/pi-01/nope")[0] == 400
    fleet_cli.build_parser()
    assert "serve" in fleet_cli.COMMANDS
    assert fleet_cli.main(["serve", "--bind", "0.0.0.0", "--port", "0", "--config", str(tmp_path / "none.toml")]) == 2


def test_fleet_serve_refuses_exposure_without_credentials(tmp_path, capsys, monkeypatch):
    from fleet import cli as fleet_cli

    cfg = tmp_path / "fleet.toml"
    cfg.write_text(f'[fleet]\nstate_dir = "{tmp_path}"\n')
    monkeypatch.delenv("EDGE_FLEET_SERVE_TOKEN", raising=False)
    assert fleet_cli.main(["serve", "--config", str(cfg), "--bind", "0.0.0.0", "--port", "0"]) == 2
    assert "web.token" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1e400", "-1e400", "nan", "inf", "1e300", "99999999999999999w"])
def test_out_of_range_times_are_a_400_with_the_reason(server, value):
    status, _, body = get(f"{server.url}api/series?since={value}")
    assert status == 400, body
    assert "since" in json.loads(body)["error"] and "range" in json.loads(body)["error"]
    assert get(f"{server.url}api/events?until={value}")[0] == 400


def test_time_parsing_refuses_non_finite_and_out_of_range_values():
    from agent.timeparse import parse_duration_s, parse_time_arg, parse_timestamp_s

    for bad in ("1e400", "NaN", "-inf", "1e13", "-1e12"):
        with pytest.raises(ValueError, match="out of range"):
            parse_timestamp_s(bad)
    with pytest.raises(ValueError, match="out of range"):
        parse_duration_s("9" * 400 + "s")
    assert parse_time_arg("1700000000", 0.0) == 1.7e9 and parse_time_arg("1h", 7200.0) == 3600.0
    assert parse_timestamp_s("2024-01-01T00:00:00Z") == 1704067200.0
