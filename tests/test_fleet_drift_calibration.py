"""Calibrated drift thresholds: measured against the device's own variation, checked on a simulated fleet.

The fleet simulator's drifting devices are the ground truth (fleet/drift_eval.py
runs the drift test as ``edge-fleet drift`` does); the fixed PSI threshold is run
on the same fleet to show what the calibration fixes.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fleet.config import DriftSection
from fleet.drift import feature_drift, psi, self_threshold
from fleet.drift_eval import fleet_rates
from fleet.simulate import SimParams, simulate_fleet

pytestmark = pytest.mark.timeout(300)


def test_self_threshold_follows_the_reference_variation() -> None:
    rng = np.random.default_rng(0)
    day = 288
    t = np.arange(14 * day)
    # a daily cycle plus slow bursts: one day never looks exactly like two weeks
    ref = np.sin(2 * np.pi * t / day) + np.repeat(rng.normal(0, 0.6, 14 * 8), day // 8) + rng.normal(0, 0.2, len(t))
    calm = np.sin(2 * np.pi * np.arange(day) / day) + np.repeat(rng.normal(0, 0.6, 8), day // 8) \
        + rng.normal(0, 0.2, day)
    shifted = calm + 3.0

    def stat(a: np.ndarray, b: np.ndarray) -> float:
        return psi(a, b, 10)

    threshold = self_threshold(ref, day, stat, 0.25, DriftSection().calibration_margin)
    assert threshold > 0.25                          # the fixed threshold is below this series' own variation
    assert stat(ref, calm) < threshold < stat(ref, shifted)
    assert self_threshold(ref[:day + 10], day, stat, 0.25, 1.5) == 0.25   # one window: no calibration
    p = DriftSection()
    verdicts = feature_drift("d", ref[:, None], shifted[:, None], ["x"], p)
    assert verdicts[0].flagged and verdicts[0].threshold == pytest.approx(threshold)
    assert not feature_drift("d", ref[:, None], calm[:, None], ["x"], p)[0].flagged


def test_on_a_simulated_fleet_drifting_devices_are_flagged_and_few_others() -> None:
    fleet = simulate_fleet(SimParams(devices=24, days=21, seed=7, drift_devices=6))
    calibrated = fleet_rates(fleet, DriftSection())
    fixed = fleet_rates(fleet, replace(DriftSection(), calibration="fixed"))
    assert calibrated.drifting == 6 and calibrated.stable == 18
    assert calibrated.tpr == 1.0, calibrated.missed
    # a device about to fail (a memory leak, a filling disk) has changed: flagging it is no false alarm
    failing = {f.device_id for f in fleet.failures if f.ts_s >= fleet.params.end_ts_s - 2 * 86400}
    assert len([d for d in calibrated.flagged_stable if d not in failing]) <= 1, (calibrated.flagged_stable, failing)
    assert calibrated.false_positives <= 3
    assert fixed.tpr == 1.0 and fixed.false_positives >= 9        # what the fixed PSI > 0.25 did
