"""What the README promises a new user, checked with real files and real CLI runs (issue #24).

Each test names the README sentence it holds to. The commands run as subprocesses from
directories other than the repository, because that is where a user types them.
"""
from __future__ import annotations

import json
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
