"""``edge-agent models list | show | rollback | install`` on real files, and a running daemon noticing them.

The CLI is driven through ``agent.cli_models`` (its parser registered on a fresh
``edge-agent``-like parser); the daemon test runs a real Daemon on fake clocks
whose model manager sees what the CLI did from "another process" (another
connection and pointer writes it did not make).
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import cli_models, config
from agent.daemon import Daemon
from agent.model_manager import ManagerParams, ModelManager
from agent.updates import read_pointer
from fleet import cli as fleet_cli
from models.bundle import Target, build_bundle
from fleet.keys import load_signing_key
from tests.fakes import FakeClock, FakeSource

DEVICE = "pi-01"
FEATURES = ["system.cpuUsage", "system.memoryPercent", "system.load1"]


@pytest.fixture(scope="module")
def forest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.training.forest import ForestParams, train_forest_from_matrix

    rng = np.random.default_rng(5)
    X = np.column_stack([rng.normal(12, 4, 300), rng.normal(40, 3, 300), rng.normal(0.5, 0.2, 300)])
    out = tmp_path_factory.mktemp("forest") / "model"
    train_forest_from_matrix(X, FEATURES, ForestParams(n_estimators=10, min_samples=50), out, version=1)
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("keys")
    assert fleet_cli.main(["keygen", "--out", str(d), "--name", "fleet"]) == 0
    assert fleet_cli.main(["keygen", "--out", str(d), "--name", "stranger"]) == 0
    return {"pub": d / "fleet.pub", "fleet": load_signing_key(d / "fleet.key").private_key,
            "stranger": load_signing_key(d / "stranger.key").private_key}


def write_bundle(tmp: Path, keys: dict, forest_dir: Path, version: int, key: str = "fleet") -> Path:
    meta = json.loads((forest_dir / "model.json").read_text())
    files = {"forest/forest.npz": (forest_dir / "forest.npz").read_bytes(),
             "forest/model.json": json.dumps(dict(meta, version=version)).encode()}
    data = build_bundle(private_key=keys[key], files=files, version=version, target=Target("device", DEVICE),
                        feature_names=FEATURES, interval_s=1.0, created_at_s=time.time() - 60)
    path = tmp / f"forest-v{version}-{key}.bundle"
    path.write_bytes(data)
    return path


@pytest.fixture
def cfg(tmp_path: Path, keys: dict) -> config.AgentConfig:
    return config.parse({"agent": {"device_id": DEVICE, "state_dir": str(tmp_path / "state")},
                         "models": {"trusted_keys": [str(keys["pub"])]}}, {})


def models_cli(cfg: config.AgentConfig, *argv: str) -> int:
    from agent.cli import GLOBAL_OPTIONS

    parser = argparse.ArgumentParser(prog="edge-agent")
    cli_models.add_parser(parser.add_subparsers(dest="command", required=True))
    args = GLOBAL_OPTIONS.parse(GLOBAL_OPTIONS.install(parser), ["models", *argv])
    assert args.command == "models"
    return cli_models.run(cfg, args)


def one_line_error(capsys: pytest.CaptureFixture, *words: str) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    for w in words:
        assert w in captured.err, (w, captured.err)
    return captured.err


def queued(cfg: config.AgentConfig) -> list[dict]:
    conn = sqlite3.connect(cfg.db_path)
    try:
        return [json.loads(r[0]) for r in conn.execute("SELECT event FROM model_event_queue ORDER BY id")]
    finally:
        conn.close()


def test_list_show_install_rollback(tmp_path, cfg, keys, forest_dir, capsys) -> None:
    assert models_cli(cfg, "list") == 0 and capsys.readouterr().out == "no models installed\n"
    assert models_cli(cfg, "list", "--json") == 0 and json.loads(capsys.readouterr().out) == []
    assert models_cli(cfg, "show", "forest") == 2
    one_line_error(capsys, "no forest model installed")
    assert not cfg.db_path.exists()                          # reading created nothing

    assert models_cli(cfg, "install", str(write_bundle(tmp_path, keys, forest_dir, 1))) == 0
    assert capsys.readouterr().out.startswith(f"installed forest v1 for device:{DEVICE} (on trial")
    assert models_cli(cfg, "install", str(write_bundle(tmp_path, keys, forest_dir, 2))) == 0
    capsys.readouterr()
    assert models_cli(cfg, "list") == 0
    line = capsys.readouterr().out.strip()
    assert line.split()[:4] == ["forest", "v2", f"device:{DEVICE}", "trial"] and line.endswith("previous v1")
    assert models_cli(cfg, "list", "--json") == 0
    [m] = json.loads(capsys.readouterr().out)
    assert (m["kind"], m["version"], m["target"], m["state"], m["previous_version"]) == \
        ("forest", 2, f"device:{DEVICE}", "trial", 1)
    assert models_cli(cfg, "show", "forest") == 0
    out = capsys.readouterr().out
    for text in ("version     2", f"target      device:{DEVICE}", "integrity   ok", "previous    v1",
                 "features    system.cpuUsage, system.memoryPercent, system.load1", "accepted    up to v2"):
        assert text in out, (text, out)
    assert models_cli(cfg, "show", "forest", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["current"]["version"] == 2 and doc["manifest"]["version"] == 2 and doc["integrity"] == "ok"

    assert models_cli(cfg, "rollback", "forest") == 0
    assert capsys.readouterr().out == "forest v2 rolled back; now v1\n"
    assert read_pointer(cfg.agent.state_dir, "forest")["version"] == 1
    assert models_cli(cfg, "show", "forest") == 0
    assert "refused     v2 for device:pi-01" in capsys.readouterr().out     # and it stays refused
    assert models_cli(cfg, "install", str(tmp_path / "forest-v2-fleet.bundle")) == 1
    one_line_error(capsys, "refused", "rolled back", "manual rollback")
    assert models_cli(cfg, "rollback", "forest", "--reason", "bad night") == 0
    assert capsys.readouterr().out == "forest v1 rolled back; now no forest model (the agent falls back)\n"
    assert models_cli(cfg, "rollback", "forest") == 2
    one_line_error(capsys, "no forest model installed")

    actions = [(e["action"], e["version"]) for e in queued(cfg)]    # for the daemon to publish
    assert actions == [("accept", 1), ("accept", 2), ("rollback", 2), ("reject", 2), ("rollback", 1)]
    assert len({e["message_id"] for e in queued(cfg)}) == 5


def test_install_refusals_exit_1_with_the_reason(tmp_path, cfg, keys, forest_dir, capsys) -> None:
    assert models_cli(cfg, "install", str(write_bundle(tmp_path, keys, forest_dir, 3, key="stranger"))) == 1
    one_line_error(capsys, "edge-agent models install: refused: unknown key")
    (tmp_path / "junk.bundle").write_bytes(b"not a bundle")
    assert models_cli(cfg, "install", str(tmp_path / "junk.bundle")) == 1
    one_line_error(capsys, "not a valid bundle")
    assert models_cli(cfg, "install", str(write_bundle(tmp_path, keys, forest_dir, 3))) == 0
    capsys.readouterr()
    assert models_cli(cfg, "install", str(write_bundle(tmp_path, keys, forest_dir, 2))) == 1
    one_line_error(capsys, "downgrade: forest v2 < v3")
    assert models_cli(cfg, "install", str(tmp_path / "missing.bundle")) == 2
    one_line_error(capsys, "missing.bundle: no such file")
    bad_keys = config.parse({"agent": {"device_id": DEVICE, "state_dir": str(cfg.agent.state_dir)},
                             "models": {"trusted_keys": [str(tmp_path / "nope.pub")]}}, {})
    assert models_cli(bad_keys, "install", str(write_bundle(tmp_path, keys, forest_dir, 4))) == 2
    one_line_error(capsys, "trusted key", "nope.pub")
    assert read_pointer(cfg.agent.state_dir, "forest")["version"] == 3


def test_config_option_works_before_and_after_the_action() -> None:
    from agent import cli

    def parse(*argv: str) -> argparse.Namespace:
        return cli.GLOBAL_OPTIONS.parse(cli.build_parser(), list(argv))

    assert parse("--config", "r.toml", "models", "list").config == "r.toml"
    assert parse("models", "--config", "a.toml", "list").config == "a.toml"
    assert parse("models", "list", "--config", "b.toml").config == "b.toml"
    assert parse("models", "show", "forest").config is None


class Emitted:
    """Captures what the daemon hands to the outbox (the MQTT reporter's seat)."""

    name = "emitted"

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict, int]] = []

    def start(self, ctx: Any) -> None:
        ctx.daemon.set_emitter(lambda kind, payload, priority: self.messages.append((kind, payload, priority)))


