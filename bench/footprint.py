#!/usr/bin/env python3
"""Footprint of the real agent with everything on, beside collectd and a bare psutil loop, same window.

Everything on: a forest trained and installed by ``edge-agent train --kind forest``, an LSTM trained
and installed by ``edge-agent train --kind forecast`` (both on a seeded history, before the window; the
peak RSS of each training run and of a bare ``import tensorflow`` is printed too), a real mosquitto on
an ephemeral port with the agent connected, the web UI and the Prometheus endpoint on.

Beside it, measured in the same window: collectd at 1 s (cpu, memory, df, disk, interface, load,
csv writer; its own config in the temp dir) and a bare Python loop taking one psutil sample a second.

Per process: CPU % of one core (utime+stime from /proc), RSS mean / median / max from
/proc/PID/status every 0.5 s, PSS from /proc/PID/smaps_rollup, the largest RSS spike with its time
and cause (agent log lines and child processes around it), fsyncs per minute (a counted strace pass
after the window, so strace does not perturb the CPU figure), and per-sample CPU ms. A py-spy pass
after that names the agent's per-sample hot spots.

    python bench/footprint.py [--seconds 600] [--short] [--agent-repo DIR]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from mqtt import start_broker  # noqa: E402  (bench/mqtt.py: mosquitto on a free port)

CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL_S = 0.5
PSS_EVERY_S = 5.0

BARE_LOOP = r"""
import os, signal, sys, time, psutil
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
psutil.cpu_percent()
t0, k = time.monotonic(), 0
while not stop:
    psutil.cpu_percent(); psutil.virtual_memory(); psutil.swap_memory(); psutil.disk_usage("/")
    psutil.disk_io_counters(); psutil.net_io_counters(); os.getloadavg()
    k += 1
    time.sleep(max(0.0, t0 + k * 1.0 - time.monotonic()))
"""

COLLECTD_CONF = """Interval 1
BaseDir "{tmp}"
PIDFile "{tmp}/collectd.pid"
PluginDir "{plugins}"
TypesDB "/usr/share/collectd/types.db"
AutoLoadPlugin false
LoadPlugin cpu
LoadPlugin memory
LoadPlugin df
LoadPlugin disk
LoadPlugin interface
LoadPlugin load
LoadPlugin csv
<Plugin csv>
  DataDir "{tmp}/csv"
  StoreRates true
