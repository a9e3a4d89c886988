"""systemd service notifications (sd_notify) without libsystemd.

The protocol is one AF_UNIX datagram of newline-separated ``KEY=VALUE``
lines sent to ``$NOTIFY_SOCKET``; a name starting with ``@`` is an
abstract-namespace socket (leading NUL byte).  Doing it by hand keeps the
daemon free of a C dependency that is awkward to build on a Pi.

Every send is best-effort: outside systemd (no ``$NOTIFY_SOCKET``) all calls
are cheap no-ops, and a failed send is logged, never raised, because losing a
notification must not take the sampler down.  The watchdog is the exception
that proves the rule: it is sent only while the main loop reports itself
healthy, so a loop that wedges or keeps failing gets restarted by systemd.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, Mapping

log = logging.getLogger(__name__)


def socket_address(name: str) -> str | bytes | None:
    """Turn ``$NOTIFY_SOCKET`` into a ``sendto`` address (None when unusable)."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None  # systemd >= 254 also knows vsock:...; not for a local service


class Notifier:
    """Sends state changes to the service manager."""

    def __init__(self, socket_name: str | None, send_timeout_s: float = 1.0) -> None:
        self.socket_name = socket_name or ""
        # A datagram send blocks while the manager's receive queue is full (PID 1 busy):
        # bound that wait, the main loop must not hang on a notification.
        self.send_timeout_s = send_timeout_s
        self._address = socket_address(self.socket_name) if self.socket_name else None
        if self.socket_name and self._address is None:
            log.warning("unsupported NOTIFY_SOCKET %r; systemd notifications disabled", self.socket_name)
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "Notifier":
        environ = os.environ if environ is None else environ
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines, e.g. ``notify(READY=1, STATUS="running")``; True when sent."""
        if self._address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:  # a newline would start a new (forged) assignment
                text = text.replace("\n", " ")
            lines.append(f"{key}={text}")
        data = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(self.send_timeout_s)
            self._sock.sendto(data, self._address)
        except OSError as exc:  # includes TimeoutError when the queue stays full
            if not self._failed:  # once: a missing socket would otherwise log every ping
                log.warning("systemd notification to %s failed: %s", self.socket_name, exc)
            self._failed = True
            return False
        if self._failed:
            log.info("systemd notifications to %s work again", self.socket_name)
            self._failed = False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def stopping(self, status: str = "") -> bool:
        return self.notify(STOPPING=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog timeout systemd set for *this* process, in seconds, or None."""
    usec = environ.get("WATCHDOG_USEC", "")
    try:
        timeout_s = int(usec) / 1e6
    except ValueError:
        return None
    if timeout_s <= 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != pid:  # inherited by a child: the watchdog is not ours
                return None
        except ValueError:
            return None
    return timeout_s


class Watchdog:
    """Pings the systemd watchdog from the main loop, but only while the loop is healthy.

    The loop calls :meth:`beat` every iteration with its own verdict.  A ping
    goes out at most every ``timeout / 2``; while the verdict is unhealthy no
    ping goes out, so systemd restarts the service once the condition has
    lasted a whole ``WatchdogSec``.  A loop that stops calling (deadlock, hung
    I/O) stops pinging by construction.  The loop must wake at least every
    :meth:`max_sleep_s` seconds, or long sampling intervals would starve it.
    """

    def __init__(
        self,
        notifier: Notifier,
        timeout_s: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._notifier = notifier
        self.timeout_s = timeout_s if (timeout_s and notifier.enabled) else None
        self.period_s = self.timeout_s / 2 if self.timeout_s else None
        self._clock = clock
        self._last_ping_mono_s: float | None = None
        self._healthy = True
        self.pings = 0

    @classmethod
    def from_environ(
        cls,
        notifier: Notifier,
        environ: Mapping[str, str] | None = None,
        pid: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> "Watchdog":
        environ = os.environ if environ is None else environ
        return cls(notifier, watchdog_interval_s(environ, os.getpid() if pid is None else pid), clock)

    @property
    def enabled(self) -> bool:
        return self.period_s is not None

    def beat(self, healthy: bool, reason: str = "", now_mono_s: float | None = None) -> bool:
        """Report the loop's health; pings when due and healthy.  Returns True when it pinged."""
        if self.period_s is None:
            return False
        if healthy != self._healthy:
            if healthy:
                log.info("main loop healthy again; watchdog pings resume")
            else:
                log.warning(
                    "main loop unhealthy (%s); withholding watchdog pings, systemd restarts the agent after %.0f s",
                    reason or "no reason given", self.timeout_s,
                )
            self._healthy = healthy
        if not healthy:
            return False
        now = self._clock() if now_mono_s is None else now_mono_s
        if self._last_ping_mono_s is not None and now - self._last_ping_mono_s < self.period_s:
            return False
        if self._notifier.watchdog():
            self._last_ping_mono_s = now
            self.pings += 1
            return True
        return False

    def max_sleep_s(self, now_mono_s: float | None = None) -> float:
        """How long the loop may sleep before the next ping is due (inf when disabled)."""
        if self.period_s is None:
            return float("inf")
        if self._last_ping_mono_s is None:
            return 0.0
        now = self._clock() if now_mono_s is None else now_mono_s
        return max(0.0, self._last_ping_mono_s + self.period_s - now)


__all__ = ["Notifier", "Watchdog", "socket_address", "watchdog_interval_s"]