class Operator:
    """Runs CLI commands at given samples while the daemon runs, and records what the detector would load."""

    name = "operator"

    def __init__(self, cfg: config.AgentConfig, script: dict[int, tuple[str, ...]], stop_at: int) -> None:
        self.cfg, self.script, self.stop_at = cfg, script, stop_at
        self.loaded: list[int | None] = []
        self.exit_codes: list[int] = []
        self.n = 0

    def start(self, ctx: Any) -> None:
        self.ctx = ctx
        ctx.extras["models"].subscribe("forest", lambda d, ptr: self.loaded.append(ptr and ptr["version"]))

    def on_sample(self, sample: Any) -> None:
        self.n += 1
        if self.n in self.script:
            self.exit_codes.append(models_cli(self.cfg, *self.script[self.n]))
        if self.n >= self.stop_at:
            self.ctx.daemon.request_stop()


def test_running_daemon_reloads_and_reports_what_the_cli_did(tmp_path, cfg, keys, forest_dir, capsys) -> None:
    assert models_cli(cfg, "install", str(write_bundle(tmp_path, keys, forest_dir, 1))) == 0   # agent stopped
    v2 = write_bundle(tmp_path, keys, forest_dir, 2)
    clock = FakeClock()
    emitted = Emitted()
    manager = ModelManager(ManagerParams(trusted_keys=(str(keys["pub"]),), poll_interval_s=2.0))
    operator = Operator(cfg, {5: ("install", str(v2)), 15: ("rollback", "forest")}, stop_at=25)
    daemon = Daemon(cfg, source=FakeSource(clock), clock=clock, sleep=clock.sleep,
                    components=[emitted, manager, operator])
    assert daemon.run() == 0
    assert operator.exit_codes == [0, 0] and daemon.component_errors == 0
    assert operator.loaded == [1, 2, 1]                # swapped within one poll of each change
    events = [(p["event"], p["version"], p.get("restoredVersion")) for kind, p, _ in emitted.messages]
    assert events == [("installed", 1, None), ("installed", 2, None), ("rolled_back", 2, 1)]
    assert {(kind, p["deviceId"]) for kind, p, _ in emitted.messages} == {("model", DEVICE)}
    assert emitted.messages[1][1]["source"] == f"file:{v2.resolve()}"
    assert emitted.messages[2][1]["reason"] == "manual rollback (edge-agent models rollback)"
    assert queued(cfg) == []                           # published, then removed from the queue
    assert [(m["version"], m["health"]) for m in manager.status()["models"]] == [(1, "trial")]
