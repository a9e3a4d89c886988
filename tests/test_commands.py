"""Remote commands: the registry on its own, then end to end through Mosquitto."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Mapping

import pytest

from agent.commands import CommandError, CommandParams, CommandRegistry, register_builtins
from agent.store import connect
from agent.transport import MqttParams, MqttReporter


class Agent:
    """The few agent callables commands reach (the real ones are the daemon's)."""

    def __init__(self) -> None:
        self.interval_s = 1.0
        self.reports = 0

    def status(self) -> Mapping[str, Any]:
        return {"device_id": "dev-1", "interval_s": self.interval_s}

    def report_now(self) -> None:
        self.reports += 1

    def set_interval(self, interval_s: float) -> None:
        self.interval_s = interval_s


@pytest.fixture
def agent() -> Agent:
    return Agent()


@pytest.fixture
def registry(agent: Agent) -> CommandRegistry:
    reg = CommandRegistry(CommandParams(max_payload_bytes=256, min_interval_s=0.5, max_interval_s=60))
    register_builtins(reg, status=agent.status, report_now=agent.report_now,
                      set_interval=agent.set_interval, clock=lambda: 1234.5)
    return reg


def req(rid: str, command: str, args: Any = None) -> bytes:
    doc: dict[str, Any] = {"id": rid, "command": command}
    if args is not None:
        doc["args"] = args
    return json.dumps(doc).encode()


def test_builtin_commands(registry: CommandRegistry, agent: Agent) -> None:
    out = registry.handle(req("1", "ping"))
    assert (out.ok, out.request_id, out.command, out.result) == (True, "1", "ping", {"pong": True, "time_s": 1234.5})
    assert registry.handle(req("2", "status")).result == {"device_id": "dev-1", "interval_s": 1.0}
    assert registry.handle(req("3", "report-now")).ok and agent.reports == 1
    out = registry.handle(req("4", "set-interval", {"interval_s": 2.5}))
    assert out.ok and out.result == {"interval_s": 2.5} and agent.interval_s == 2.5
    assert set(registry.handle(req("5", "help")).result["commands"]) == {
        "ping", "status", "report-now", "set-interval", "help"}
    assert registry.stats() == {"received": 5, "succeeded": 5, "errors": 0, "errors_by_code": {}}


@pytest.mark.parametrize("payload, code, rid", [
    (req("a", "reboot"), "unknown_command", "a"),
    (b"{not json", "invalid_json", None),
    (b"\xff\xfe", "invalid_json", None),
    (b"[1, 2]", "invalid_request", None),
    (json.dumps({"command": "ping"}).encode(), "invalid_request", None),
    (json.dumps({"id": 7, "command": "ping"}).encode(), "invalid_request", None),
    (json.dumps({"id": "b", "command": 3}).encode(), "invalid_request", "b"),
    (json.dumps({"id": "c", "command": "ping", "args": [1]}).encode(), "invalid_args", "c"),
    (req("d", "set-interval", {"interval_s": "fast"}), "invalid_args", "d"),
    (req("e", "set-interval", {"interval_s": True}), "invalid_args", "e"),
    (req("f", "set-interval", {"interval_s": 0.01}), "invalid_args", "f"),
    (req("g", "set-interval", {"interval_s": 61}), "invalid_args", "g"),
    (req("h", "set-interval", {}), "invalid_args", "h"),
    (req("i", "ping", {"pad": "x" * 300}), "payload_too_large", None),
])
def test_bad_requests_become_error_outcomes(registry: CommandRegistry, agent: Agent, payload: bytes,
                                            code: str, rid: str | None, caplog) -> None:
    out = registry.handle(payload)
    assert (out.ok, out.error_code, out.request_id) == (False, code, rid)
    assert out.error_message
    assert registry.stats()["errors_by_code"] == {code: 1}
    assert agent.interval_s == 1.0
    assert any(code in r.getMessage() for r in caplog.records)


def test_registered_commands_and_handler_failures(registry: CommandRegistry) -> None:
    versions = [3, 4]

    def rollback(args: Mapping[str, Any]) -> Mapping[str, Any]:
        if len(versions) < 2:
            raise CommandError("nothing_to_roll_back", "no previous model")
        versions.pop()
        return {"version": versions[-1]}

    registry.register("model-rollback", rollback, "Go back to the previous model.")
    registry.register("boom", lambda args: 1 / 0)
    with pytest.raises(ValueError):
        registry.register("ping", lambda args: {})
    assert registry.handle(req("r1", "model-rollback")).result == {"version": 3}
    out = registry.handle(req("r2", "model-rollback"))
    assert (out.ok, out.error_code) == (False, "nothing_to_roll_back")
    out = registry.handle(req("r3", "boom"))
    assert (out.ok, out.error_code) == (False, "internal_error") and "ZeroDivisionError" in out.error_message


def test_a_redelivered_request_is_answered_without_running_twice(registry: CommandRegistry, agent: Agent) -> None:
    first = registry.handle(req("same", "report-now"))
    again = registry.handle(req("same", "report-now"))
    assert agent.reports == 1 and again.duplicate and again.result == first.result


def _connected_reporter(tmp_path: Path, broker, agent: Agent, **params: Any) -> MqttReporter:
    """An MqttReporter wired to `agent`'s callables, ticked until it is connected."""
    command_params = params.pop("command_params", CommandParams())
    rep = MqttReporter(MqttParams(host=broker.host, port=broker.port, keepalive_s=2, reconnect_min_s=0.05,
                                  reconnect_max_s=0.3, **params),
                       device_id="dev-1", conn=connect(tmp_path / "agent.db"), command_params=command_params,
                       status_provider=agent.status, report_now=agent.report_now,
                       set_interval=agent.set_interval, rng=random.Random(1))
    rep.start()
    deadline = time.monotonic() + 10
    while not rep.connected and time.monotonic() < deadline:
        rep.tick(time.monotonic())
        time.sleep(0.01)
    return rep


def test_commands_end_to_end_through_the_broker(tmp_path: Path, mqtt_broker, mqtt_sink, agent: Agent) -> None:
    sink = mqtt_sink(mqtt_broker, ["devices/dev-1/commands/response"])
    rep = _connected_reporter(tmp_path, mqtt_broker, agent, command_params=CommandParams(max_payload_bytes=512))
    requests = [
        req("c1", "ping"),
        req("c2", "set-interval", {"interval_s": 5}),
        req("c3", "status"),
        req("c4", "self-destruct"),
        b'{"id": "c5", "command": ',
        req("c6", "ping", {"pad": "x" * 600}),
        req("c7", "set-interval", {"interval_s": -1}),
    ]
    for payload in requests:
        sink.publish("devices/dev-1/commands", payload)
    deadline = time.monotonic() + 10
    while len(sink.messages()) < len(requests) and time.monotonic() < deadline:
        rep.tick(time.monotonic())
        time.sleep(0.01)
    replies = sink.json_messages()
    for r in replies:
        if r["id"] in ("c1", "c4"):
            print(json.dumps(r, indent=2))
    got = [(r["id"], r["command"], r["ok"], r.get("error", {}).get("code")) for r in replies]
    assert sorted(got, key=str) == sorted([
        ("c1", "ping", True, None),
        ("c2", "set-interval", True, None),
        ("c3", "status", True, None),
        ("c4", "self-destruct", False, "unknown_command"),
        (None, None, False, "invalid_json"),
        (None, None, False, "payload_too_large"),
        ("c7", "set-interval", False, "invalid_args"),
    ], key=str)
    assert agent.interval_s == 5.0
    assert all(r["deviceId"] == "dev-1" and r["kind"] == "command_response" for r in replies)
    assert len({r["messageId"] for r in replies}) == len(replies)
    status_reply = next(r for r in replies if r["id"] == "c3")
    assert status_reply["result"] == {"device_id": "dev-1", "interval_s": 5.0}
    stats = rep.status()["commands"]
    assert (stats["received"], stats["succeeded"], stats["errors"]) == (7, 3, 4)
    rep.stop()


def _fuzz_payloads(seed: int = 26, count: int = 500) -> list[bytes]:
    """Hostile command payloads: the known killers, then seeded mutations of valid requests."""
    hostile = [
        b"[" * 1000 + b"]" * 1000,                                         # RecursionError in json.loads
        b'{"id": "n1", "command": "ping", "args": {"a": ' + b"[" * 990 + b"]" * 990 + b"}}",
        b'{"id": "n2", "command": "ping", "x": ' + b"9" * 5000 + b"}",       # > 4300 digits: ValueError
        b'{"id": "n3", "command": "set-interval", "args": {"interval_s": ' + b"1" * 400 + b"}}",  # OverflowError
        b'{"id": "n4", "command": "set-interval", "args": {"interval_s": 1e400}}',
        b'{"id": "n5", "command": "set-interval", "args": {"interval_s": NaN}}',
        b'{"id": "n6", "command": "set-interval", "args": {"interval_s": -Infinity}}',
        b'{"id": "\\ud800", "command": "ping"}',                           # lone surrogate: no UTF-8 reply
        b'{"id": "n7", "command": "\\udfff"}',
        b'{"id": "n8", "command": "ping", "args": {"\\ud800": 1}}',
        b"", b"null", b"0", b'"ping"', b"{}", b"\x00" * 50, b"\xef\xbb\xbf{}",
        b'{"id": "n9", "command": "ping", "args": null}',
        b'{"id": "' + b"i" * 129 + b'", "command": "ping"}',
        b'{"id": "n10", "command": "ping"' + b' ' * 8000 + b'}',
        b'{"id": "n11", "command": "ping", "pad": "' + b"x" * 9000 + b'"}',
    ]
    rng = random.Random(seed)
    commands = ["ping", "status", "help", "report-now", "set-interval", "nope", ""]
    values: list[Any] = [None, True, 0, -1, 2.5, 1e308, "x", [], {}, [1, [2, [3]]], {"a": {"b": None}}]
    out = list(hostile)
    while len(out) < count:
        doc: dict[str, Any] = {"id": f"f{len(out)}", "command": rng.choice(commands)}
        if rng.random() < 0.7:
            doc["args"] = {rng.choice(["interval_s", "x", ""]): rng.choice(values)} if rng.random() < 0.8 \
                else rng.choice(values)
        raw = bytearray(json.dumps(doc).encode())
        for _ in range(rng.choice([0, 0, 1, 2, 5])):
            op, at = rng.random(), rng.randrange(len(raw) + 1)
            if op < 0.4 and raw:
                raw[min(at, len(raw) - 1)] = rng.randrange(256)
            elif op < 0.7:
                raw[at:at] = rng.choice([b"[", b"{", b"\\", b'"', b"9" * rng.randrange(1, 600), b"\xc3", b"\\u"])
            else:
                del raw[at:]
        out.append(bytes(raw))
    return out


def test_fuzzed_payloads_each_get_exactly_one_well_formed_outcome(agent: Agent) -> None:
    from agent import payloads

    registry = CommandRegistry()  # the default 8 KB limit: the hostile payloads fit under it
    register_builtins(registry, status=agent.status, report_now=agent.report_now,
                      set_interval=agent.set_interval, clock=lambda: 1234.5)
    fuzz = _fuzz_payloads()
    codes: dict[str, int] = {}
    for payload in fuzz:
        out = registry.handle(payload)  # must not raise
        reply = payloads.command_response("dev-1", 0.0, request_id=out.request_id, command=out.command,
                                          ok=out.ok, result=out.result, error_code=out.error_code,
                                          error_message=out.error_message)
        json.loads(payloads.encode(reply))  # every outcome can be sent back as UTF-8 JSON
        if not out.ok:
            codes[out.error_code] = codes.get(out.error_code, 0) + 1
            assert out.error_code != "internal_error", (payload[:80], out)  # bad input is never our bug
    assert registry.stats()["received"] == len(fuzz)
    by_id = {p[:30]: registry.handle(p) for p in fuzz[:8]}
    assert by_id[fuzz[0][:30]].error_code == "invalid_json"            # deep nesting
    assert by_id[fuzz[2][:30]].error_code == "invalid_json"            # 5,000-digit number
    assert by_id[fuzz[3][:30]].error_code == "invalid_args"            # 400-digit integer
    assert by_id[fuzz[3][:30]].request_id == "n3"
    assert by_id[fuzz[7][:30]].error_code == "invalid_request"         # surrogate id
    assert {"invalid_json", "invalid_request", "invalid_args", "unknown_command", "payload_too_large"} <= set(codes)


def test_fuzzed_payloads_through_the_broker_each_get_one_reply(tmp_path: Path, mqtt_broker, mqtt_sink,
                                                               agent: Agent) -> None:
    sink = mqtt_sink(mqtt_broker, ["devices/dev-1/commands/response"])
    rep = _connected_reporter(tmp_path, mqtt_broker, agent, max_inflight=50)
    fuzz = _fuzz_payloads(seed=261, count=521)
    for payload in fuzz:
        sink.publish("devices/dev-1/commands", payload)
        rep.tick(time.monotonic())
    deadline = time.monotonic() + 60
    while len(sink.messages()) < len(fuzz) and time.monotonic() < deadline:
        rep.tick(time.monotonic())
        time.sleep(0.01)
    for _ in range(20):  # a few more rounds: a second reply to anything would show up here
        rep.tick(time.monotonic())
        time.sleep(0.01)
    replies = sink.json_messages()
    assert len(replies) == len(fuzz), rep.status()
    assert len({r["messageId"] for r in replies}) == len(replies)
    ids = [r["id"] for r in replies if r["id"] is not None]
    assert len(ids) == len(set(ids))  # no request id answered twice
    assert {"n3", "n4", "n9", "n10"} <= set(ids)  # n2 (5,000 digits) cannot be parsed: its reply has no id
    by_id = {r["id"]: r for r in replies if r["id"] is not None}
    assert by_id["n3"]["error"]["code"] == "invalid_args"
    assert all(r.get("error", {}).get("code") != "internal_error" for r in replies)
    stats = rep.status()
    assert stats["commands"]["received"] == len(fuzz) and stats["mqtt"]["inbound_dropped"] == 0
    rep.stop()
