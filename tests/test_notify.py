"""sd_notify protocol against real AF_UNIX datagram sockets (path and abstract names)."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from agent.health import HealthParams, loop_healthy
from agent.notify import Notifier, Watchdog, socket_address, watchdog_interval_s


class Listener:
    """The service manager's end: a bound datagram socket."""

    def __init__(self, env_name: str, bind_address: str | bytes) -> None:
        self.env_name = env_name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_address)

    def receive(self, timeout_s: float = 2.0) -> str:
        self.sock.settimeout(timeout_s)
        return self.sock.recv(4096).decode()

    def drain(self) -> list[str]:
        self.sock.setblocking(False)
        out = []
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="ntf", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[Listener]:
    if request.param == "path":
        path = str(short_dir / "notify.sock")
        lst = Listener(path, path)
    else:
        name = f"edge-agent-test-{uuid.uuid4().hex}"
        lst = Listener("@" + name, b"\0" + name.encode())
    yield lst
    lst.close()


def test_ready_status_watchdog_stopping_arrive(listener: Listener) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": listener.env_name})
    assert notifier.enabled
    assert notifier.ready("sampling every 1 s")
    assert listener.receive().split("\n") == ["READY=1", "STATUS=sampling every 1 s"]
    assert notifier.watchdog()
    assert listener.receive() == "WATCHDOG=1"
    assert notifier.status("3 anomalies")
    assert listener.receive() == "STATUS=3 anomalies"
    assert notifier.stopping()
    assert listener.receive() == "STOPPING=1"
    notifier.close()


def test_a_newline_in_a_value_cannot_forge_another_assignment(listener: Listener) -> None:
    notifier = Notifier(listener.env_name)
    notifier.status("bad\nREADY=1")
    assert listener.receive().split("\n") == ["STATUS=bad READY=1"]


def test_outside_systemd_every_call_is_a_quiet_no_op() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert not notifier.ready() and not notifier.watchdog() and not notifier.stopping()
    watchdog = Watchdog.from_environ(notifier, {"WATCHDOG_USEC": "1000000"}, pid=os.getpid())
    assert not watchdog.enabled and not watchdog.beat(True)
    assert watchdog.max_sleep_s() == float("inf")


def test_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abc") == b"\0abc"
    assert socket_address("vsock:2:1234") is None
    assert not Notifier("vsock:2:1234").enabled


def test_a_missing_socket_is_logged_not_raised_and_recovers(short_dir: Path) -> None:
    path = str(short_dir / "later.sock")
    notifier = Notifier(path)
    assert notifier.ready() is False  # nobody listening yet: ENOENT swallowed
    lst = Listener(path, path)
    try:
        assert notifier.watchdog() is True
        assert lst.receive() == "WATCHDOG=1"
    finally:
        lst.close()


def test_a_full_manager_queue_delays_the_loop_by_at_most_the_send_timeout(listener: Listener) -> None:
    notifier = Notifier(listener.env_name, send_timeout_s=0.05)
    results = []
    started = time.monotonic()
    for _ in range(60):  # nobody reads: the kernel queue (net.unix.max_dgram_qlen) fills up
        results.append(notifier.watchdog())
        if not results[-1]:
            break
    assert results[-1] is False and results.count(True) >= 1
    assert time.monotonic() - started < 5.0
    received = listener.drain()
    assert received == ["WATCHDOG=1"] * results.count(True)
    assert notifier.watchdog() is True  # room again: sending recovers
    assert listener.receive() == "WATCHDOG=1"


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_from_environment(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval_s(environ, pid=4242) == expected


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_pings_at_half_the_timeout_only_while_healthy(listener: Listener) -> None:
    clock = FakeClock()
    notifier = Notifier(listener.env_name)
    watchdog = Watchdog.from_environ(notifier, {"WATCHDOG_USEC": "2000000"}, pid=os.getpid(), clock=clock)
    assert watchdog.enabled and watchdog.period_s == 1.0
    assert watchdog.max_sleep_s() == 0.0  # first ping is due at once
    sent_at = []
    for step in range(40):  # a loop ticking every 0.25 s for 10 s, unhealthy from 4 s to 7 s
        clock.now = 100.0 + step * 0.25
        healthy = not (4.0 <= step * 0.25 < 7.0)
        if watchdog.beat(healthy, reason="test"):
            sent_at.append(step * 0.25)
    received = listener.drain()
    assert received == ["WATCHDOG=1"] * len(sent_at)
    assert sent_at == [0.0, 1.0, 2.0, 3.0, 7.0, 8.0, 9.0]
    assert watchdog.pings == len(sent_at)
    clock.now = 100.0 + 9.25
    assert watchdog.max_sleep_s() == pytest.approx(0.75)


def test_watchdog_follows_the_loop_health_verdict(listener: Listener) -> None:
    """Sampling fails from t=3 s on: pings stop once the newest sample is stale, resume after recovery."""
    clock = FakeClock()
    watchdog = Watchdog(Notifier(listener.env_name), timeout_s=1.0, clock=clock)
    params = HealthParams(stale_factor=3.0, min_stale_s=0.0)
    interval_s, started = 0.1, clock.now
    last_ok: float | None = None
    pinged, received = [], []
    for step in range(100):
        clock.now = started + step * interval_s
        if not (3.0 <= step * interval_s < 6.0):  # the sampler works
            last_ok = clock.now
        healthy, reason = loop_healthy(clock.now, last_ok, started, interval_s, params)
        if watchdog.beat(healthy, reason):
            pinged.append(round(step * interval_s, 2))
        received += listener.drain()  # like PID 1: its queue holds only ~10 datagrams
    assert received == ["WATCHDOG=1"] * len(pinged)
    # Last success at 2.9 s, stale after 0.3 s: no ping between 3.2 s and recovery at 6.0 s.
    assert not [t for t in pinged if 3.25 <= t < 6.0]
    assert pinged[:6] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert 6.0 in pinged and pinged[-1] >= 9.0


def test_a_stalled_loop_stops_pinging_in_real_time(listener: Listener) -> None:
    notifier = Notifier(listener.env_name)
    watchdog = Watchdog(notifier, timeout_s=0.1)  # real monotonic clock, ping every 50 ms
    stall, stop, stalled = threading.Event(), threading.Event(), threading.Event()

    def main_loop() -> None:
        while not stop.is_set():
            if stall.is_set():
                stalled.set()
                stop.wait()  # wedged: e.g. a hung read
                break
            watchdog.beat(True)
            time.sleep(min(0.01, watchdog.max_sleep_s()))

    thread = threading.Thread(target=main_loop, daemon=True)
    thread.start()
    try:
        time.sleep(0.4)
        stall.set()
        assert stalled.wait(5)
        before = listener.drain()
        assert len(before) >= 2 and set(before) == {"WATCHDOG=1"}
        time.sleep(0.3)  # six ping periods
        assert listener.drain() == []
    finally:
        stop.set()
        thread.join(5)
