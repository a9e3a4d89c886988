"""System metrics from psutil, turned into one flat sample per tick.

psutil sits behind :class:`Source` so tests inject a fake and the daemon never
needs a real machine to be exercised.  Cumulative counters (disk and network
bytes) are reported as they are, for the twin, and as per-second *rates* for the
detectors; a counter that goes backwards (reboot, interface reset, 32-bit wrap
psutil could not undo) yields no rate for that tick rather than a negative or
absurd one.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

log = logging.getLogger(__name__)

# A rate above this is a counter glitch, not traffic: 10 GB/s is beyond any Pi-class link or disk.
MAX_PLAUSIBLE_RATE_BYTES_PER_S = 10e9

COUNTER_RATES = {
    "disk.readBytes": "disk.readBytesPerSec",
    "disk.writeBytes": "disk.writeBytesPerSec",
    "network.bytesReceived": "network.bytesReceivedPerSec",
    "network.bytesSent": "network.bytesSentPerSec",
}


@dataclass(frozen=True)
class Sample:
    ts_s: float  # wall clock, epoch seconds
    values: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Reading:
    """What a source saw at one instant; counters are cumulative."""

    cpu_percent: float
    per_cpu_percent: tuple[float, ...] = ()
    load: tuple[float, float, float] | None = None
    memory_total_bytes: float = 0.0
    memory_used_bytes: float = 0.0
    memory_percent: float = 0.0
    swap_total_bytes: float = 0.0
    swap_used_bytes: float = 0.0
    swap_percent: float = 0.0
    disks: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # mount -> used, total, percent
    disk_read_bytes: float | None = None
    disk_write_bytes: float | None = None
    net_recv_bytes: float | None = None
    net_sent_bytes: float | None = None
    process_count: int | None = None
    uptime_s: float | None = None
    temperature_c: float | None = None


class Source(Protocol):
    def read(self) -> Reading: ...


def _find_thermal_file(sys_root: Path = Path("/sys/class/thermal")) -> Path | None:
    """First readable thermal zone; on a Pi this is the SoC (cpu-thermal)."""
    try:
        zones = sorted(sys_root.glob("thermal_zone*/temp"))
    except OSError:
        return None
    for path in zones:
        try:
            int(path.read_text().strip())
            return path
        except (OSError, ValueError):
            continue
    return None


class PsutilSource:
    """The real machine.  Expensive discovery (sensors, mounts) happens once, not per tick."""

    def __init__(self, mounts: Iterable[str] = ("/",), per_cpu: bool = False, temperature: bool = True) -> None:
        import psutil  # imported here so tests with a fake source never need it

        self._psutil = psutil
        self._mounts = tuple(mounts)
        self._per_cpu = per_cpu
        self._temperature_reader = self._discover_temperature() if temperature else None
        self._warned: set[str] = set()
        psutil.cpu_percent(interval=None)  # the first call only primes psutil's counters
        if per_cpu:
            psutil.cpu_percent(interval=None, percpu=True)

    def _discover_temperature(self) -> Callable[[], float | None] | None:
        sensors = getattr(self._psutil, "sensors_temperatures", None)
        if sensors is not None:
            try:
                found = sensors()
            except (OSError, RuntimeError):
                found = {}
            for name in ("cpu_thermal", "cpu-thermal", "coretemp", "k10temp", "soc_thermal"):
                if found.get(name):
                    log.info("temperature from psutil sensor %s", name)
                    return lambda name=name: self._psutil_temperature(name)
        path = _find_thermal_file()
        if path is not None:
            log.info("temperature from %s", path)
            return lambda: int(path.read_text().strip()) / 1000.0
        log.info("no temperature sensor found; system.temperature will be absent")
        return None

    def _psutil_temperature(self, name: str) -> float | None:
        entries = self._psutil.sensors_temperatures().get(name) or []
        return entries[0].current if entries else None

    def _once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def read(self) -> Reading:
        ps = self._psutil
        mem = ps.virtual_memory()
        swap = ps.swap_memory()
        disks: dict[str, tuple[float, float, float]] = {}
        for mount in self._mounts:
            try:
                du = ps.disk_usage(mount)
                disks[mount] = (float(du.used), float(du.total), float(du.percent))
            except OSError as exc:
                self._once(f"mount:{mount}", "cannot read disk usage of %s: %s", mount, exc)
        try:
            dio = ps.disk_io_counters()
        except (OSError, RuntimeError) as exc:
            self._once("diskio", "disk I/O counters unavailable: %s", exc)
            dio = None
        try:
            nio = ps.net_io_counters()
        except OSError as exc:
            self._once("netio", "network counters unavailable: %s", exc)
            nio = None
        try:
            load = tuple(float(x) for x in os.getloadavg())
        except OSError:
            load = None
        temperature = None
        if self._temperature_reader is not None:
            try:
                temperature = self._temperature_reader()
            except (OSError, ValueError) as exc:
                self._once("temperature", "temperature read failed: %s", exc)
        return Reading(
            cpu_percent=float(ps.cpu_percent(interval=None)),
            per_cpu_percent=tuple(ps.cpu_percent(interval=None, percpu=True)) if self._per_cpu else (),
            load=load,  # type: ignore[arg-type]
            memory_total_bytes=float(mem.total),
            memory_used_bytes=float(mem.total - mem.available),
            memory_percent=float(mem.percent),
            swap_total_bytes=float(swap.total),
            swap_used_bytes=float(swap.used),
            swap_percent=float(swap.percent),
            disks=disks,
            disk_read_bytes=float(dio.read_bytes) if dio else None,
            disk_write_bytes=float(dio.write_bytes) if dio else None,
            net_recv_bytes=float(nio.bytes_recv) if nio else None,
            net_sent_bytes=float(nio.bytes_sent) if nio else None,
            process_count=len(ps.pids()),
            uptime_s=_uptime_s(ps),
            temperature_c=temperature,
        )


def _uptime_s(ps: object) -> float:
    """/proc/uptime is immune to wall-clock jumps; boot_time() is not."""
    try:
        with open("/proc/uptime", "rb") as fh:
            return float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time() - ps.boot_time()  # type: ignore[attr-defined]


def reading_to_values(reading: Reading, mounts: Iterable[str]) -> dict[str, float]:
    """Flatten a reading into the twin's metric names (see DESIGN.md)."""
    v: dict[str, float] = {"system.cpuUsage": reading.cpu_percent}
    for i, pct in enumerate(reading.per_cpu_percent):
        v[f"system.cpuUsage.{i}"] = float(pct)
    if reading.load is not None:
        v["system.load1"], v["system.load5"], v["system.load15"] = reading.load
    v["system.memoryUsed"] = reading.memory_used_bytes
    v["system.memoryTotal"] = reading.memory_total_bytes
    v["system.memoryPercent"] = reading.memory_percent
    v["system.swapUsed"] = reading.swap_used_bytes
    v["system.swapTotal"] = reading.swap_total_bytes
    v["system.swapPercent"] = reading.swap_percent
    for index, mount in enumerate(mounts):
        if mount not in reading.disks:
            continue
        used, total, pct = reading.disks[mount]
        suffix = "" if index == 0 else f":{mount}"
        v[f"system.diskUsed{suffix}"] = used
        v[f"system.diskTotal{suffix}"] = total
        v[f"system.diskPercent{suffix}"] = pct
    counters = {
        "disk.readBytes": reading.disk_read_bytes,
        "disk.writeBytes": reading.disk_write_bytes,
        "network.bytesReceived": reading.net_recv_bytes,
        "network.bytesSent": reading.net_sent_bytes,
    }
    v.update({k: x for k, x in counters.items() if x is not None})
    if reading.process_count is not None:
        v["system.processCount"] = float(reading.process_count)
    if reading.uptime_s is not None:
        v["system.uptime"] = reading.uptime_s
    if reading.temperature_c is not None:
        v["system.temperature"] = float(reading.temperature_c)
    return v


