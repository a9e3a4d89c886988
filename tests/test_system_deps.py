"""scripts/system-deps.sh: what `make test` runs first on a fresh machine.

Installing is not exercised here (it needs root and the network); what the script
decides is: nothing to do when everything is present, and one line naming the
missing packages when it may not install them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "system-deps.sh"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env={**os.environ, **env})


@pytest.mark.skipif(not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())
                    or shutil.which("chromium") is None or shutil.which("systemd-analyze") is None,
                    reason="this machine lacks one of the packages: the all-present case cannot be checked")
def test_nothing_to_do_when_everything_is_present() -> None:
    proc = _run("test", EDGE_SYSTEM_DEPS="skip")
    assert proc.returncode == 0 and proc.stdout == proc.stderr == ""


def test_a_missing_package_is_named_on_one_line_when_it_may_not_be_installed() -> None:
    # PYTHON=false: an interpreter without ensurepip, as on a Debian without python3-venv
    proc = _run("venv", PYTHON="false", EDGE_SYSTEM_DEPS="skip")
    assert proc.returncode == 0 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "python3-venv" in lines[0]
    assert "apt-get install -y --no-install-recommends python3-venv" in lines[0]


def test_make_test_and_ci_go_through_the_script() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "scripts/system-deps.sh test" in makefile and "test: venv system-deps" in makefile
    assert (REPO / ".ci" / "run").read_text().rstrip().endswith("make test")
