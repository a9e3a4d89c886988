"""What the README promises a new user, checked with real files and real CLI runs (issue #24).

Each test names the README sentence it holds to. The commands run as subprocesses from
directories other than the repository, because that is where a user types them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)


def cli(*args: str, cwd: Path, module: str = "agent.cli", timeout_s: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("EDGE_AGENT_CONFIG", None)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout_s)


def write_config(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path


# -- quick start: `make run` uses agent/agent.local.toml; status/export see the same data ----------
def test_make_run_passes_the_local_config_and_its_state_is_the_repositorys_state() -> None:
    recipe = re.search(r"^run:.*\n\t(.+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert recipe.split()[-2:] == ["--config", "agent/agent.local.toml"]
    cfg = config.load(str(REPO / "agent" / "agent.local.toml"), {})
    assert cfg.device_id == "dev-local"
    assert cfg.agent.state_dir.resolve() == (REPO / "state").resolve()  # README: "(state in ./state)"


def test_relative_state_dir_is_relative_to_the_config_file_from_any_directory(tmp_path: Path) -> None:
    conf = write_config(tmp_path / "etc" / "agent.toml",
                        '[agent]\ndevice_id = "here"\nstate_dir = "state"\ninterval_s = 0.2\n'
                        '[store]\ncommit_interval_s = 0.2\n[mqtt]\nenabled = false\n'
                        '[forecast]\nenabled = false\n[detect]\nforest_bootstrap = false\n')
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("EDGE_AGENT_CONFIG", None)
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", "etc/agent.toml"], cwd=tmp_path,
                             env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = cli("status", "--json", "--config", str(conf), cwd=elsewhere)
            if st.stdout and json.loads(st.stdout)["samples"]["count"] >= 3:
                break
            time.sleep(0.5)
    finally:
        agent.send_signal(signal.SIGINT)
        _, err = agent.communicate(timeout=30)
    assert agent.returncode == 0, err
    assert f"state {tmp_path / 'etc' / 'state'}" in err and "config etc/agent.toml" in err
    doc = json.loads(cli("status", "--json", "--config", str(conf), cwd=elsewhere).stdout)
    assert doc["device_id"] == "here" and doc["samples"]["count"] >= 3
    assert doc["database"]["path"] == str(tmp_path / "etc" / "state" / "agent.db")
    assert not (elsewhere / "state").exists() and not (tmp_path / "state").exists()
    out = cli("export", "--config", str(conf), "--out", "rows.csv", cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert len((elsewhere / "rows.csv").read_text().splitlines()) == doc["samples"]["count"] + 1


def test_environment_state_dir_stays_relative_to_the_working_directory(tmp_path: Path) -> None:
    conf = write_config(tmp_path / "etc" / "agent.toml", '[agent]\nstate_dir = "state"\n'
                        '[models]\ntrusted_keys = ["keys/a.pub", "/abs/b.pub"]\n')
    assert config.load(str(conf), {}).agent.state_dir == tmp_path / "etc" / "state"
    assert config.load(str(conf), {}).models.trusted_keys == (str(tmp_path / "etc" / "keys/a.pub"), "/abs/b.pub")
    assert config.load(str(conf), {"EDGE_AGENT_AGENT_STATE_DIR": "var"}).agent.state_dir == Path("var")


# -- "A configuration error prints one line naming the key and what is allowed, and exits 2" -------
@pytest.mark.parametrize("command", [["status"], ["run"], ["export"]])
def test_a_counter_as_detect_feature_is_a_config_error_for_every_command(tmp_path: Path, command: list[str]) -> None:
    conf = write_config(tmp_path / "agent.toml", f'[agent]\nstate_dir = "{tmp_path / "s"}"\n[mqtt]\nenabled = false\n'
                        '[detect]\nfeatures = ["system.memoryTotal"]\n')
    proc = cli(*command, "--config", str(conf), cwd=tmp_path, timeout_s=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "detect.features" in proc.stderr and "system.memoryTotal" in proc.stderr
    assert not (tmp_path / "s").exists()  # nothing started


# -- bad input never exits 0 ------------------------------------------------------------------
def _sampled(tmp_path: Path, samples: int = 12) -> Path:
    """A config whose state holds real samples written by the real daemon (fake psutil and clock)."""
    from agent.daemon import Daemon
    from tests.fakes import FakeClock, FakeSource
    from tests.test_daemon import StopAfter

    conf = write_config(tmp_path / "agent.toml", '[agent]\ndevice_id = "bad-in"\nstate_dir = "state"\n'
                        '[mqtt]\nenabled = false\n')
    clock = FakeClock(wall_s=time.time() - samples)
    Daemon(config.load(str(conf), {}), source=FakeSource(clock), clock=clock, components=[StopAfter(samples)],
           sleep=clock.sleep).run()
    return conf


def test_export_of_an_unknown_metric_is_refused_and_names_the_stored_ones(tmp_path: Path) -> None:
    conf = _sampled(tmp_path)
    proc = cli("export", "--config", str(conf), "--metrics", "system.cpuUsage,nosuch.metric", "--out", "x.csv",
               cwd=tmp_path)
    assert proc.returncode == 2 and "nosuch.metric" in proc.stderr and "system.cpuUsage" in proc.stderr
    assert not (tmp_path / "x.csv").exists()
    ok = cli("export", "--config", str(conf), "--metrics", "system.cpuUsage", "--out", "y.csv", cwd=tmp_path)
    assert ok.returncode == 0 and len((tmp_path / "y.csv").read_text().splitlines()) == 13


@pytest.mark.parametrize("command", [["export", "--out", "x.csv"], ["report", "--out", "x.html"]])
def test_export_and_report_without_a_database_fail_and_create_nothing(tmp_path: Path, command: list[str]) -> None:
    conf = write_config(tmp_path / "agent.toml", '[agent]\nstate_dir = "nostate"\n[mqtt]\nenabled = false\n')
    for _ in range(2):  # the second run must not find a database the first one created
        proc = cli(*command, "--config", str(conf), cwd=tmp_path)
        assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr
    assert not (tmp_path / "nostate").exists() and not (tmp_path / command[-1]).exists()


def test_report_of_an_empty_database_fails(tmp_path: Path) -> None:
    from agent.store import Store

    conf = write_config(tmp_path / "agent.toml", '[agent]\nstate_dir = "state"\n[mqtt]\nenabled = false\n')
    Store(config.load(str(conf), {}).db_path).close()
    proc = cli("report", "--config", str(conf), "--out", "r.html", cwd=tmp_path)
    assert proc.returncode == 2 and "no samples" in proc.stderr and not (tmp_path / "r.html").exists()


def test_replay_of_a_csv_without_numbers_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "text.csv"
    text.write_text("timestamp,host,state\n" + "".join(f"{1700000000 + i},pi-{i},ok\n" for i in range(50)))
    proc = cli("replay", str(text), "--out", "o.csv", cwd=tmp_path)
    assert proc.returncode == 2 and "no numeric value column" in proc.stderr, proc.stderr
    assert not (tmp_path / "o.csv").exists()
    proc = cli("replay", str(text), "--out", "o.csv", "--value-cols", "state", cwd=tmp_path)
    assert proc.returncode == 2 and "without a single number: state" in proc.stderr
    # a text column beside a numeric one is left out, the numeric one is scored
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("timestamp,host,value\n" + "".join(f"{1700000000 + i},pi,{i % 7}\n" for i in range(60)))
    proc = cli("replay", str(mixed), "--out", "o.csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "o.csv").read_text().splitlines()) == 61


@pytest.mark.parametrize("value", ["0", "-5", "ten"])
def test_replay_train_rows_must_be_positive(tmp_path: Path, value: str) -> None:
    data = tmp_path / "v.csv"
    data.write_text("timestamp,value\n" + "".join(f"{1700000000 + i},{i % 5}\n" for i in range(40)))
    proc = cli("replay", str(data), "--out", "o.csv", "--train-rows", value, cwd=tmp_path)
    assert proc.returncode == 2 and "--train-rows" in proc.stderr and "integer >= 1" in proc.stderr
    assert not (tmp_path / "o.csv").exists()


# -- "--version must grow for each target": the fleet numbers above what devices saw ----------------
def test_fleet_versions_continue_above_a_version_the_device_named_in_a_model_event(tmp_path: Path) -> None:
    from agent.payloads import model_event
    from fleet.collect import Collector
    from fleet.config import config_from_dict
    from fleet.registry import Registry
    from fleet.store import open_store
    from models.bundle import Target

    cfg = config_from_dict({"fleet": {"state_dir": str(tmp_path / "fleet")}}, {})
    store = open_store(cfg.store_url)
    collector = Collector(store, cfg)
    pi = Target("device", "pi-01")
    assert Registry(store).next_version(pi) == 1
    # the hand-made v1 of the README's "Shipping a model", as the device reports it (no twin collected),
    # and a rolled-back v3: refused by the device for good
    for event, version in (("installed", 1), ("rolled_back", 3)):
        doc = model_event("pi-01", time.time(), event=event, model_kind="forest", version=version,
                          target=pi.label, reason=f"{event} forest v{version}")
        collector.submit("devices/pi-01/model-events", json.dumps(doc).encode())
    collector.pump(0.5)
    assert collector.flush() and collector.stats.bad == {}
    assert Registry(store).next_version(pi) == 4
    assert Registry(store).next_version(Target("fleet", "all")) == 1  # other targets are not affected
    store.close()


# -- the report page shows "forest v1 fleet", not "forest v1 [object Object]" ---------------------
from tests.test_missing_features import forest_dir, signed  # noqa: E402,F401  (module fixture + bundle helper)


def test_report_and_status_show_the_model_target_as_its_label(tmp_path: Path, forest_dir: Path) -> None:
    import sqlite3

    from agent.updates import ModelUpdater
    from models.forest import load_forest_model
    from tests.fakes import FakeClock

    conf = _sampled(tmp_path)
    cfg = config.load(str(conf), {})
    data, pub = signed(tmp_path, forest_dir, 1)
    conn = sqlite3.connect(cfg.db_path, isolation_level=None)
    updater = ModelUpdater(cfg.agent.state_dir, conn, [pub], cfg.device_id, (),
                           available_metrics={"system.cpuUsage", "system.memoryPercent", "system.temperature"},
                           clock=FakeClock(), loaders={"forest": load_forest_model})
    assert updater.offer(data, "fleet/all/models").accepted
    conn.close()
    st = json.loads(cli("status", "--json", "--config", str(conf), cwd=tmp_path).stdout)
    assert [(m["kind"], m["version"], m["target"]) for m in st["models"]] == [("forest", 1, "fleet")]
    assert cli("report", "--config", str(conf), "--out", "r.html", cwd=tmp_path).returncode == 0
    html = (tmp_path / "r.html").read_text()
    payload = json.loads(re.search(r"window\.EDGE_DATA = (\{.*?\});\n", html, re.S).group(1))
    assert [(m["kind"], m["target"]) for m in payload["status"]["models"]] == [("forest", "fleet")]


# -- simulate: "noise cut from the NAB traces when ../shared/datasets/nab exists, synthetic otherwise" ----
NAB = Path("/work/shared/datasets/nab") if Path("/work/shared/datasets/nab").is_dir() else \
    REPO.parent / "shared" / "datasets" / "nab"


def test_simulate_finds_nab_from_the_working_directory_and_says_which_noise(tmp_path: Path, monkeypatch) -> None:
    if not (NAB / "data").is_dir():
        pytest.skip("NAB data not available")
    monkeypatch.delenv("EDGE_DATASETS", raising=False)
    (tmp_path / "shared" / "datasets").mkdir(parents=True)
    (tmp_path / "shared" / "datasets" / "nab").symlink_to(NAB.resolve())
    work = tmp_path / "work"
    work.mkdir()
    args = ("simulate", "--devices", "3", "--days", "1", "--seed", "2", "--out", "sim")
    proc = cli(*args, cwd=work, module="fleet.cli")
    assert proc.returncode == 0, proc.stderr
    assert f"noise: NAB traces from {tmp_path / 'shared' / 'datasets' / 'nab'}" in proc.stdout
    lonely = tmp_path / "lonely" / "dir"
    lonely.mkdir(parents=True)
    proc = cli(*args, "--json", cwd=lonely, module="fleet.cli")
    if json.loads(proc.stdout)["noise"] == "synthetic":  # the repository's parent may hold NAB too
        assert "no NAB data at" in proc.stderr and "synthetic noise" in proc.stderr
    bad = cli(*args, "--datasets", str(tmp_path / "nowhere"), cwd=work, module="fleet.cli")
    assert bad.returncode == 2 and "--datasets: no NAB data at" in bad.stderr


# -- edge-fleet --version; fleet logs carry UTC timestamps and plain values -------------------------
def test_edge_fleet_version_and_timestamped_logs(tmp_path: Path) -> None:
    from agent import __version__
    from tests.conftest import free_port

    version = cli("--version", cwd=tmp_path, module="fleet.cli")
    assert version.returncode == 0 and version.stdout.strip() == f"edge-fleet {__version__}"
    conf = write_config(tmp_path / "fleet.toml", f'[fleet]\nstate_dir = "fl"\n[mqtt]\nport = {free_port()}\n')
    proc = cli("collect", "--config", str(conf), "--duration", "1", "-v", cwd=tmp_path, module="fleet.cli")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and all(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR) fleet\.", ln)
                         for ln in lines), lines
    assert not any("{'" in ln for ln in lines)


def test_fleet_summaries_are_logged_as_json_not_python_reprs(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    import threading

    from fleet.collect import Collector
    from fleet.config import config_from_dict
    from fleet.store import open_store

    from tests.conftest import free_port

    # no broker listens there: the collector runs on, and its summary line is what is checked
    cfg = config_from_dict({"fleet": {"state_dir": str(tmp_path / "fl")}, "mqtt": {"port": free_port()}}, {})
    store = open_store(cfg.store_url)
    collector = Collector(store, cfg)
    stop = threading.Event()
    with caplog.at_level(logging.INFO, logger="fleet.collect"):
        timer = threading.Timer(0.5, stop.set)
        timer.start()
        collector.run(stop, report_every_s=0.0)
    store.close()
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("collector: ")]
    assert summaries and json.loads(summaries[0][len("collector: "):])["received"] == 0


# -- status prints values in their units, not raw floats ------------------------------------------
def test_status_text_prints_units_not_raw_floats(tmp_path: Path) -> None:
    conf = _sampled(tmp_path)
    out = cli("status", "--config", str(conf), cwd=tmp_path).stdout
    last = dict(re.findall(r"^  (\S+)\s+(.+)$", out.split("last sample\n", 1)[1], re.M))
    assert last["system.memoryTotal"] == "1 GB" and last["system.memoryUsed"] == "400 MB"  # fake psutil: 1e9, 4e8
    assert last["system.memoryPercent"] == "40.0 %" and last["system.cpuUsage"] == "12.0 %"
    assert last["system.diskTotal"] == "32 GB" and last["network.bytesReceivedPerSec"] == "2 kB/s"
    assert not re.search(r"\de\+\d", out)


# -- conveniences: edge-agent config, run --once/--test, -v/--debug, --help for every option -------
def test_edge_agent_config_prints_the_effective_configuration_that_parses_back(tmp_path: Path) -> None:
    import tomllib

    conf = write_config(tmp_path / "agent.toml", '[agent]\ndevice_id = "cfg-1"\nstate_dir = "st"\n'
                        '[mqtt]\nport = 8883\npassword = "hunter2"\n')
    env = {"EDGE_AGENT_AGENT_GROUPS": "barn,north"}
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "config", "--config", str(conf)], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), **env}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "hunter2" not in proc.stdout and 'password = "***"' in proc.stdout
    shown = tomllib.loads(proc.stdout)
    assert shown["agent"]["state_dir"] == str(tmp_path / "st") and shown["agent"]["groups"] == ["barn", "north"]
    assert shown["mqtt"]["port"] == 8883 and shown["detect"]["z_warning"] == 4.0
    shown["mqtt"]["password"] = "hunter2"
    assert config.parse(shown, {}, source=str(conf)) == config.load(str(conf), env)
    secrets = cli("config", "--config", str(conf), "--show-secrets", cwd=tmp_path)
    assert 'password = "hunter2"' in secrets.stdout
    sample = cli("config", "--sample", cwd=tmp_path)
    assert sample.returncode == 0 and sample.stdout == (REPO / "agent" / "agent.example.toml").read_text()
    config.parse(tomllib.loads(sample.stdout), {})  # the sample is a valid configuration


def test_run_once_scores_one_sample_on_the_buffered_history_and_stores_nothing(tmp_path: Path) -> None:
    from agent.oneshot import sample_and_score
    from agent.store import Store
    from tests.fakes import FakeClock, FakeSource

    conf = _sampled(tmp_path, samples=60)
    cfg = config.load(str(conf), {})
    clock = FakeClock(wall_s=time.time())
    spiky = FakeSource(clock, cpu_percent=97.0)   # the buffer saw 12 % all along
    doc = sample_and_score(cfg, spiky, clock, clock.sleep)
    assert doc["warmed_on"] == 60 and doc["zscore_ready"] and doc["values"]["system.cpuUsage"] == 97.0
    assert doc["severity"] == "critical" and doc["z_max"] >= 6 and "system.cpuUsage" in doc["explanation"][0]
    store = Store(cfg.db_path)
    try:
        assert len(store.samples()) == 60
    finally:
        store.close()


@pytest.mark.parametrize("flag", ["--once", "--test"])
def test_run_once_on_this_machine_prints_a_sample_and_creates_no_state(tmp_path: Path, flag: str) -> None:
    conf = write_config(tmp_path / "agent.toml", '[agent]\nstate_dir = "st"\ninterval_s = 0.2\n')
    proc = cli("run", flag, "--config", str(conf), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "(nothing stored or sent)" in proc.stdout and re.search(r"^  system\.cpuUsage +\d+\.\d %$", proc.stdout, re.M)
    assert "warmed on 0 buffered samples" in proc.stdout and "severity normal" in proc.stdout
    assert not (tmp_path / "st").exists()
    assert "warming the detector" not in proc.stderr
    debug = cli("run", flag, "-v", "--config", str(conf), cwd=tmp_path)
    assert re.search(r" DEBUG agent\.oneshot: warming the detector on 0 buffered samples", debug.stderr), debug.stderr
    assert cli("run", flag, "--debug", "--config", str(conf), cwd=tmp_path).stderr.count(" DEBUG ") >= 1


def _options(parser) -> list[tuple[str, str]]:
    """(command, option) for every argument without help text, through every subcommand."""
    import argparse

    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _options(sub)
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)) and not action.help:
            out.append((parser.prog, "/".join(action.option_strings) or action.dest))
    return out


@pytest.mark.parametrize("module", ["agent.cli", "fleet.cli"])
def test_every_option_of_every_command_has_help_text(module: str) -> None:
    import importlib

    parser = importlib.import_module(module).build_parser()
    assert _options(parser) == []
