"""Drift test rates on a simulated fleet: how many truly drifting devices it flags, and how many others.

The simulator knows which devices drift (``drifted_to``) and when: linearly from
30 % to 70 % of the period. The check runs as after a training: the reference
is a device's rows before the drift starts (``reference_until`` of the period),
the recent window is the last ``drift.recent_s`` (fully drifted), both through
the model's feature transformation; a device is flagged as ``check_target``
would flag it (``min_drifted_features`` features over their thresholds).
Used by bench/drift_rates.py and the drift tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from fleet.config import DriftSection
from fleet.drift import feature_drift
from models.features import DEFAULT_FEATURES, build_matrix

@dataclass
class Rates:
    true_positives: int = 0
    drifting: int = 0
    false_positives: int = 0
    stable: int = 0
    flagged_stable: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)

    @property
    def tpr(self) -> float:
        return self.true_positives / self.drifting if self.drifting else float("nan")

    @property
    def fpr(self) -> float:
        return self.false_positives / self.stable if self.stable else float("nan")

    def add(self, other: "Rates") -> None:
        self.true_positives += other.true_positives
        self.drifting += other.drifting
        self.false_positives += other.false_positives
        self.stable += other.stable
        self.flagged_stable += other.flagged_stable
        self.missed += other.missed

def device_flagged(history: Any, start_s: float, end_s: float, p: DriftSection, reference_until: float,
                   names: Sequence[str] = DEFAULT_FEATURES) -> bool:
    ts = history.ts_s
    rows = history.samples()
    ref_end = start_s + reference_until * (end_s - start_s)
    ref = [v for t, v in rows if t < ref_end]
    rec = [v for t, v in rows if t >= end_s - p.recent_s]
    present = [n for n in names if n in history.values]
    if not ref or not rec or len(ts) == 0:
        return False
    verdicts = feature_drift(history.device_id, build_matrix(ref, present), build_matrix(rec, present), present, p)
    return sum(v.flagged for v in verdicts) >= p.min_drifted_features

def fleet_rates(fleet: Any, p: DriftSection, reference_until: float = 0.3) -> Rates:
    """True/false positive counts of the drift test over one simulated fleet."""
    start, end = fleet.params.start_ts_s, fleet.params.end_ts_s
    r = Rates()
    for d in fleet.devices:
        flagged = device_flagged(d, start, end, p, reference_until)
        if d.drifted_to:
            r.drifting += 1
            r.true_positives += int(flagged)
            if not flagged:
                r.missed.append(d.device_id)
        else:
            r.stable += 1
            r.false_positives += int(flagged)
            if flagged:
                r.flagged_stable.append(d.device_id)
    return r

