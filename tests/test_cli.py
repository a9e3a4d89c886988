import csv
import io
import json
import subprocess
import sys
from pathlib import Path

from agent import cli, config
from agent.daemon import Daemon
from tests.fakes import FakeClock, FakeSource
from tests.test_daemon import StopAfter

REPO = Path(__file__).resolve().parents[1]


def _populate(tmp_path, samples=20):
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text(f'[agent]\ndevice_id = "cli-1"\nstate_dir = "{tmp_path / "state"}"\n[mqtt]\nenabled = false\n')
    cfg = config.load(str(cfg_file), {})
    clock = FakeClock(wall_s=1_700_000_000.0)
    Daemon(cfg, source=FakeSource(clock), clock=clock, components=[StopAfter(samples)], sleep=clock.sleep).run()
    return cfg_file


def test_status_json_has_the_contract_keys(tmp_path, capsys):
    cfg_file = _populate(tmp_path)
    assert cli.main(["status", "--json", "--config", str(cfg_file)]) == 1  # stopped agent: unhealthy
    doc = json.loads(capsys.readouterr().out)
    assert {p["code"] for p in doc["health"]["problems"]} >= {"not_running", "stale_samples"}
    assert doc["device_id"] == "cli-1"
    assert doc["samples"] == {"count": 20, "oldest": 1_700_000_000.0, "newest": 1_700_000_019.0}
    assert doc["events"]["count"] == 0
    assert set(doc["outbox"]) >= {"depth", "dropped"} and "connected" in doc["mqtt"]
    assert isinstance(doc["models"], list)
    assert doc["running"] is False  # the daemon above has stopped
    assert doc["last_sample"]["system.cpuUsage"] == 12.0


def test_status_text_on_an_empty_state_dir(tmp_path, capsys):
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text(f'[agent]\nstate_dir = "{tmp_path / "none"}"\n')
    assert cli.main(["status", "--config", str(cfg_file)]) == 1
    out = capsys.readouterr().out
    assert "samples     0" in out and "UNHEALTHY" in out
    assert not (tmp_path / "none").exists()  # status never creates state


def test_export_csv_and_jsonl_ranges(tmp_path, capsys):
    cfg_file = _populate(tmp_path)
    out = tmp_path / "x.csv"
    assert cli.main(["export", "--config", str(cfg_file), "--since", "1700000005", "--until", "2023-11-14T22:13:34Z",
                     "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 10  # ts 5..14 inclusive
    assert rows[0]["timestamp"] == "2023-11-14T22:13:25.000Z" and float(rows[0]["system.cpuUsage"]) == 12.0
    assert rows[1]["network.bytesReceivedPerSec"] == "2000.0"
    assert cli.main(["export", "--config", str(cfg_file), "--format", "jsonl", "--metrics", "system.cpuUsage"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 20 and json.loads(lines[0])["system.cpuUsage"] == 12.0
    assert set(json.loads(lines[0])) == {"timestamp", "ts_s", "system.cpuUsage"}


def test_bad_time_argument_is_a_usage_error(tmp_path):
    cfg_file = _populate(tmp_path, samples=2)
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "export", "--config", str(cfg_file), "--since", "yesterday"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "expected ISO 8601 or epoch seconds" in proc.stderr and "Traceback" not in proc.stderr


def test_export_feeds_back_into_csv_readers(tmp_path):
    cfg_file = _populate(tmp_path, samples=3)
    buf = io.StringIO()
    from agent.export import export
    from agent.store import Store

    store = Store(config.load(str(cfg_file), {}).db_path)
    assert export(store, buf, "csv") == 3
    header = buf.getvalue().splitlines()[0].split(",")
    assert header[0] == "timestamp" and "system.memoryUsed" in header


def test_status_of_a_running_agent_is_healthy(tmp_path):
    import time

    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text(f'[agent]\ndevice_id = "live"\nstate_dir = "{tmp_path / "state"}"\ninterval_s = 0.2\n'
                        '[store]\ncommit_interval_s = 0.5\n[mqtt]\nenabled = false\n')
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg_file)], cwd=REPO,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            st = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--json", "--config", str(cfg_file)],
                                capture_output=True, text=True, cwd=REPO, timeout=60)
            if st.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        doc = json.loads(st.stdout)
        assert st.returncode == 0, doc["health"]
        assert doc["running"] is True and doc["health"] == {"ok": True, "problems": []}
        assert doc["runtime"]["samples_taken"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
