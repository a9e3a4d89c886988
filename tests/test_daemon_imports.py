"""The running daemon keeps training and one-shot libraries out of its memory (bench/footprint.py measures it)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("tensorflow", "keras", "sklearn", "cryptography", "sqlite_utils", "pandas", "scipy")

PROBE = r"""
import os, signal, sys, threading, time
def later():
    time.sleep(4.0)
    open(sys.argv[2], "w").write("\n".join(sorted(sys.modules)))
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=later, daemon=True).start()
from agent.cli import main
sys.exit(main(["run", "--config", sys.argv[1]]))
"""


def test_steady_state_daemon_imports_no_training_or_crypto_library(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\ndevice_id = "imports"\nstate_dir = "{tmp_path}/state"\ninterval_s = 0.2\n'
                   '[mqtt]\nhost = "127.0.0.1"\nport = 1\n')
    out = tmp_path / "modules.txt"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(cfg), str(out)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert out.exists(), proc.stderr[-2000:]
    modules = set(out.read_text().split())
    assert "agent.daemon" in modules and "numpy" in modules            # it really ran the daemon
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY) == []
