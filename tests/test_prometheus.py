"""The Prometheus endpoint scraped over real HTTP and parsed with prometheus_client's parser."""
from __future__ import annotations

import logging
import socket
import threading
import urllib.error
import urllib.request
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.prometheus import CONTENT_TYPE, MetricsParams, MetricsServer, format_value, render


def snapshot(samples_taken: int = 42) -> dict[str, Any]:
    return {
        "device_id": "pi-1",
        "version": "0.1.0",
        "samples_taken": samples_taken,
        "ticks_skipped": 1,
        "component_errors": 0,
        "loop_lag_s": 0.0125,
        "sample": {
            "ts_s": 1_700_000_000.5,
            "values": {
                "system.cpuUsage": 12.5,
                "system.memoryUsed": 512e6,
                "system.diskUsed:/data": 3.5e9,
                "network.bytesReceived": 123456789.0,
            },
        },
        "anomalies": {"warning": 3, "critical": 1},
        "outbox": {"depth": 17, "dropped": 2},
        "mqtt": {"connected": True},
        "models": [
            {"kind": "forest", "version": 7, "inference_s_sum": 0.25, "inference_count": 500},
            {"kind": "zscore", "version": 1},
        ],
        "forecast_coverage": [
            {"metric": "system.cpuUsage", "level": 0.8, "coverage": 0.78},
            {"metric": "system.cpuUsage", "level": 0.95, "coverage": 0.93},
        ],
    }


