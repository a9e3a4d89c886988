"""Fakes for the edges the engineering rules allow us to fake: psutil and clocks."""
from __future__ import annotations

import dataclasses
from typing import Callable

from agent.sampling import Reading


class FakeClock:
    """Wall and monotonic clocks that only move when told to; ``sleep`` advances both."""

    def __init__(self, wall_s: float = 1_700_000_000.0, mono_s: float = 1000.0) -> None:
        self.wall_s = wall_s
        self.mono_s = mono_s

    def time(self) -> float:
        return self.wall_s

    def monotonic(self) -> float:
        return self.mono_s

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.wall_s += seconds
        self.mono_s += seconds


class FakeSource:
    """A scripted machine: counters grow at fixed rates; ``hook`` may alter each reading."""

    def __init__(self, clock: FakeClock, cpu_percent: float = 12.0, hook: Callable[[int, Reading], Reading] | None = None) -> None:
        self.clock = clock
        self.calls = 0
        self.cpu_percent = cpu_percent
        self.hook = hook
        self.net_recv = 1_000_000.0
        self.disk_write = 5_000_000.0

    def read(self) -> Reading:
        self.calls += 1
        t = self.clock.monotonic()
        reading = Reading(
            cpu_percent=self.cpu_percent,
            load=(0.5, 0.4, 0.3),
            memory_total_bytes=1e9,
            memory_used_bytes=4e8,
            memory_percent=40.0,
            swap_total_bytes=1e8,
            swap_used_bytes=0.0,
            swap_percent=0.0,
            disks={"/": (8e9, 32e9, 25.0), "/data": (1e9, 4e9, 25.0)},
            disk_read_bytes=2_000_000.0 + 1000.0 * t,
            disk_write_bytes=self.disk_write + 4000.0 * t,
            net_recv_bytes=self.net_recv + 2000.0 * t,
            net_sent_bytes=500_000.0 + 1000.0 * t,
            process_count=120,
            uptime_s=t,
            temperature_c=48.5,
        )
        return self.hook(self.calls, reading) if self.hook else reading


def replace(reading: Reading, **changes: object) -> Reading:
    return dataclasses.replace(reading, **changes)
