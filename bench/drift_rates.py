"""Drift test true and false positive rates on simulated fleets: fixed PSI threshold vs self-calibrated.

For each seed a fleet (``fleet.simulate``, failures included) in which some
devices drift linearly into another role's behaviour between 30 % and 70 % of
the period. Reference: each device's rows before the drift starts; recent: the
last day (``drift.recent_s``), fully drifted. A device is flagged the way
``edge-fleet drift`` flags it (fleet/drift_eval.py). Printed per seed and in
total: TPR (drifting devices flagged) and FPR (the other devices flagged), for
``drift.calibration = "fixed"`` (PSI > 0.25) and ``"self"`` (the default) at
several ``calibration_margin`` values (2 is the default).

Usage: .venv/bin/python bench/drift_rates.py [--seeds 3] [--devices 40] [--days 21] [--drift 10]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.config import DriftSection  # noqa: E402
from fleet.drift_eval import Rates, fleet_rates  # noqa: E402
from fleet.simulate import SimParams, simulate_fleet  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--devices", type=int, default=40)
    ap.add_argument("--days", type=float, default=21)
    ap.add_argument("--drift", type=int, default=10)
    ap.add_argument("--method", choices=("psi", "ks"), default="psi")
    ap.add_argument("--margins", default="1.5,2,3", help="self-calibration margins to compare (default 1.5,2,3)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    settings = {"fixed": replace(DriftSection(), method=args.method, calibration="fixed")}
    for m in args.margins.split(","):
        settings[f"self x{float(m):g}"] = replace(DriftSection(), method=args.method, calibration="self",
                                                  calibration_margin=float(m))
    totals = {name: Rates() for name in settings}
    healthy = {name: [0, 0] for name in settings}     # [flagged, devices] without a failure in the last 2 days
    for seed in range(args.seeds):
        fleet = simulate_fleet(SimParams(devices=args.devices, days=args.days, seed=100 + seed,
                                         drift_devices=args.drift))
        failing = {f.device_id for f in fleet.failures if f.ts_s >= fleet.params.end_ts_s - 2 * 86400}
        for cal, total in totals.items():
            r = fleet_rates(fleet, settings[cal])
            total.add(r)
            near_failure = sum(1 for d in r.flagged_stable if d in failing)
            stable_ids = [d.device_id for d in fleet.devices if not d.drifted_to]
            healthy[cal][0] += r.false_positives - near_failure
            healthy[cal][1] += sum(1 for d in stable_ids if d not in failing)
            print(f"seed {100 + seed} {cal:8s}: TPR {r.true_positives}/{r.drifting} = {r.tpr:.2f}, "
                  f"FPR {r.false_positives}/{r.stable} = {r.fpr:.3f} "
                  f"({near_failure} of those failed within the last 2 days)")
    for cal, r in totals.items():
        print(f"TOTAL {args.method} {cal:8s}: TPR {r.true_positives}/{r.drifting} = {r.tpr:.3f}, "
              f"FPR {r.false_positives}/{r.stable} = {r.fpr:.3f}; without a failure in the last 2 days "
              f"{healthy[cal][0]}/{healthy[cal][1]} = {healthy[cal][0] / max(healthy[cal][1], 1):.3f}")
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
