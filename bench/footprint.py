#!/usr/bin/env python3
"""Footprint of the real agent: CPU % of one core and peak RSS while it runs at 1 Hz.

Starts ``edge-agent run`` as a subprocess with a throw-away state directory and
no reachable broker (the worst case for the outbox), lets it warm up, then
measures CPU time over the window from /proc and the peak RSS (VmHWM).

    python bench/footprint.py [--seconds 60] [--interval 1.0] [--config extra.toml]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--extra", default="", help="extra TOML appended to the generated config (e.g. to turn features on)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "agent.toml"
        cfg.write_text(
            f'[agent]\ndevice_id = "bench"\nstate_dir = "{tmp}/state"\ninterval_s = {args.interval}\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = 1\n' + args.extra
        )
        exe = [sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)]
        proc = subprocess.Popen(exe, cwd=REPO, stderr=subprocess.DEVNULL)
        try:
            time.sleep(args.warmup)
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(args.seconds)
            cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
            rss_kb = status_kb(proc.pid, "VmRSS")
            hwm_kb = status_kb(proc.pid, "VmHWM")
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=10)
        cpu_pct = 100.0 * (cpu1 - cpu0) / (t1 - t0)
        print(f"agent footprint over {t1 - t0:.0f} s at {1 / args.interval:g} Hz (warm-up {args.warmup:g} s excluded)")
        print(f"  cpu           {cpu_pct:.2f} % of one core   (target <= 0.5 %)")
        print(f"  rss now       {rss_kb / 1024:.1f} MB")
        print(f"  rss peak      {hwm_kb / 1024:.1f} MB         (target <= 30 MB)")
        print(f"  exit code     {rc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