def counter_rate(prev: float | None, cur: float, elapsed_s: float) -> float | None:
    """Per-second rate of a cumulative counter, or None when it cannot be trusted."""
    if prev is None or elapsed_s <= 0 or cur < prev:
        return None
    rate = (cur - prev) / elapsed_s
    return rate if rate <= MAX_PLAUSIBLE_RATE_BYTES_PER_S else None


class Sampler:
    """Reads a source and adds counter rates measured on the monotonic clock."""

    def __init__(self, source: Source, mounts: Iterable[str], clock: "Clock") -> None:
        self._source = source
        self._mounts = tuple(mounts)
        self._clock = clock
        self._prev_counters: dict[str, float] = {}
        self._prev_mono_s: float | None = None
        self.counter_resets = 0

    def sample(self) -> Sample:
        mono_s = self._clock.monotonic()
        ts_s = self._clock.time()
        values = reading_to_values(self._source.read(), self._mounts)
        elapsed_s = mono_s - self._prev_mono_s if self._prev_mono_s is not None else 0.0
        for counter, rate_name in COUNTER_RATES.items():
            if counter not in values:
                continue
            prev = self._prev_counters.get(counter)
            rate = counter_rate(prev, values[counter], elapsed_s)
            if rate is not None:
                values[rate_name] = rate
            elif prev is not None and values[counter] < prev:
                self.counter_resets += 1
                log.info("counter %s went backwards (%.0f -> %.0f): reset, no rate this tick", counter, prev, values[counter])
            self._prev_counters[counter] = values[counter]
        self._prev_mono_s = mono_s
        return Sample(ts_s=ts_s, values=values)


class Clock(Protocol):
    def time(self) -> float: ...
    def monotonic(self) -> float: ...


class SystemClock:
    """The real clocks; tests pass a fake with the same two methods."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
