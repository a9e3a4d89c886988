"""export -> replay / backtest round trip: the agent accepts its own export.

The daemon runs (real loop, real SQLite, real detection component) on a fake psutil
source and a fake clock with one injected incident; ``edge-agent export`` writes the
buffer as CSV; ``edge-agent replay`` must accept that file as it is (totals, counters,
uptime and process count skipped, never an error) and find the same episodes, with the
same peak severity, as the daemon stored.
"""
from __future__ import annotations

import csv
import json
import math
import sqlite3
from pathlib import Path

import pytest

from agent import cli, config
from agent.daemon import Daemon
from agent.detection import DetectionComponent, detect_params, training_schedule
from tests.fakes import FakeClock, FakeSource, replace

SAMPLES = 700
INCIDENT = range(420, 432)            # sample numbers (1-based) with a CPU and load spike
RANK = {"normal": 0, "warning": 1, "critical": 2}


class StopAfter:
    name = "stop-after"

    def __init__(self, samples: int) -> None:
        self.limit, self.seen = samples, 0

    def start(self, ctx) -> None:
        self.ctx = ctx

    def on_sample(self, sample) -> None:
        self.seen += 1
        if self.seen >= self.limit:
            self.ctx.daemon.request_stop()


def _machine(call: int, reading):
    """A quiet machine with deterministic noise and one incident."""
    cpu = 12.0 + 3.0 * math.sin(call * 0.7) + 1.5 * math.sin(call * 0.13)
    load = 0.5 + 0.05 * math.sin(call * 0.3)
    if call in INCIDENT:
        cpu, load = 97.0, 3.5
    return replace(reading, cpu_percent=cpu, load=(load, 0.4, 0.3),
                   memory_percent=40.0 + 0.2 * math.sin(call * 0.05))


@pytest.fixture
def device(tmp_path: Path) -> tuple[Path, Path]:
    """(config file, database) after the daemon sampled SAMPLES times."""
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text(f"""
[agent]
device_id = "rt-1"
state_dir = "{tmp_path / 'state'}"
[sampling]
mounts = ["/", "/data"]
[mqtt]
enabled = false
[detect]
use_forest = false
forest_bootstrap = false
""")
    cfg = config.load(str(cfg_file))
    clock = FakeClock()
    detection = DetectionComponent(detect_params(cfg.detect), training_schedule(cfg.detect))
    daemon = Daemon(cfg, source=FakeSource(clock, hook=_machine), clock=clock,
                    components=[detection, StopAfter(SAMPLES)], sleep=clock.sleep)
    assert daemon.run() == 0
    return cfg_file, cfg.db_path


def _daemon_episodes(db: Path) -> list[tuple[float, float, str]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT started_at, ended_at, severity FROM events WHERE kind = 'anomaly' "
                            "ORDER BY started_at").fetchall()
    return [(float(a), float(b), s) for a, b, s in rows]


def _replay_episodes(out: Path) -> list[tuple[float, float, str]]:
    from agent.replay import parse_timestamp

    spans: dict[str, list] = {}
    with open(out, newline="") as f:
        for r in csv.DictReader(f):
            if r["episode_id"]:
                ts = parse_timestamp(r["timestamp"])
                span = spans.setdefault(r["episode_id"], [ts, ts, "normal"])
                span[1] = ts
                span[2] = max(span[2], r["severity"], key=RANK.__getitem__)
    return sorted((a, b, s) for a, b, s in spans.values())


def test_replay_accepts_the_agents_own_export_and_finds_what_the_daemon_found(device, tmp_path, capsys):
    cfg_file, db = device
    exported = tmp_path / "x.csv"
    assert cli.main(["--config", str(cfg_file), "export", "--out", str(exported)]) == 0
    with open(exported, newline="") as f:
        header = next(csv.reader(f))
    # the export carries what the issue tripped over: totals, counters, uptime, process count
    assert {"system.memoryTotal", "network.bytesReceived", "system.uptime", "system.processCount"} <= set(header)

    out = tmp_path / "y.csv"
    capsys.readouterr()
    assert cli.main(["replay", str(exported), "--out", str(out), "--config", str(cfg_file)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["rows"] == SAMPLES
    assert "system.memoryTotal" in summary["skipped_cols"] and "system.processCount" in summary["skipped_cols"]
    assert "system.memoryTotal" not in summary["value_cols"] and "system.cpuUsage" in summary["value_cols"]
    # one line naming the skipped columns, on stderr (stdout stays one JSON object)
    notes = [line for line in captured.err.splitlines() if "skipped" in line]
    assert len(notes) == 1 and "system.memoryTotal" in notes[0]

    stored = _daemon_episodes(db)
    assert stored, "the incident must have opened an episode on the daemon"
    assert any(a <= FakeClock().wall_s + INCIDENT[0] <= b + 1 for a, b, _ in stored)
    assert _replay_episodes(out) == stored


def test_backtest_accepts_the_export_too(device, tmp_path, capsys):
    cfg_file, _ = device
    exported = tmp_path / "x.csv"
    assert cli.main(["export", "--config", str(cfg_file), "--out", str(exported)]) == 0
    out = tmp_path / "bt.csv"
    assert cli.main(["--config", str(cfg_file), "backtest", str(exported), "--metric", "system.cpuUsage",
                     "--out", str(out), "--horizon", "3", "--every", "50", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] > 0 and summary["step_s"] == 1.0


def test_a_counter_named_on_purpose_is_a_clear_usage_error(device, tmp_path, capsys):
    cfg_file, _ = device
    exported = tmp_path / "x.csv"
    assert cli.main(["export", "--config", str(cfg_file), "--out", str(exported)]) == 0
    capsys.readouterr()
    rc = cli.main(["replay", str(exported), "--out", str(tmp_path / "y.csv"), "--value-cols",
                   "system.cpuUsage,system.memoryTotal", "--config", str(cfg_file)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "system.memoryTotal" in err[0]