def scrape(server: MetricsServer, path: str = "/metrics", method: str = "GET") -> tuple[int, str, str]:
    host, port = server.address or ("", 0)
    request = urllib.request.Request(f"http://{host}:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], family: str, sample: str | None = None, **labels: str) -> float:
    for s in fams[family].samples:
        if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((family, sample, labels))


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    srv = MetricsServer(MetricsParams(enabled=True, bind="127.0.0.1", port=0))
    srv.start()
    assert srv.address is not None
    yield srv
    srv.stop()


def test_scrape_parses_with_the_reference_parser(server: MetricsServer) -> None:
    server.publish(snapshot())
    code, content_type, text = scrape(server)
    assert code == 200 and content_type == CONTENT_TYPE
    fams = families(text)
    assert fams["edge_agent_samples"].type == "counter"
    assert value(fams, "edge_agent_samples", "edge_agent_samples_total") == 42
    assert value(fams, "edge_agent_ticks_skipped", "edge_agent_ticks_skipped_total") == 1
    assert fams["edge_agent_loop_lag_seconds"].type == "gauge"
    assert value(fams, "edge_agent_loop_lag_seconds") == 0.0125
    assert value(fams, "edge_agent_info", device_id="pi-1", version="0.1.0") == 1
    assert value(fams, "edge_agent_metric", name="system.cpuUsage") == 12.5
    assert value(fams, "edge_agent_metric", name="system.diskUsed:/data") == 3.5e9
    assert value(fams, "edge_agent_metric", name="network.bytesReceived") == 123456789.0
    assert value(fams, "edge_agent_last_sample_timestamp_seconds") == 1_700_000_000.5
    assert fams["edge_agent_anomalies"].type == "counter"
    assert value(fams, "edge_agent_anomalies", "edge_agent_anomalies_total", severity="critical") == 1
    assert value(fams, "edge_agent_anomalies", "edge_agent_anomalies_total", severity="warning") == 3
    assert value(fams, "edge_agent_outbox_depth") == 17
    assert value(fams, "edge_agent_outbox_dropped", "edge_agent_outbox_dropped_total") == 2
    assert value(fams, "edge_agent_mqtt_connected") == 1
    assert value(fams, "edge_agent_model_version", kind="forest") == 7
    assert value(fams, "edge_agent_model_version", kind="zscore") == 1
    assert fams["edge_agent_model_inference_seconds"].type == "summary"
    assert value(fams, "edge_agent_model_inference_seconds", "edge_agent_model_inference_seconds_sum", kind="forest") == 0.25
    assert value(fams, "edge_agent_model_inference_seconds", "edge_agent_model_inference_seconds_count", kind="forest") == 500
    assert value(fams, "edge_agent_forecast_coverage_ratio", metric="system.cpuUsage", level="0.95") == 0.93
    assert 0.0 <= value(fams, "edge_agent_snapshot_age_seconds") < 60.0
    # Every family declares HELP and TYPE exactly once.
    for fam in fams.values():
        assert fam.documentation
        assert text.count(f"# TYPE {fam.name}") == 1


def test_label_values_are_escaped(server: MetricsServer) -> None:
    odd = 'disk "C:\\"\nsecond line'
    server.publish({"sample": {"ts_s": 1.0, "values": {odd: 1.5}}, "device_id": 'a"b\\c'})
    fams = families(scrape(server)[2])
    assert value(fams, "edge_agent_metric", name=odd) == 1.5
    assert value(fams, "edge_agent_info", device_id='a"b\\c') == 1


def test_special_float_values() -> None:
    assert [format_value(v) for v in (float("nan"), float("inf"), float("-inf"), True, 3, 0.1)] == [
        "NaN", "+Inf", "-Inf", "1", "3", "0.1"]
    fams = families(render({"loop_lag_s": float("inf"), "sample": {"values": {"x": float("nan")}}}))
    assert value(fams, "edge_agent_loop_lag_seconds") == float("inf")
    assert value(fams, "edge_agent_metric", name="x") != value(fams, "edge_agent_metric", name="x")  # NaN


def test_absent_parts_export_no_series(server: MetricsServer) -> None:
    assert scrape(server)[2] == ""  # nothing published yet: an empty, valid exposition
    server.publish({"samples_taken": 1, "models": [{"kind": "forest"}], "mqtt": {}})
    fams = families(scrape(server)[2])
    assert set(fams) == {"edge_agent_samples", "edge_agent_snapshot_age_seconds"}


def test_published_snapshot_is_isolated_from_later_mutation(server: MetricsServer) -> None:
    snap = snapshot(samples_taken=5)
    server.publish(snap)
    snap["samples_taken"] = 999
    snap["sample"]["values"]["system.cpuUsage"] = 99.0
    snap["models"].append({"kind": "late", "version": 1})
    fams = families(scrape(server)[2])
    assert value(fams, "edge_agent_samples", "edge_agent_samples_total") == 5
    assert value(fams, "edge_agent_metric", name="system.cpuUsage") == 12.5
    assert {s.labels["kind"] for s in fams["edge_agent_model_version"].samples} == {"forest", "zscore"}


def test_scrapes_see_whole_snapshots_while_the_loop_publishes(server: MetricsServer) -> None:
    """Each snapshot carries the same counter in three places: a torn read would show a mismatch."""
    stop = threading.Event()

    def loop() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            server.publish({"samples_taken": n, "outbox": {"depth": n},
                            "sample": {"ts_s": float(n), "values": {"system.cpuUsage": float(n)}}})

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        seen = []
        for _ in range(30):
            fams = families(scrape(server)[2])
            n = value(fams, "edge_agent_samples", "edge_agent_samples_total")
            assert value(fams, "edge_agent_outbox_depth") == n
            assert value(fams, "edge_agent_metric", name="system.cpuUsage") == n
            seen.append(n)
        assert seen == sorted(seen) and seen[-1] > seen[0]
    finally:
        stop.set()
        thread.join(5)


def test_other_paths_and_head(server: MetricsServer) -> None:
    server.publish(snapshot())
    assert scrape(server, "/nope")[0] == 404
    code, content_type, body = scrape(server, "/")
    assert code == 200 and "/metrics" in body
    code, content_type, body = scrape(server, "/metrics", method="HEAD")
    assert code == 200 and content_type == CONTENT_TYPE and body == ""
    assert server.status()["metrics"]["scrapes"] >= 1


def test_disabled_by_default_and_bound_to_loopback() -> None:
    params = MetricsParams()
    assert params.enabled is False and params.bind == "127.0.0.1"
    srv = MetricsServer(params)
    srv.start()
    try:
        assert srv.address is None
        srv.publish(snapshot())  # a no-op, never an error
        assert srv.status() == {"metrics": {"enabled": False, "listening": None, "scrapes": 0}}
    finally:
        srv.stop()


def test_a_taken_port_disables_the_endpoint_without_stopping_the_agent(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        srv = MetricsServer(MetricsParams(enabled=True, port=port))
        with caplog.at_level(logging.ERROR, logger="agent.prometheus"):
            srv.start()
        assert srv.address is None
        assert "cannot listen" in caplog.text
        srv.stop()


def test_stop_releases_the_port() -> None:
    srv = MetricsServer(MetricsParams(enabled=True, port=0))
    srv.start()
    host, port = srv.address or ("", 0)
    srv.stop()
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind((host, port))


def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    srv = MetricsServer(MetricsParams(enabled=True, bind="::1", port=0))
    srv.start()
    try:
        srv.publish({"samples_taken": 3})
        port = (srv.address or ("", 0))[1]
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=10) as resp:
            fams = families(resp.read().decode())
        assert value(fams, "edge_agent_samples", "edge_agent_samples_total") == 3
    finally:
        srv.stop()


def _lan_address() -> str | None:
    """A non-loopback address of this machine to bind to, or None (a sandbox with loopback only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent, the kernel only picks a route
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_binding_beyond_loopback_without_a_credential_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    for bind in ("0.0.0.0", "::"):
        srv = MetricsServer(MetricsParams(enabled=True, bind=bind, port=0))
        with caplog.at_level(logging.ERROR, logger="agent.prometheus"):
            srv.start()
        try:
            assert srv.address is None  # nothing listens
            status = srv.status()["metrics"]
            assert status["listening"] is None and "metrics.token" in status["error"]
        finally:
            srv.stop()
    assert "metrics endpoint disabled" in caplog.text and "metrics.allow_unauthenticated" in caplog.text
    srv = MetricsServer(MetricsParams(enabled=True, bind="0.0.0.0", port=0, basic_user="prom"))
    srv.start()
    assert srv.address is None and "basic_password" in srv.status()["metrics"]["error"]  # half a credential


def test_allow_unauthenticated_opts_in_to_an_open_endpoint() -> None:
    srv = MetricsServer(MetricsParams(enabled=True, bind="0.0.0.0", port=0, allow_unauthenticated=True))
    srv.start()
    try:
        srv.publish(snapshot())
        port = (srv.address or ("", 0))[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("auth", ["token", "basic"])
def test_a_credential_allows_a_lan_bind_and_every_scrape_must_carry_it(auth: str) -> None:
    import base64

    creds = {"token": "s3cret"} if auth == "token" else {"basic_user": "prom", "basic_password": "pw"}
    bind = _lan_address() or "0.0.0.0"
    srv = MetricsServer(MetricsParams(enabled=True, bind=bind, port=0, **creds))
    srv.start()
    try:
        assert srv.address is not None
        srv.publish(snapshot())
        host = bind if bind != "0.0.0.0" else "127.0.0.1"
        url = f"http://{host}:{srv.address[1]}/metrics"
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(url, timeout=10)
        assert exc.value.code == 401 and exc.value.headers["WWW-Authenticate"]
        wrong = "Bearer nope" if auth == "token" else "Basic " + base64.b64encode(b"prom:nope").decode()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": wrong}), timeout=10)
        good = "Bearer s3cret" if auth == "token" else "Basic " + base64.b64encode(b"prom:pw").decode()
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": good}), timeout=10) as resp:
            fams = families(resp.read().decode())
        assert value(fams, "edge_agent_samples", "edge_agent_samples_total") == 42
        assert srv.status()["metrics"]["refused"] == 2
    finally:
        srv.stop()


def test_metrics_credentials_come_from_the_config(tmp_path) -> None:
    from agent import config
    from agent.daemon import Daemon, build_components

    cfg = config.parse({"agent": {"state_dir": str(tmp_path)}, "mqtt": {"enabled": False},
                        "metrics": {"enabled": True, "bind": "0.0.0.0", "port": 1, "token": "t0k"}}, {})
    (srv,) = [c for c in build_components(cfg, Daemon(cfg)) if c.name == "metrics"]
    assert (srv.params.bind, srv.params.token, srv.params.has_auth) == ("0.0.0.0", "t0k", True)
    open_cfg = config.parse({"metrics": {"bind": "0.0.0.0", "allow_unauthenticated": True}}, {})
    assert open_cfg.metrics.allow_unauthenticated is True
