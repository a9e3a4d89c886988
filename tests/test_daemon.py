import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from agent import config
from agent.daemon import Daemon
from tests.fakes import FakeClock, FakeSource

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path, **agent):
    return config.parse({"agent": {"device_id": "t1", "state_dir": str(tmp_path / "state"), **agent},
                         "sampling": {"mounts": ["/", "/data"]}, "store": {"commit_interval_s": 5.0}}, {})


class StopAfter:
    """A component that records what the loop gives it and stops the daemon after a number of samples."""

    name = "probe"

    def __init__(self, samples: int, on_sample=None):
        self.limit = samples
        self.seen = []
        self.ticks = 0
        self.started = self.stopped = False
        self.on_sample_hook = on_sample

    def start(self, ctx):
        self.ctx = ctx
        self.started = True

    def on_sample(self, sample):
        self.seen.append((sample.ts_s, self.ctx.clock.monotonic()))
        if self.on_sample_hook:
            self.on_sample_hook(len(self.seen), self.ctx)
        if len(self.seen) >= self.limit:
            self.ctx.daemon.request_stop()

    def tick(self, now):
        self.ticks += 1

    def stop(self):
        self.stopped = True

    def status(self):
        return {"probe": {"seen": len(self.seen)}}


def test_cadence_does_not_drift(tmp_path):
    clock = FakeClock()
    probe = StopAfter(3600)
    daemon = Daemon(_config(tmp_path), source=FakeSource(clock), clock=clock, components=[probe], sleep=clock.sleep)
    start = clock.monotonic()
    assert daemon.run() == 0
    monos = [m for _, m in probe.seen]
    assert monos[0] == start and monos[-1] - start == 3599.0  # exactly one per second, an hour later
    assert probe.started and probe.stopped
    db = sqlite3.connect(tmp_path / "state" / "agent.db")
    assert db.execute("SELECT count(*) FROM samples").fetchone()[0] == 3600  # final flush wrote everything


def test_wall_clock_jump_causes_no_burst_or_gap(tmp_path):
    clock = FakeClock()

    def jump(n, ctx):
        if n == 10:
            clock.wall_s -= 7200  # NTP steps the clock back two hours
        if n == 20:
            clock.wall_s += 86400  # ... and forward a day

    probe = StopAfter(30, on_sample=jump)
    daemon = Daemon(_config(tmp_path), source=FakeSource(clock), clock=clock, components=[probe], sleep=clock.sleep)
    daemon.run()
    monos = [m for _, m in probe.seen]
    assert [b - a for a, b in zip(monos, monos[1:])] == [1.0] * 29
    assert daemon.clock_jumps == 2 and daemon.ticks_skipped == 0


def test_stall_skips_missed_ticks_instead_of_bursting(tmp_path):
    clock = FakeClock()

    def stall(n, ctx):
        if n == 5:
            clock.mono_s += 30.5  # the process was frozen (SIGSTOP, swap storm)
            clock.wall_s += 30.5

    probe = StopAfter(10, on_sample=stall)
    daemon = Daemon(_config(tmp_path), source=FakeSource(clock), clock=clock, components=[probe], sleep=clock.sleep)
    daemon.run()
    monos = [m for _, m in probe.seen]
    gaps = [b - a for a, b in zip(monos, monos[1:])]
    # One late tick, then back on the original grid (start + k s): no burst of 30 catch-up samples.
    assert gaps == [1.0, 1.0, 1.0, 1.0, 30.5, 0.5, 1.0, 1.0, 1.0]
    assert daemon.ticks_skipped == 29


def test_failing_component_is_counted_not_fatal(tmp_path):
    clock = FakeClock()

    class Broken:
        name = "broken"

        def on_sample(self, sample):
            raise ValueError("boom")

    probe = StopAfter(5)
    daemon = Daemon(_config(tmp_path), source=FakeSource(clock), clock=clock, components=[Broken(), probe], sleep=clock.sleep)
    assert daemon.run() == 0
    assert len(probe.seen) == 5 and daemon.component_errors == 5


def test_runtime_status_is_persisted(tmp_path):
    clock = FakeClock()
    probe = StopAfter(12)
    daemon = Daemon(_config(tmp_path), source=FakeSource(clock), clock=clock, components=[probe], sleep=clock.sleep)
    daemon.run()
    import json

    db = sqlite3.connect(tmp_path / "state" / "agent.db")
    runtime = json.loads(db.execute("SELECT value FROM agent_state WHERE key = 'runtime'").fetchone()[0])
    assert runtime["samples_taken"] == 12 and runtime["probe"]["seen"] == 12 and runtime["pid"] == os.getpid()


def _write_config(tmp_path, interval_s="0.05", commit_s="0.2"):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\ndevice_id = "t1"\nstate_dir = "{tmp_path / "state"}"\ninterval_s = {interval_s}\n'
                   f'[store]\ncommit_interval_s = {commit_s}\n[mqtt]\nenabled = false\n')
    return cfg


def _wait_rows(db_path, at_least, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            db = sqlite3.connect(db_path)
            n = db.execute("SELECT count(*) FROM samples").fetchone()[0]
            db.close()
            if n >= at_least:
                return n
        except sqlite3.Error:
            pass
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} samples after {timeout_s}s")


def test_sigterm_flushes_and_exits_zero_within_two_seconds(tmp_path):
    cfg = _write_config(tmp_path, interval_s="0.05", commit_s="60")  # nothing committed until shutdown
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # start-up (imports) takes seconds on a loaded machine: wait for the loop
        lines.append(line)
        if " started: " in line:
            break
    time.sleep(1.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    rc = proc.wait(timeout=10)
    elapsed = time.monotonic() - sent
    assert rc == 0, "".join(lines) + rest
    assert elapsed < 2.0
    db = sqlite3.connect(tmp_path / "state" / "agent.db")
    assert db.execute("SELECT count(*) FROM samples").fetchone()[0] >= 10
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_kill_9_never_corrupts_and_loses_at_most_the_batch(tmp_path):
    cfg = _write_config(tmp_path, interval_s="0.02", commit_s="0.1")
    db_path = tmp_path / "state" / "agent.db"
    counts = []
    import random

    rng = random.Random(7)
    for _ in range(6):
        before = 0
        if db_path.exists():
            db = sqlite3.connect(db_path)
            before = db.execute("SELECT count(*) FROM samples").fetchone()[0]
            db.close()
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)], cwd=REPO,
                                stderr=subprocess.DEVNULL)
        _wait_rows(db_path, before + 5)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.kill()  # SIGKILL mid-write
        proc.wait(timeout=10)
        db = sqlite3.connect(db_path)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute("SELECT seq, ts_s FROM samples ORDER BY seq").fetchall()
        db.close()
        ts = [t for _, t in rows]
        assert ts == sorted(ts) and len(set(ts)) == len(ts)  # monotonic rows, no duplicates
        counts.append(len(rows))
    assert counts == sorted(counts) and counts[-1] > counts[0]
