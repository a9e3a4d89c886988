"""The real agent process under systemd's notify protocol and scraped by Prometheus."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path, extra=""):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\ndevice_id = "prod"\nstate_dir = "{tmp_path / "state"}"\ninterval_s = 0.1\n'
                   f'[mqtt]\nenabled = false\n{extra}')
    return cfg


def test_ready_watchdog_stopping_over_a_real_notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"\0edge-agent-test-{os.getpid()}"
    sock.bind(name)
    sock.settimeout(15)
    env = dict(os.environ, NOTIFY_SOCKET="@" + name[1:], WATCHDOG_USEC="400000")
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(_config(tmp_path))], cwd=REPO,
                            env=env, stderr=subprocess.DEVNULL)
    seen = []
    try:
        while seen.count("WATCHDOG=1") < 3:
            seen.extend(sock.recv(4096).decode().splitlines())
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in seen:
            seen.extend(sock.recv(4096).decode().splitlines())
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        sock.close()
    assert seen.index("READY=1") < seen.index("WATCHDOG=1") < seen.index("STOPPING=1")


def test_metrics_endpoint_serves_agent_health_and_samples(tmp_path):
    port = _free_port()
    cfg = _config(tmp_path, f"[metrics]\nenabled = true\nport = {port}\n")
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)], cwd=REPO,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        families = {}
        while time.monotonic() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                families = {f.name: f for f in text_string_to_metric_families(body)}
                if "edge_agent_metric" in families:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        names = {s.labels["name"] for s in families["edge_agent_metric"].samples}
        assert {"system.cpuUsage", "system.memoryUsed", "system.diskPercent"} <= names
        taken = [s.value for s in families["edge_agent_samples"].samples if s.name == "edge_agent_samples_total"]
        assert taken and taken[0] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
