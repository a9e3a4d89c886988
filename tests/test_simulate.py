"""The fleet simulator: deterministic per seed, the promised shape, failures with precursors."""
import json

import numpy as np

from fleet.simulate import CAUSES, SimParams, simulate_fleet, write_csv, write_store
from fleet.store import open_store

SMALL = SimParams(devices=6, days=4, seed=3, failure_rate_per_device_day=0.3)


def test_same_seed_same_fleet_other_seed_differs():
    a, b = simulate_fleet(SMALL), simulate_fleet(SMALL)
    c = simulate_fleet(SimParams(devices=6, days=4, seed=4, failure_rate_per_device_day=0.3))
    assert a.failures == b.failures
    for x, y in zip(a.devices, b.devices):
        assert x.device_id == y.device_id and x.role == y.role and x.events == y.events
        np.testing.assert_array_equal(x.ts_s, y.ts_s)
        for k in x.values:
            np.testing.assert_array_equal(x.values[k], y.values[k])
    assert not np.array_equal(a.devices[0].values["system.cpuUsage"][:100],
                              c.devices[0].values["system.cpuUsage"][:100])


def test_shape_roles_and_failures():
    f = simulate_fleet(SMALL)
    assert len(f.devices) == 6 and {d.role for d in f.devices} == set(SMALL.roles)
    for d in f.devices:
        assert np.all(np.diff(d.ts_s) >= SMALL.step_s - 1e-6)
        assert d.ts_s[0] >= SMALL.start_ts_s and d.ts_s[-1] < SMALL.end_ts_s
        for name in ("system.cpuUsage", "system.memoryPercent", "system.diskPercent", "system.temperature",
                     "disk.writeBytesPerSec", "network.bytesSentPerSec", "system.load1", "system.uptime"):
            assert d.values[name].shape == d.ts_s.shape
        assert np.nanmax(d.values["system.diskPercent"]) <= 100.0
        # a reported sample is never inside a failure's downtime
        for fl in f.failures_of(d.device_id):
            back = [e["ts_s"] for e in d.events if e["kind"] == "online" and e["ts_s"] > fl.ts_s][0]
            assert not np.any((d.ts_s >= fl.ts_s) & (d.ts_s < back))
    assert f.failures and {x.cause for x in f.failures} <= set(CAUSES)
    for x in f.failures:
        assert (x.onset_ts_s is None) == (x.cause == "sudden")
        if x.onset_ts_s is not None:
            assert x.ts_s - x.onset_ts_s >= 3 * 3600 - 1e-6


def test_precursor_is_visible_before_an_oom():
    f = simulate_fleet(SimParams(devices=30, days=10, seed=7))
    ooms = [x for x in f.failures if x.cause == "oom"]
    assert ooms
    for x in ooms:
        d = f.device(x.device_id)
        before = d.values["system.memoryPercent"][(d.ts_s < x.ts_s) & (d.ts_s >= x.ts_s - 1800)]
        at_onset = d.values["system.memoryPercent"][(d.ts_s <= x.onset_ts_s)][-1:]
        assert before.max() > 95 and (len(at_onset) == 0 or at_onset[0] < before.max() - 10)


def test_drift_devices_and_synthetic_noise(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGE_DATASETS", str(tmp_path / "absent"))
    from fleet import simulate
    simulate._nab_shapes.cache_clear()
    try:
        f = simulate_fleet(SimParams(devices=9, days=3, seed=1, drift_devices=2))
    finally:
        simulate._nab_shapes.cache_clear()
    drifted = [d for d in f.devices if d.drifted_to]
    assert len(drifted) == 2 and all(d.drifted_to != d.role for d in drifted)
    assert all(np.isfinite(d.values["system.cpuUsage"]).all() for d in f.devices)


def test_csv_and_store_outputs_keep_truth_apart(tmp_path):
    f = simulate_fleet(SMALL)
    out = write_csv(f, tmp_path / "csv")
    truth = json.loads((out / "truth.json").read_text())
    assert len(truth["failures"]) == len(f.failures)
    header = (out / f"{f.devices[0].device_id}.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "timestamp" and "system.memoryPercent" in header and "cause" not in header
    with open_store(f"sqlite:///{tmp_path / 'fleet.db'}") as store:
        counts = write_store(f, store)
        again = write_store(f, store)                 # deterministic message ids: no duplicates
        assert counts["samples"] == sum(len(d.ts_s) for d in f.devices) and again["samples"] == 0
        d = f.devices[0]
        rows = store.samples(d.device_id)
        assert len(rows) == len(d.ts_s) and rows[5][1]["system.cpuUsage"] == d.values["system.cpuUsage"][5]
