"""Payload builders and topic templates: pure functions, no broker."""
from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import pytest

from agent import payloads
from agent.topics import TopicError, TopicParams, resolve

TS = 1_700_000_000.25


def test_envelope_has_unique_ids_device_and_iso_time() -> None:
    a = payloads.envelope("telemetry", "dev-1", TS)
    b = payloads.envelope("telemetry", "dev-1", TS)
    assert a["messageId"] != b["messageId"] and len(a["messageId"]) == 32
    assert a["deviceId"] == "dev-1" and a["kind"] == "telemetry"
    assert a["timestamp"] == "2023-11-14T22:13:20.250Z"
    assert datetime.fromisoformat(a["timestamp"].replace("Z", "+00:00")).timestamp() == TS


def test_twin_is_origin_shaped_and_reports_missing_required_metrics_as_null() -> None:
    metrics = {"system.cpuUsage": 12.5, "system.memoryUsed": 1.0e9, "system.load1": 0.3,
               "system.temperature": float("nan")}
    doc = payloads.twin_reported("dev-1", TS, metrics, health={"status": "healthy"},
                                 models=[{"kind": "forest", "version": 3}], agent_version="0.1.0")
    reported = doc["state"]["reported"]
    assert set(payloads.TWIN_REQUIRED_METRICS) <= set(reported)
    assert reported["system.cpuUsage"] == 12.5 and reported["system.load1"] == 0.3
    assert reported["system.diskTotal"] is None          # required, absent from the sample
    assert reported["system.temperature"] is None        # NaN is not JSON
    assert reported["models"] == [{"kind": "forest", "version": 3}]
    assert reported["agentVersion"] == "0.1.0" and reported["health"] == {"status": "healthy"}
    assert doc["timestamp"] == reported["lastUpdated"]
    json.loads(payloads.encode(doc), parse_constant=pytest.fail)  # strict JSON


def test_telemetry_is_columnar_with_nulls_for_absent_metrics() -> None:
    samples = [(TS, {"system.cpuUsage": 1.0}),
               (TS + 5, {"system.cpuUsage": 2.0, "network.bytesSentPerSec": 10.0})]
    doc = payloads.telemetry_batch("dev-1", TS + 5, samples, interval_s=5)
    assert doc["columns"] == ["ts_s", "system.cpuUsage", "network.bytesSentPerSec"]
    assert doc["rows"] == [[TS, 1.0, None], [TS + 5, 2.0, 10.0]]
    fixed = payloads.telemetry_batch("dev-1", TS, samples, metrics=["network.bytesSentPerSec"])
    assert fixed["rows"] == [[TS, None], [TS + 5, 10.0]]


def test_anomaly_event_fields_and_validation() -> None:
    doc = payloads.anomaly_event(
        "dev-1", TS, event_id="ep-7", severity="critical", metrics=["system.cpuUsage", "system.load1"],
        value=np.float32(97.5), expected_low=5.0, expected_high=60.0, deviation=4.2,
        detector="zscore", model_version=2, started_ts_s=TS - 30, score=0.93,
        explanation="CPU far above its usual range")
    assert doc["id"] == "ep-7" and doc["metric"] == "system.cpuUsage"
    assert doc["value"] == 97.5 and isinstance(doc["value"], float)
    assert doc["expected"] == {"low": 5.0, "high": 60.0}
    assert doc["endedAt"] is None and doc["startedAt"] == payloads.iso_utc(TS - 30)
    with pytest.raises(ValueError):
        payloads.anomaly_event("dev-1", TS, event_id="x", severity="bad", metrics=["m"], value=1.0,
                               expected_low=None, expected_high=None, deviation=None,
                               detector="d", model_version=None, started_ts_s=TS)
    with pytest.raises(ValueError):
        payloads.anomaly_event("dev-1", TS, event_id="x", severity="warning", metrics=[], value=1.0,
                               expected_low=None, expected_high=None, deviation=None,
                               detector="d", model_version=None, started_ts_s=TS)


