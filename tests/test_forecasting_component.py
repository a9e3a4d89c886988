"""Forecasting in the real daemon: fake machine and clocks, real SQLite, real mosquitto, real TFLite."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import config
from agent.daemon import Daemon, build_components
from agent.prometheus import render
from tests.conftest import MqttSink
from tests.fakes import FakeClock, FakeSource, replace

REPO = Path(__file__).resolve().parents[1]
INTERVAL_S = 10.0
LEAK_START = 30.0          # memory percent at the first sample
LEAK_PER_MIN = 0.25        # percent per minute


class Probe:
    """Stops the daemon after ``samples`` samples and applies scripted clock jumps."""

    name = "probe"

    def __init__(self, clock: FakeClock, samples: int, jumps: dict[int, float] | None = None) -> None:
        self.clock, self.limit, self.jumps, self.n = clock, samples, jumps or {}, 0

    def start(self, ctx):
        self.ctx = ctx

    def on_sample(self, sample):
        self.n += 1
        if self.n in self.jumps:
            self.clock.wall_s += self.jumps[self.n]
        if self.n >= self.limit:
            self.ctx.daemon.request_stop()


def leaking_source(clock: FakeClock, temperature_until: int | None = None) -> FakeSource:
    rng = random.Random(5)

    def hook(n, reading):
        minutes = (n - 1) * INTERVAL_S / 60.0
        temp = 48.5 + rng.gauss(0, 0.2) if temperature_until is None or n < temperature_until else None
        return replace(reading, memory_percent=LEAK_START + LEAK_PER_MIN * minutes + rng.gauss(0, 0.2),
                       cpu_percent=20.0 + 5.0 * rng.random(), temperature_c=temp)

    return FakeSource(clock, hook=hook)


def make_config(tmp_path: Path, mqtt: dict | None = None, **forecast) -> dict:
    return {
        "agent": {"device_id": "fc-1", "state_dir": str(tmp_path / "state"), "interval_s": INTERVAL_S},
        "store": {"commit_interval_s": 30.0},
        "mqtt": mqtt or {"enabled": False},
        "forecast": {"step_s": 60.0, "horizon": 12, "publish_every_s": 300.0, **forecast},
    }


def run_daemon(cfg_dict: dict, clock: FakeClock, source, samples: int, jumps=None, real_sleep_s: float = 0.0) -> Daemon:
    cfg = config.parse(cfg_dict, {})
    daemon = Daemon(cfg, source=source, clock=clock,
                    sleep=lambda s: (clock.advance(s), real_sleep_s and time.sleep(real_sleep_s)))
    daemon.components = build_components(cfg, daemon) + [Probe(clock, samples, jumps)]
    for c in daemon.components:
        if c.name == "detection":
            c.schedule = type(c.schedule)(bootstrap=False)   # no forest training subprocess here
    assert daemon.run() == 0
    return daemon


def forecast_component(daemon: Daemon):
    return next(c for c in daemon.components if c.name == "forecast")


def test_memory_leak_gives_bands_an_eta_and_messages_and_survives_gaps_and_jumps(tmp_path, mqtt_broker):
    clock = FakeClock()
    t0 = clock.wall_s
    sink = MqttSink(mqtt_broker.host, mqtt_broker.port, ["devices/fc-1/#"])
    mqtt = {"host": mqtt_broker.host, "port": mqtt_broker.port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5}
    samples = 1200                     # 200 minutes at 10 s
    # the temperature sensor vanishes after 100 min; the wall clock steps back 2 h at 150 min
    daemon = run_daemon(make_config(tmp_path, mqtt), clock, leaking_source(clock, temperature_until=600),
                        samples, jumps={900: -7200.0}, real_sleep_s=0.0005)
    comp = forecast_component(daemon)
    assert daemon.component_errors == 0 and comp.counts["errors"] == 0
    assert comp.counts["clock_resets"] == 1 and comp.counts["exhaustion_events"] >= 1

    db = sqlite3.connect(tmp_path / "state" / "agent.db")
    rows = db.execute("SELECT made_at, step, ts_s, value, lower_80, upper_80, lower_95, upper_95, model "
                      "FROM forecasts WHERE metric = 'system.memoryPercent'").fetchall()
    assert len(rows) >= 12 * 20
    banded = [r for r in rows if r[4] is not None]
    assert len(banded) >= len(rows) // 2
    for made_at, step, ts_s, value, lo80, hi80, lo95, hi95, _model in banded:
        assert ts_s == pytest.approx(made_at + 60.0 * step)
        # conformal bands are the point plus residual quantiles: nested, though a model that lags a
        # trend has them shifted (its residuals are biased); coverage is what must hold, see below
        assert lo95 <= lo80 <= hi80 <= hi95 and lo95 <= value <= hi95
    # the forecast follows the leak: 12 steps ahead is about 3 points above the last value
    last = max(banded, key=lambda r: (r[0], r[1]) if r[1] == 12 else (0, 0))
    minutes = (last[2] - t0) / 60.0
    if last[2] < t0 + samples * INTERVAL_S - 7200:           # made before the clock jump
        assert last[3] == pytest.approx(LEAK_START + LEAK_PER_MIN * minutes, abs=2.0)

    runs = db.execute("SELECT made_at, model, step_s, limit_value, eta_s, eta_lower_s, eta_upper_s FROM forecast_runs "
                      "WHERE metric = 'system.memoryPercent' ORDER BY rowid").fetchall()
    with_eta = [r for r in runs if r[4] is not None]
    assert with_eta and all(r[2] == 60.0 and r[3] == 95.0 for r in runs)
    jump_at = next((i for i in range(1, len(runs)) if runs[i][0] < runs[i - 1][0]), len(runs))
    assert 0 < jump_at < len(runs)                         # forecasts resumed on the new timeline
    for made_at, _m, _s, _limit, eta, lo, hi in runs[:jump_at]:
        if eta is not None:                               # before the jump, wall time = time since start
            value_then = LEAK_START + LEAK_PER_MIN * (made_at - t0) / 60.0
            true_eta = (95.0 - value_then) / LEAK_PER_MIN * 60.0
            assert eta == pytest.approx(true_eta, rel=0.3)
            assert lo is None or lo <= eta
            assert hi is None or eta <= hi
    scores = db.execute("SELECT model, n, mae, mase, coverage_80, coverage_95 FROM forecast_scores "
                        "WHERE metric = 'system.memoryPercent'").fetchall()
    assert {r[0] for r in scores} >= {"fallback", "naive"}
    assert all(r[2] >= 0 and r[1] > 0 for r in scores)
    published = db.execute("SELECT model FROM forecast_runs WHERE metric = 'system.memoryPercent' "
                           "ORDER BY made_at DESC LIMIT 1").fetchone()[0].split(":")[0]
    mae, mase, cov80, cov95 = next(r[2:] for r in scores if r[0] == published)
    assert mase is not None and mase < 5.0 and cov95 >= 0.75 and cov80 >= 0.5, scores

    events = [json.loads(d) for (d,) in db.execute("SELECT doc FROM events WHERE kind = 'exhaustion'")]
    assert events and events[0]["metric"] == "system.memoryPercent"
    assert events[0]["severity"] in ("warning", "critical")
    eta = events[0]["explanation"][0]
    true_eta = (95.0 - eta["value"]) / LEAK_PER_MIN * 60.0
    assert eta["eta_s"] == pytest.approx(true_eta, rel=0.3) and eta["eta_s"] <= 86400.0

    # temperature: forecast while it was sampled, never from stale data after it vanished
    temp = [m for m, in db.execute("SELECT made_at FROM forecast_runs WHERE metric = 'system.temperature' "
                                   "ORDER BY rowid")]
    assert temp and max(temp) <= t0 + 600 * INTERVAL_S + 300.0

    assert sink.wait_for(lambda msgs: any(m.topic == "devices/fc-1/forecasts" for m in msgs), 10)
    assert sink.wait_for(lambda msgs: any(m.topic == "devices/fc-1/anomalies" for m in msgs), 10)
    msgs = [m.json() for m in sink.messages() if m.topic == "devices/fc-1/forecasts"]
    mem = [m for m in msgs if m["metric"] == "system.memoryPercent"]
    assert mem and mem[-1]["kind"] == "forecast" and mem[-1]["horizonSteps"] == 12
    assert mem[-1]["stepSeconds"] == 60.0 and mem[-1]["eta"]["threshold"] == 95.0
    lo, hi = mem[-1]["intervals"]["95"]["lower"], mem[-1]["intervals"]["95"]["upper"]
    assert all(a <= v <= b for a, v, b in zip(lo, mem[-1]["values"], hi))
    # QoS 1 is at least once: a message re-sent after a slow PUBACK may arrive twice, always unchanged
    # (the fleet drops the copy by messageId)
    by_id: dict = {}
    for m in msgs:
        assert by_id.setdefault(m["messageId"], m) == m
    alerts = [m.json() for m in sink.messages() if m.topic == "devices/fc-1/anomalies"]
    assert alerts[0]["eventKind"] == "exhaustion" and alerts[0]["metric"] == "system.memoryPercent"
    assert alerts[0]["eta"]["threshold"] == 95.0 and alerts[0]["eta"]["seconds"] > 0
    sink.close()

    status = comp.status()
    assert status["forecast"]["metrics"]["system.memoryPercent"]["steps"] > 12
    text = render(daemon.runtime_status())            # what the Prometheus endpoint serves
    assert 'edge_agent_forecast_coverage_ratio{metric="system.memoryPercent",level="0.95"}' in text
    assert re.search(r'edge_agent_forecast_mase\{metric="system.memoryPercent",model="[^"]+"\} [0-9.]+', text)
    twin = comp.twin()["forecast"]["system.memoryPercent"]
    assert twin["model"] and twin["etaSeconds"] is not None


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="TensorFlow is not installed")
def test_train_forecast_installs_an_lstm_the_next_daemon_uses(tmp_path):
    clock = FakeClock()
    fc = {"train_epochs": 2, "train_units": 4, "train_seq_len": 12, "publish_every_s": 60.0}
    cfg_dict = make_config(tmp_path, **fc)
    run_daemon(cfg_dict, clock, leaking_source(clock), 1200)             # 200 steps of history
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text(toml(cfg_dict))
    env = dict(os.environ, EDGE_AGENT_CONFIG="")
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "train", "--kind", "forecast", "--config", str(cfg_path)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kind"] == "lstm" and result["version"] == 1 and "system.memoryPercent" in result["metrics"]
    print(f"train --kind forecast took {time.monotonic() - t:.1f} s")

    clock.advance(INTERVAL_S)
    daemon = run_daemon(cfg_dict, clock, leaking_source(clock), 60)        # 10 more minutes
    comp = forecast_component(daemon)
    assert comp.counts["errors"] == 0 and comp.status()["forecast"]["lstm"] == 1
    db = sqlite3.connect(tmp_path / "state" / "agent.db")
    models = {m: v for m, v in db.execute("SELECT DISTINCT model, version FROM forecasts WHERE made_at > ?",
                                          (clock.wall_s - 600,))}
    assert models.get("lstm:v1") == 1, models


def test_train_forecast_without_tensorflow_says_so(tmp_path):
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text(toml(make_config(tmp_path)))
    # a sitecustomize that hides TensorFlow, as on a device without the 'train' extra
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['tensorflow'] = None\n")
    env = dict(os.environ, PYTHONPATH=f"{hide}{os.pathsep}{REPO}", EDGE_AGENT_CONFIG="")
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "train", "--kind", "forecast", "--config", str(cfg_path)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert proc.returncode == 1
    assert "TensorFlow is not installed (install the 'train' extra)" in proc.stderr


def toml(d: dict) -> str:
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)

    return "\n".join(f"[{s}]\n" + "\n".join(f"{k} = {val(v)}" for k, v in kv.items()) + "\n" for s, kv in d.items())
