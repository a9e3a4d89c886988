"""Failure labels derived from reported history, checked against the simulator's ground truth."""
import numpy as np

from fleet.labels import derive_failures, history_from_store, match
from fleet.simulate import SimParams, simulate_fleet, write_store
from fleet.store import open_store


def _derived(fleet, with_events=True):
    out = []
    for d in fleet.devices:
        out += derive_failures(d.device_id, d.ts_s, d.values, d.events if with_events else [])
    return out


def test_labels_find_the_true_failures():
    gradual = sudden = 0
    found_g = found_s = spurious = 0
    for seed in (11, 12):
        fleet = simulate_fleet(SimParams(devices=30, days=14, seed=seed))
        m = match(_derived(fleet), fleet.failures)
        spurious += len(m["spurious"])
        for truth, d in m["pairs"]:
            if truth.gradual:
                gradual += 1
                found_g += d is not None
            else:
                sudden += 1
                found_s += d is not None and d.cause in ("reboot", "offline")
    assert gradual >= 20 and sudden >= 5
    assert found_g / gradual >= 0.9
    assert found_s / sudden >= 0.8          # sudden failures are seen as a reboot / unexpected offline
    assert spurious <= 2                     # planned (clean) reboots and false alarms are not failures


def test_rules_one_by_one():
    ts = 1_700_000_000.0 + np.arange(50) * 300.0
    up = 1000.0 + np.arange(50) * 300.0
    up[20:] = np.arange(30) * 300.0 + 40.0          # rebooted between sample 19 and 20
    disk = np.full(50, 50.0)
    disk[46:49] = 99.0                              # > merge_s (2 h) after the reboot
    values = {"system.uptime": up, "system.diskPercent": disk}
    got = derive_failures("d", ts, values)
    assert [(f.ts_s, f.cause) for f in got] == [(ts[19], "reboot"), (ts[46], "disk_exhaustion")]
    # the same reboot after a clean (planned) shutdown is not a failure
    clean = [{"ts_s": ts[19] + 10, "kind": "offline", "clean": True}]
    assert [f.cause for f in derive_failures("d", ts, values, clean)] == ["disk_exhaustion"]
    # a telemetry gap without status data counts as an unexpected offline
    gap_ts = np.r_[ts[:10], ts[10:] + 7200.0]
    got = derive_failures("d", gap_ts, {"system.uptime": 1000.0 + gap_ts - gap_ts[0]})
    assert [(f.ts_s, f.cause) for f in got] == [(gap_ts[9], "offline")]
    # a long critical episode alone is a failure; a short one is not
    ev = [{"ts_s": ts[5], "kind": "anomaly", "severity": "critical", "end_ts_s": ts[5] + 3600},
          {"ts_s": ts[30], "kind": "anomaly", "severity": "critical", "end_ts_s": ts[30] + 600}]
    got = derive_failures("d", ts, {"system.uptime": 1000.0 + ts - ts[0]}, ev)
    assert [(f.ts_s, f.cause) for f in got] == [(ts[5], "critical_episode")]


def test_labels_from_the_fleet_store_match_labels_from_memory(tmp_path):
    fleet = simulate_fleet(SimParams(devices=6, days=5, seed=5, failure_rate_per_device_day=0.3))
    with open_store(f"sqlite:///{tmp_path / 'f.db'}") as store:
        write_store(fleet, store)
        from_store = []
        for d in fleet.devices:
            ts, values, events = history_from_store(store, d.device_id)
            from_store += derive_failures(d.device_id, ts, values, events)
    direct = _derived(fleet)
    assert [(f.device_id, f.cause) for f in from_store] == [(f.device_id, f.cause) for f in direct]
    assert np.allclose([f.ts_s for f in from_store], [f.ts_s for f in direct], atol=1e-3)
