"""systemd units (verify, security exposure, the directives the agent relies on) and install.sh."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "systemd"
UNITS = ("edge-agent.service", "edge-fleet-retrain.service", "edge-fleet-retrain.timer")
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; repeated keys stay separate, as systemd reads them."""
    out, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def one(path: Path, key: str) -> str:
    values = [v for _, k, v in directives(path) if k == key]
    assert len(values) == 1, f"{key} appears {len(values)} times in {path.name}"
    return values[0]


# -- unit contents ----------------------------------------------------------------------------

def test_agent_unit_contract() -> None:
    unit = SYSTEMD / "edge-agent.service"
    assert one(unit, "Type") == "notify"
    assert one(unit, "ExecStart") == "/opt/edge-agent/venv/bin/edge-agent run --config /etc/edge-agent/agent.toml"
    assert one(unit, "Restart") == "on-failure"
    assert one(unit, "User") == "edge-agent"
    assert one(unit, "StateDirectory") == "edge-agent"
    assert one(unit, "ConfigurationDirectory") == "edge-agent"
    assert one(unit, "ProtectSystem") == "strict"
    assert one(unit, "CapabilityBoundingSet") == ""
    assert one(unit, "NoNewPrivileges") == "yes"
    assert re.fullmatch(r"\d+s", one(unit, "WatchdogSec"))
    keys = {k for _, k, _ in directives(unit)}
    assert "LogsDirectory" not in keys  # logs go to the journal
    for key in ("ProtectHome", "PrivateTmp", "MemoryMax", "CPUQuota", "SystemCallFilter"):
        assert key in keys


def test_agent_unit_keeps_every_metric_source_readable() -> None:
    """ProcSubset=pid would hide /proc/stat, meminfo, diskstats, net/dev and loadavg."""
    unit = SYSTEMD / "edge-agent.service"
    values = {k: v for _, k, v in directives(unit)}
    assert values.get("ProcSubset", "all") == "all"
    # invisible would make system.processCount count only the agent's own processes.
    assert values.get("ProtectProc", "default") == "default"
    hidden = " ".join(v for _, k, v in directives(unit) if k in ("InaccessiblePaths", "TemporaryFileSystem"))
    for needed in ("/proc", "/sys"):
        assert needed not in hidden
    families = set(one(unit, "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}  # notify + journal, MQTT, metrics endpoint
    # The state directory the unit makes writable is the one the agent is told to use.
    assert "EDGE_AGENT_AGENT_STATE_DIR=%S/edge-agent" in [v for _, k, v in directives(unit) if k == "Environment"]


def test_exec_start_names_the_console_scripts_setup_py_installs() -> None:
    setup_py = (REPO / "setup.py").read_text()
    for unit, script in (("edge-agent.service", "edge-agent"), ("edge-fleet-retrain.service", "edge-fleet")):
        exec_start = one(SYSTEMD / unit, "ExecStart")
        assert exec_start.split()[0] == f"/opt/edge-agent/venv/bin/{script}"
        assert f'"{script}=' in setup_py


def test_retrain_timer() -> None:
    timer = SYSTEMD / "edge-fleet-retrain.timer"
    assert one(timer, "OnCalendar") == "daily"
    assert one(timer, "Persistent") == "true"
    assert one(timer, "RandomizedDelaySec")
    assert one(timer, "Unit") == "edge-fleet-retrain.service"
    assert one(SYSTEMD / "edge-fleet-retrain.service", "Type") == "oneshot"
    assert one(SYSTEMD / "edge-fleet-retrain.service", "ExecStart").endswith("edge-fleet retrain")


# -- systemd-analyze --------------------------------------------------------------------------

def runnable_copies(tmp_path: Path) -> list[Path]:
    """verify insists that ExecStart exists: point the copies at a real binary, change nothing else."""
    true_bin = shutil.which("true") or "/bin/true"
    out = []
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        text = re.sub(r"^ExecStart=/opt/edge-agent/venv/bin/\S+", f"ExecStart={true_bin}", text, flags=re.M)
        (tmp_path / name).write_text(text)
        out.append(tmp_path / name)
    return out


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    copies = runnable_copies(tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, copies)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    # verify exits 0 on unknown keys and bad values, printing them: any line about our files fails.
    ours = [line for line in output.splitlines() if any(name in line for name in UNITS)]
    assert proc.returncode == 0, output
    assert ours == [], "\n".join(ours)


@needs_analyze
def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    """The check above is only worth something if verify reports what we filter for."""
    bad = tmp_path / "edge-agent.service"
    bad.write_text(runnable_copies(tmp_path)[0].read_text().replace("Nice=5", "Nice=5\nProtectSytem=strict"))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(bad)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "ProtectSytem" in proc.stdout + proc.stderr


def exposure(unit: Path) -> float:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1))


@needs_analyze
@pytest.mark.parametrize("name", ["edge-agent.service", "edge-fleet-retrain.service"])
def test_security_exposure(name: str) -> None:
    score = exposure(SYSTEMD / name)
    print(f"{name}: systemd-analyze security exposure {score}")
    assert score <= MAX_EXPOSURE


# -- install.sh -------------------------------------------------------------------------------