</Plugin>
"""


# -- /proc readers ---------------------------------------------------------------------------------
def cpu_seconds(pid: int, children: bool = False) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])            # utime + stime
    if children:
        ticks = int(fields[13]) + int(fields[14])        # cutime + cstime: waited-for children
    return ticks / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def run_peak_rss(cmd: list[str], **kw) -> tuple[int, float, str]:
    """Run to completion; (peak RSS kB of the process tree's largest member, wall s, tail of output)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return usage.ru_maxrss, time.monotonic() - t0, out.strip().splitlines()[-1] if out.strip() else ""


# -- setup -----------------------------------------------------------------------------------------
def agent_config(tmp: Path, port: int, web_port: int, metrics_port: int, epochs: int) -> Path:
    cfg = tmp / "agent.toml"
    cfg.write_text(f"""[agent]
device_id = "bench"
state_dir = "{tmp}/state"
interval_s = 1.0
[mqtt]
host = "127.0.0.1"
port = {port}
[web]
enabled = true
port = {web_port}
[metrics]
enabled = true
port = {metrics_port}
[forecast]
train_epochs = {epochs}
""")
    return cfg


SEED = r"""
import math, random, sys
from pathlib import Path
from agent.sampling import Sample
from agent.store import Store
db, n, step = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
rng = random.Random(0)
store = Store(db)
end = __import__("time").time() - step
for i in range(n):
    ts = end - (n - 1 - i) * step
    day = math.sin(2 * math.pi * ts / 86400.0)
    store.add_sample(Sample(ts, {"system.cpuUsage": 20 + 10 * day + rng.gauss(0, 2),
                                 "system.memoryPercent": 40 + 5 * day + rng.gauss(0, 0.5),
                                 "system.diskPercent": 60 + i * 1e-4, "system.swapPercent": 1.0,
                                 "system.load1": 0.5 + 0.3 * day + abs(rng.gauss(0, 0.1))}))
    if i % 500 == 499:
        store.flush()
store.flush(); store.close()
"""


def seed_and_train(python: str, repo: Path, env: dict, cfg: Path, tmp: Path, steps: int) -> dict:
    """A device history (one sample a minute), then the two real training commands that install models."""
    state = tmp / "state"
    state.mkdir()
    subprocess.run([python, "-c", SEED, str(state / "agent.db"), str(steps), "60"], cwd=repo, env=env, check=True)
    out = {}
    out["import tensorflow"] = run_peak_rss([python, "-c", "import tensorflow"], cwd=repo, env=env)
    for kind in ("forest", "forecast"):
        out[f"train --kind {kind}"] = run_peak_rss([python, "-m", "agent.cli", "train", "--kind", kind,
                                                    "--config", str(cfg)], cwd=repo, env=env)
    return out


def start_collectd(tmp: Path) -> subprocess.Popen | None:
    exe = shutil.which("collectd") or ("/usr/sbin/collectd" if Path("/usr/sbin/collectd").exists() else None)
    if exe is None:
        print("collectd not installed (apt-get install collectd-core): its column stays empty")
        return None
    cdir = tmp / "collectd"
    (cdir / "csv").mkdir(parents=True)
    plugins = next((str(p) for p in Path("/usr/lib").glob("*/collectd") if (p / "cpu.so").exists()),
                   "/usr/lib/collectd")
    conf = cdir / "collectd.conf"
    conf.write_text(COLLECTD_CONF.format(tmp=cdir, plugins=plugins))
    return subprocess.Popen([exe, "-f", "-C", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- the window ------------------------------------------------------------------------------------
@dataclass
class Track:
    name: str
    pid: int
    rss_kb: list[tuple[float, int]] = field(default_factory=list)   # (wall s, kB)
    pss_kb: list[int] = field(default_factory=list)
    children: dict[int, tuple[str, int, float]] = field(default_factory=dict)  # pid -> (cmd, peak kB, first seen)
    cpu0: float = 0.0
    cpu1: float = 0.0
    ccpu0: float = 0.0
    ccpu1: float = 0.0
    fsyncs: list[str] = field(default_factory=list)

    def poll(self, now_s: float, with_pss: bool) -> None:
        try:
            self.rss_kb.append((now_s, status_kb(self.pid, "VmRSS")))
            if with_pss:
                self.pss_kb.append(pss_kb(self.pid))
            for child in psutil.Process(self.pid).children(recursive=True):
                try:
                    rss = child.memory_info().rss // 1024
                    cmd, peak, first = self.children.get(child.pid, (" ".join(child.cmdline()[1:6]), 0, now_s))
                    self.children[child.pid] = (cmd, max(peak, rss), first)
                except psutil.Error:
                    pass
        except (OSError, psutil.Error):
            pass


def measure(tracks: list[Track], seconds: float) -> float:
    for t in tracks:
        t.cpu0, t.ccpu0 = cpu_seconds(t.pid), cpu_seconds(t.pid, children=True)
    t0 = time.monotonic()
    next_pss = t0
    while (now := time.monotonic()) < t0 + seconds:
        with_pss = now >= next_pss
        if with_pss:
            next_pss += PSS_EVERY_S
        for t in tracks:
            t.poll(time.time(), with_pss)
        time.sleep(max(0.0, POLL_S - (time.monotonic() - now)))
    elapsed = time.monotonic() - t0
    for t in tracks:
        t.cpu1, t.ccpu1 = cpu_seconds(t.pid), cpu_seconds(t.pid, children=True)
    return elapsed


def strace_pass(tracks: list[Track], seconds: float, tmp: Path) -> None:
    """fsync/fdatasync of every thread, with the file each one flushed (-y)."""
    if shutil.which("strace") is None:
        return
    procs = []
    for t in tracks:
        out = tmp / f"strace-{t.name}.txt"
        procs.append((t, out, subprocess.Popen(["strace", "-f", "-qq", "-y", "-e", "trace=fsync,fdatasync,sync_file_range",
                                                "-o", str(out), "-p", str(t.pid)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    time.sleep(seconds)
    for t, out, p in procs:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=10)
        calls = re.compile(r"\b(fsync|fdatasync|sync_file_range)\((\d+)(<[^>]*>)?")
        t.fsyncs = [f"{m.group(1)} {m.group(3) or m.group(2)}" for line in out.read_text(errors="replace").splitlines()
                    if "resumed>" not in line and (m := calls.search(line))]


def pyspy_pass(pid: int, seconds: float, tmp: Path, interval_s: float, rate_hz: int = 100) -> list[tuple[str, float]]:
    """Inclusive active time per function, as ms per agent sample (py-spy record, raw collapsed stacks)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return []
    out = tmp / "pyspy.txt"
    subprocess.run([exe, "record", "--nonblocking", "-r", str(rate_hz), "-d", str(int(seconds)), "-f", "raw",
                    "-o", str(out), "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not out.exists():
        return []
    inclusive: collections.Counter[str] = collections.Counter()
    for line in out.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = {re.sub(r" \((?:.*/)?([^/]+/[^/]+?):\d+\)$", r" (\1)", f) for f in stack.split(";")[1:]}
        for f in frames:
            inclusive[f] += int(count)
    ticks = seconds / interval_s
    return [(f, 1000.0 * c / rate_hz / ticks) for f, c in inclusive.most_common(40)]


def spike(track: Track, log_lines: list[tuple[float, str]]) -> tuple[float, float, str]:
    """(MB above the median, wall time, cause): log lines within 3 s before it, else a child process."""
    if not track.rss_kb:
        return 0.0, 0.0, ""
    median = statistics.median(kb for _, kb in track.rss_kb)
    ts, kb = max(track.rss_kb, key=lambda x: x[1])
    near = [line for t, line in log_lines if ts - 3.0 <= t <= ts + 0.5]
    kids = [f"child {cmd} (peak {peak / 1024:.0f} MB)" for cmd, peak, first in track.children.values()
            if first <= ts + 1.0]
    cause = "; ".join(near[-2:] + kids[:2]) or "no log line or child process within 3 s"
    return (kb - median) / 1024, ts, cause


def log_times(path: Path) -> list[tuple[float, str]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            stamp = dt.datetime.strptime(line[:23], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=dt.timezone.utc)
        except ValueError:
            continue
        lines.append((stamp.timestamp(), line[24:160]))
    return lines


def fmt_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%H:%M:%S")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="measured window (default 600)")
    parser.add_argument("--short", action="store_true", help="quick check: 60 s window, 15 s passes")
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--pass-seconds", type=float, default=120.0, help="strace and py-spy passes after the window")
    parser.add_argument("--history-steps", type=int, default=6000, help="seeded history, one sample a minute")
    parser.add_argument("--epochs", type=int, default=5, help="[forecast] train_epochs for the bench's LSTM")
    parser.add_argument("--workdir", type=Path, help="keep everything here instead of a temporary directory")
    parser.add_argument("--agent-repo", type=Path, default=REPO, help="checkout whose agent runs (before/after)")
    args = parser.parse_args()
    if args.short:
        args.seconds, args.pass_seconds, args.warmup = min(args.seconds, 60.0), 15.0, 10.0
    python, repo = sys.executable, args.agent_repo.resolve()
    env = dict(os.environ, PYTHONPATH=str(repo), TF_CPP_MIN_LOG_LEVEL="2")
    with contextlib.ExitStack() as stack:
        if args.workdir:
            args.workdir.mkdir(parents=True)
        tmp = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="footprint-")))
        broker, port = start_broker(tmp)
        procs: list[subprocess.Popen] = [broker]
        try:
            return run(args, python, repo, env, tmp, port, procs)
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        p.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def run(args, python: str, repo: Path, env: dict, tmp: Path, port: int, procs: list) -> int:
    web_port, metrics_port = free_port(), free_port()
    cfg = agent_config(tmp, port, web_port, metrics_port, args.epochs)
    print(f"agent from {repo}; seeding {args.history_steps} minutes of history and training (real commands) ...",
          flush=True)
    training = seed_and_train(python, repo, env, cfg, tmp, args.history_steps)
    log_path = tmp / "agent.log"
    with log_path.open("wb") as log_file:
        agent = subprocess.Popen([python, "-m", "agent.cli", "run", "--config", str(cfg)], cwd=repo, env=env,
                                 stdout=log_file, stderr=subprocess.STDOUT)
    procs.append(agent)
    mosq_log = tmp / "mosquitto.log"
    connected = wait_for(lambda: "as bench" in (mosq_log.read_text(errors="replace") if mosq_log.exists() else ""), 60)
    web_up = wait_for(lambda: urlopen_ok(f"http://127.0.0.1:{web_port}/"), 30)
    metrics_up = wait_for(lambda: urlopen_ok(f"http://127.0.0.1:{metrics_port}/metrics"), 30)
    collectd = start_collectd(tmp)
    bare = subprocess.Popen([python, "-c", BARE_LOOP])
    procs += [p for p in (collectd, bare) if p is not None]
    time.sleep(args.warmup)
    if agent.poll() is not None:
        print(log_path.read_text()[-3000:])
        raise SystemExit("the agent exited during warm-up")
    models = sorted({m.group(0) for m in re.finditer(r"(?:forest|lstm)(?: model now)? v\d+", log_path.read_text(errors="replace"))})
    print(f"agent pid {agent.pid}: mqtt connected {connected}, web {web_up}, metrics {metrics_up}, "
          f"models seen in its log: {', '.join(models) or 'none'}", flush=True)
    tracks = [Track("agent", agent.pid), Track("bare psutil loop", bare.pid)]
    if collectd is not None:
        tracks.insert(1, Track("collectd", collectd.pid))
    print(f"measuring {args.seconds:g} s (warm-up {args.warmup:g} s excluded) ...", flush=True)
    window_s = measure(tracks, args.seconds)
    print(f"strace pass {args.pass_seconds:g} s, then py-spy pass {args.pass_seconds:g} s ...", flush=True)
    strace_pass(tracks, args.pass_seconds, tmp)
    hot = pyspy_pass(agent.pid, args.pass_seconds, tmp, 1.0)
    agent_alive = agent.poll() is None
    hwm_mb = status_kb(agent.pid, "VmHWM") / 1024 if agent_alive else float("nan")
    print(f"agent VmHWM (peak RSS since start, warm start included): {hwm_mb:.1f} MB")
    report(tracks, window_s, args.pass_seconds, training, log_times(log_path), hot, agent_alive)
    return 0 if agent_alive else 1


def urlopen_ok(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def report(tracks: list[Track], window_s: float, pass_s: float, training: dict, log_lines, hot, agent_alive) -> None:
    bare = next(t for t in tracks if t.name.startswith("bare"))
    bare_ms = 1000.0 * (bare.cpu1 - bare.cpu0) / window_s
    rows = collections.OrderedDict()
    spikes = {}
    for t in tracks:
        rss = [kb / 1024 for _, kb in t.rss_kb] or [0.0]
        cpu_s = t.cpu1 - t.cpu0
        mb, ts, cause = spike(t, log_lines if t.name == "agent" else [])
        spikes[t.name] = (mb, ts, cause, max(rss))
        rows[t.name] = [f"{100 * cpu_s / window_s:.3f}", f"{1000 * cpu_s / window_s:.2f}",
                        f"{statistics.fmean(rss):.1f}", f"{statistics.median(rss):.1f}", f"{max(rss):.1f}",
                        f"{statistics.fmean(t.pss_kb) / 1024:.1f}" if t.pss_kb else "-",
                        f"{len(t.fsyncs) * 60 / pass_s:.1f}"]
    heads = ["CPU % core", "CPU ms/s", "RSS mean", "RSS median", "RSS max", "PSS mean", "fsync/min"]
    print(f"\nfootprint over {window_s:.0f} s, same window, 1 Hz (MB; fsyncs from a {pass_s:g} s strace pass)")
    print(f"{'':18}" + "".join(f"{h:>12}" for h in heads))
    for name, vals in rows.items():
        print(f"{name:18}" + "".join(f"{v:>12}" for v in vals))
    print(f"{'target (agent)':18}" + "".join(f"{v:>12}" for v in ["<= 0.2", "", "", "<= 50", "<= 70", "", "<= 6"]))
    agent = tracks[0]
    agent_ms = 1000.0 * (agent.cpu1 - agent.cpu0) / window_s
    print(f"\nper sample: agent {agent_ms:.2f} ms CPU vs one bare psutil sample {bare_ms:.2f} ms "
          f"({agent_ms / bare_ms if bare_ms else float('nan'):.1f}x); agent children "
          f"{agent.ccpu1 - agent.ccpu0:.2f} s CPU in the window")
    for name, (mb, ts, cause, peak) in spikes.items():
        if name == "agent" or mb > 1:
            print(f"largest RSS spike, {name}: {peak:.1f} MB (+{mb:.1f} over the median) at {fmt_time(ts)} UTC: {cause}")
    for cmd, peak, first in agent.children.values():
        print(f"  agent child at {fmt_time(first)}: {cmd}: peak RSS {peak / 1024:.0f} MB")
    files = collections.Counter(agent.fsyncs)
    print("agent fsyncs by call and file: " + (", ".join(f"{k} x{v}" for k, v in files.most_common(6)) or "none"))
    print("\ntraining and TensorFlow, separate processes before the window (peak RSS, wall time):")
    for name, (kb, wall_s, tail) in training.items():
        print(f"  {name:24} {kb / 1024:7.1f} MB  {wall_s:6.1f} s  {tail[:100]}")
    if hot:
        print("\nagent hot spots (py-spy, inclusive active time, ms per 1 s sample):")
        for func, ms in hot[:25]:
            print(f"  {ms:7.3f}  {func[:110]}")
    if not agent_alive:
        print("the agent exited before the end of the run")


if __name__ == "__main__":
    sys.exit(main())
