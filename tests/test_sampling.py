import pytest

from agent.sampling import PsutilSource, Reading, Sampler, counter_rate, reading_to_values
from tests.fakes import FakeClock, FakeSource

MOUNTS = ("/", "/data")


def test_names_follow_the_twin_contract():
    clock = FakeClock()
    values = reading_to_values(FakeSource(clock).read(), MOUNTS)
    for name in ("system.cpuUsage", "system.memoryUsed", "system.memoryTotal", "system.diskUsed", "system.diskTotal",
                 "system.uptime", "network.bytesReceived", "network.bytesSent", "system.load1", "system.swapPercent",
                 "system.diskPercent", "system.processCount", "system.temperature"):
        assert name in values, name
    assert values["system.diskUsed:/data"] == 1e9
    assert values["system.diskPercent"] == 25.0


def test_counters_become_rates_on_the_monotonic_clock():
    clock = FakeClock()
    sampler = Sampler(FakeSource(clock), MOUNTS, clock)
    first = sampler.sample()
    assert "network.bytesReceivedPerSec" not in first.values  # no rate without a previous reading
    clock.advance(2.0)
    clock.wall_s += 3600  # a wall-clock jump must not distort rates
    second = sampler.sample()
    assert second.values["network.bytesReceivedPerSec"] == pytest.approx(2000.0)
    assert second.values["disk.writeBytesPerSec"] == pytest.approx(4000.0)
    assert second.values["disk.readBytesPerSec"] == pytest.approx(1000.0)
    assert second.values["network.bytesSentPerSec"] == pytest.approx(1000.0)


def test_counter_reset_gives_no_negative_or_huge_rate():
    clock = FakeClock()
    source = FakeSource(clock)
    sampler = Sampler(source, MOUNTS, clock)
    sampler.sample()
    clock.advance(1.0)
    source.net_recv = -10_000_000.0  # interface reset: counter restarts below the previous value
    after_reset = sampler.sample()
    assert "network.bytesReceivedPerSec" not in after_reset.values
    assert after_reset.values["disk.writeBytesPerSec"] == pytest.approx(4000.0)  # other counters unaffected
    assert sampler.counter_resets == 1
    clock.advance(1.0)
    resumed = sampler.sample()
    assert resumed.values["network.bytesReceivedPerSec"] == pytest.approx(2000.0)


def test_counter_rate_rules():
    assert counter_rate(None, 10, 1) is None
    assert counter_rate(10, 5, 1) is None  # wrap or reset
    assert counter_rate(10, 10, 0) is None  # no elapsed time
    assert counter_rate(0, 1e12, 1.0) is None  # implausible glitch
    assert counter_rate(100, 300, 2.0) == 100.0


def test_absent_parts_are_absent_not_nan():
    reading = Reading(cpu_percent=5.0)
    values = reading_to_values(reading, ("/",))
    assert "system.temperature" not in values and "disk.readBytes" not in values and "system.diskUsed" not in values
    assert values["system.cpuUsage"] == 5.0


def test_psutil_source_reads_this_machine():
    source = PsutilSource(mounts=("/", "/definitely-not-mounted"), per_cpu=True)
    values = reading_to_values(source.read(), ("/", "/definitely-not-mounted"))
    assert 0.0 <= values["system.cpuUsage"] <= 100.0
    assert values["system.memoryTotal"] > values["system.memoryUsed"] > 0
    assert values["system.diskTotal"] > 0 and 0 <= values["system.diskPercent"] <= 100
    assert values["system.uptime"] > 0 and values["system.processCount"] > 1
    assert "system.cpuUsage.0" in values
    assert "system.diskUsed:/definitely-not-mounted" not in values  # unreadable mount: skipped, not fatal