@pytest.fixture
def shims(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Stand-ins for commands that change the live system: they only log that they were called."""
    bin_dir, log = tmp_path / "shims", tmp_path / "shims.log"
    bin_dir.mkdir()
    for name in ("useradd", "userdel", "systemctl", "chown", "pip", "python3", "getent"):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit 0\n')
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFIX", "DESTDIR", "DRY_RUN", "SRC", "PYTHON")}
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    return env, log


def install_sh(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["bash", str(SYSTEMD / "install.sh"), *args],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_install_sh_is_strict_bash() -> None:
    text = (SYSTEMD / "install.sh").read_text()
    assert "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(SYSTEMD / "install.sh")], check=True, timeout=30)


def test_install_into_a_temporary_root(tmp_path: Path, shims: tuple[dict[str, str], Path]) -> None:
    env, log = shims
    root = tmp_path / "root"
    etc_before = Path("/etc/edge-agent").exists()
    proc = install_sh(env, "install", "--dry-run", "--destdir", str(root), "--prefix", "/srv/ea")
    assert not log.exists(), f"a live-system command ran: {log.read_text()}"
    assert Path("/etc/edge-agent").exists() == etc_before  # nothing outside the temporary root

    unit = root / "etc/systemd/system/edge-agent.service"
    assert one(unit, "ExecStart") == "/srv/ea/venv/bin/edge-agent run --config /etc/edge-agent/agent.toml"
    assert (SYSTEMD / "edge-agent.service").read_text().count("Type=notify") == unit.read_text().count("Type=notify")
    config = root / "etc/edge-agent/agent.toml"
    assert config.read_bytes() == (REPO / "agent/agent.example.toml").read_bytes()
    assert stat.S_IMODE(config.stat().st_mode) == 0o640  # may hold the MQTT password

    out = proc.stdout
    assert "would run: useradd --system" in out and " edge-agent" in out
    assert re.search(r"would run: /srv/ea/venv/bin/python -m pip install .*\\\[edge\\\]", out)
    assert "would run: systemctl daemon-reload" in out
    assert "would run: systemctl enable --now edge-agent.service" in out


def test_install_is_idempotent_and_keeps_an_edited_config(tmp_path: Path, shims: tuple[dict[str, str], Path]) -> None:
    env, log = shims
    root = tmp_path / "root"
    install_sh(env, "install", "--dry-run", "--destdir", str(root))
    config = root / "etc/edge-agent/agent.toml"
    config.write_text('[agent]\ndevice_id = "barn-7"\n')
    unit = root / "etc/systemd/system/edge-agent.service"
    unit_before = unit.read_text()
    proc = install_sh(env, "install", "--dry-run", "--destdir", str(root))
    assert config.read_text() == '[agent]\ndevice_id = "barn-7"\n'
    assert "agent.toml exists, kept" in proc.stdout
    assert "edge-agent.service unchanged" in proc.stdout
    assert unit.read_text() == unit_before
    assert not log.exists()


def test_uninstall_keeps_config_unless_purged(tmp_path: Path, shims: tuple[dict[str, str], Path]) -> None:
    env, log = shims
    root = tmp_path / "root"
    install_sh(env, "install", "--dry-run", "--destdir", str(root))
    (root / "var/lib/edge-agent").mkdir(parents=True)
    (root / "var/lib/edge-agent/agent.db").write_bytes(b"state")

    proc = install_sh(env, "uninstall", "--dry-run", "--destdir", str(root))
    assert not (root / "etc/systemd/system/edge-agent.service").exists()
    assert (root / "etc/edge-agent/agent.toml").exists()
    assert (root / "var/lib/edge-agent/agent.db").exists()
    assert "would run: systemctl disable --now edge-agent.service" in proc.stdout
    assert "userdel" not in proc.stdout

    proc = install_sh(env, "uninstall", "--dry-run", "--purge", "--destdir", str(root))
    assert not (root / "etc/edge-agent").exists()
    assert not (root / "var/lib/edge-agent").exists()
    assert "would run: userdel edge-agent" in proc.stdout
    assert not log.exists()


def test_fleet_role_installs_the_timer(tmp_path: Path, shims: tuple[dict[str, str], Path]) -> None:
    env, log = shims
    root = tmp_path / "root"
    proc = install_sh(env, "install", "--role", "fleet", "--dry-run", "--destdir", str(root))
    units = root / "etc/systemd/system"
    assert sorted(p.name for p in units.iterdir()) == ["edge-fleet-retrain.service", "edge-fleet-retrain.timer"]
    assert "would run: systemctl enable --now edge-fleet-retrain.timer" in proc.stdout
    assert re.search(r"pip install .*\\\[train\\,fleet\\\]", proc.stdout)
    conf = root / "etc/edge-fleet/fleet.toml"
    assert conf.read_text() == (REPO / "fleet/fleet.example.toml").read_text()
    assert not log.exists()


def test_dry_run_without_destdir_writes_nothing(tmp_path: Path, shims: tuple[dict[str, str], Path]) -> None:
    env, log = shims
    proc = install_sh(env, "install", "--dry-run", "--prefix", str(tmp_path / "opt"))
    assert "would run: install -m 0644" in proc.stdout
    assert not (tmp_path / "opt").exists()
    assert not log.exists()


def test_bad_arguments_fail_with_a_message(shims: tuple[dict[str, str], Path]) -> None:
    env, _ = shims
    for args, message in ((["install", "--prefix", "relative"], "absolute path"),
                          (["frobnicate"], "unknown argument"),
                          ([], "say install or uninstall"),
                          (["install", "--role", "cloud"], "agent or fleet")):
        proc = subprocess.run(["bash", str(SYSTEMD / "install.sh"), *args],
                              capture_output=True, text=True, timeout=30, env=env)
        assert proc.returncode != 0 and message in proc.stderr