def test_forecast_intervals_and_eta() -> None:
    doc = payloads.forecast("dev-1", TS, metric="system.diskPercent", origin_ts_s=TS, step_s=60,
                            values=[80.0, 81.0], intervals={"80": ([79.0, 79.5], [81.0, 82.5])},
                            model="holt", eta_threshold=90.0, eta_ts_s=TS + 3600)
    assert doc["horizonSteps"] == 2 and doc["intervals"]["80"]["upper"] == [81.0, 82.5]
    assert doc["eta"] == {"threshold": 90.0, "at": payloads.iso_utc(TS + 3600), "seconds": 3600.0}
    with pytest.raises(ValueError):
        payloads.forecast("dev-1", TS, metric="m", origin_ts_s=TS, step_s=1, values=[1.0],
                          intervals={"95": ([0.0, 0.0], [2.0])}, model="x")


def test_model_event_and_command_response() -> None:
    ev = payloads.model_event("dev-1", TS, event="rolled_back", model_kind="forest", version=3,
                              previous_version=4, reason="health check failed")
    assert (ev["event"], ev["version"], ev["previousVersion"]) == ("rolled_back", 3, 4)
    with pytest.raises(ValueError):
        payloads.model_event("dev-1", TS, event="exploded", model_kind="forest", version=1)
    ok = payloads.command_response("dev-1", TS, request_id="r1", command="ping", ok=True, result={"pong": True})
    err = payloads.command_response("dev-1", TS, request_id=None, command=None, ok=False,
                                    error_code="invalid_json", error_message="nope")
    assert ok["result"] == {"pong": True} and "error" not in ok
    assert err["error"] == {"code": "invalid_json", "message": "nope"} and "result" not in err


def test_encode_is_strict_compact_json_and_handles_numpy() -> None:
    data = payloads.encode({"a": float("inf"), "b": [np.float64(1.5), np.int64(3), float("nan")],
                            "c": np.arange(2), "d": "é"})
    assert json.loads(data) == {"a": None, "b": [1.5, 3, None], "c": [0, 1], "d": "é"}
    assert b" " not in data and "é".encode() in data
    with pytest.raises(TypeError):
        payloads.encode({"x": object()})


def test_default_topics_and_group_model_subscriptions() -> None:
    t = resolve("dev-1", ["lab", "pi4"])
    assert t.for_kind("twin") == "devices/dev-1/twin/reported"
    assert t.for_kind("telemetry") == "devices/dev-1/telemetry"
    assert t.for_kind("anomaly") == "devices/dev-1/anomalies"
    assert t.for_kind("forecast") == "devices/dev-1/forecasts"
    assert t.for_kind("model") == "devices/dev-1/model-events"
    assert t.for_kind("command_response") == "devices/dev-1/commands/response"
    assert t.for_kind("health_report") == "devices/dev-1/events/health_report"
    assert t.status == "devices/dev-1/status" and t.commands == "devices/dev-1/commands"
    assert t.inbound_models == ("devices/dev-1/models", "fleet/lab/models", "fleet/pi4/models",
                                "fleet/all/models")
    assert t.retained("twin") and not t.retained("anomaly")


def test_origin_preset_prefix_template_and_overrides() -> None:
    t = resolve("dev-1", (), TopicParams(prefix="acme/{device_id}", preset="origin",
                                         overrides=(("telemetry", "{prefix}/metrics"),)))
    assert t.for_kind("twin") == "$iot/device/dev-1/shadow/name/device-state/update"
    assert t.for_kind("telemetry") == "acme/dev-1/metrics"
    assert t.for_kind("anomaly") == "acme/dev-1/anomalies"
    assert t.inbound_models == ("acme/dev-1/models", "fleet/all/models")


@pytest.mark.parametrize("device_id, groups, params", [
    ("a/b", (), TopicParams()),
    ("dev+", (), TopicParams()),
    ("", (), TopicParams()),
    ("dev", ("g#",), TopicParams()),
    ("dev", (), TopicParams(preset="nope")),
    ("dev", (), TopicParams(prefix="devices/{devce_id}")),
    ("dev", (), TopicParams(overrides=(("telemetry", "{prefix}/+"),))),
])
def test_invalid_topics_are_refused_at_resolve_time(device_id, groups, params) -> None:
    with pytest.raises(TopicError):
        resolve(device_id, groups, params)
