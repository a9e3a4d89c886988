"""Predictive-maintenance bench: train on simulated fleets, evaluate on fleets with other seeds.

Training uses only what devices report (labels from fleet.labels' rules);
evaluation uses the simulator's ground truth: a row (device, hour) is positive
when a *gradual* failure follows within 24 h; rows in the 24 h before a sudden
failure are left out (nothing can predict them), and the share of sudden
failures that happened to have a warning before them is printed separately
(not counted as caught). Baseline: the threshold rule disk > 90 % or
memory > 90 % (latest hour's maximum).

    .venv/bin/python bench/maintenance.py [--devices 30] [--days 21] [--train-seeds 100,101] [--test-seeds 1,2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.maintenance import (  # noqa: E402
    MaintenanceParams, build_dataset, histories_from_fleet, metrics_of_scores, split, train,
)
from fleet.simulate import SimParams, simulate_fleet  # noqa: E402
from models.maintenance import HORIZON_S  # noqa: E402


def truth_labels(ds, fleet):
    """y (gradual failure within 24 h) and keep (not in the 24 h before a sudden failure)."""
    y = np.zeros(len(ds.t))
    keep = np.ones(len(ds.t), bool)
    for f in fleet.failures:
        m = (ds.device == f.device_id) & (ds.t < f.ts_s) & (ds.t >= f.ts_s - HORIZON_S)
        if f.gradual:
            y[m] = 1
        else:
            keep &= ~m
    return y, keep


def lead_times(ds, fleet, score, threshold):
    """Per failure: hours between the first warning in the 24 h before it and the failure (None: missed)."""
    out = {"gradual": [], "sudden": []}
    for f in fleet.failures:
        m = (ds.device == f.device_id) & (ds.t < f.ts_s) & (ds.t >= f.ts_s - HORIZON_S)
        hit = np.flatnonzero(m & (score >= threshold))
        lead = (f.ts_s - ds.t[hit].min()) / 3600.0 if len(hit) else None
        out["gradual" if f.gradual else "sudden"].append(lead)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=30)
    ap.add_argument("--days", type=float, default=21)
    ap.add_argument("--train-seeds", default="100,101")
    ap.add_argument("--test-seeds", default="1,2")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    p = MaintenanceParams(holdout_device_share=0.0)

    train_sets = []
    for s in (int(x) for x in args.train_seeds.split(",")):
        fleet = simulate_fleet(SimParams(devices=args.devices, days=args.days, seed=s))
        h = [(f"{s}-{d}", t, v, e) for d, t, v, e in histories_from_fleet(fleet)]
        train_sets.append(build_dataset(h, p=p))
    ds = train_sets[0]
    for other in train_sets[1:]:
        ds.X = np.vstack([ds.X, other.X])
        ds.y = np.concatenate([ds.y, other.y])
        ds.t = np.concatenate([ds.t, other.t])
        ds.device = np.concatenate([ds.device, other.device])
    masks = split(ds, p)
    masks["train"] = masks["train"] | masks["test"]           # test fleets are separate seeds
    masks["test"] = np.zeros(len(ds.t), bool)
    t_train = time.perf_counter()
    forest, meta = train(ds, p, masks)
    t_train = time.perf_counter() - t_train
    cx = np.array(meta["calibration"]["x"])
    cy = np.array(meta["calibration"]["y"])
    th = meta["thresholds"]["warning"]
    print(f"training: {len(ds.y)} rows from seeds {args.train_seeds} ({int(ds.y.sum())} labelled positive), "
          f"train {meta['rows']['train']} / calib {meta['rows']['calib']}, fit+calibrate {t_train:.1f} s; "
          f"thresholds {meta['thresholds']}")

    all_y, all_risk, all_rule, all_rule_c = [], [], [], []
    leads = {"gradual": [], "sudden": []}
    names = ds.names
    i_disk = names.index("system.diskPercent|max1h")
    i_mem = names.index("system.memoryPercent|max1h")
    for s in (int(x) for x in args.test_seeds.split(",")):
        fleet = simulate_fleet(SimParams(devices=args.devices, days=args.days, seed=s))
        te = build_dataset(histories_from_fleet(fleet), names=names, p=p)
        risk = np.interp(forest.leaf_mean(te.X)[:, 1], cx, cy)
        disk = np.nan_to_num(te.X[:, i_disk])
        mem = np.nan_to_num(te.X[:, i_mem])
        rule = ((disk > 90) | (mem > 90)).astype(float)
        y, keep = truth_labels(te, fleet)
        all_y.append(y[keep])
        all_risk.append(risk[keep])
        all_rule.append(rule[keep])
        all_rule_c.append(np.maximum(disk, mem)[keep] / 100.0)
        lt = lead_times(te, fleet, risk, th)
        for k in leads:
            leads[k] += lt[k]
    y = np.concatenate(all_y)
    risk = np.concatenate(all_risk)
    model = metrics_of_scores(risk, y, th)
    rule = metrics_of_scores(np.concatenate(all_rule), y, 0.5)
    rule_c = metrics_of_scores(np.concatenate(all_rule_c), y, 0.9)
    caught = [x for x in leads["gradual"] if x is not None]
    sudden_warned = [x for x in leads["sudden"] if x is not None]
    print(f"evaluation on seeds {args.test_seeds}: {model['rows']} rows, {model['positives']} positive "
          f"(gradual failure within 24 h), {len(leads['gradual'])} gradual + {len(leads['sudden'])} sudden failures")
    print(f"{'':28s} {'precision':>9s} {'recall':>7s} {'PR-AUC':>7s} {'ROC-AUC':>7s} {'Brier':>7s}")
    for label, m in (("model (calibrated RF)", model), ("rule disk|mem > 90 %", rule),
                     ("rule score max(disk,mem)", rule_c)):
        print(f"{label:28s} {m['precision']:9.3f} {m['recall']:7.3f} {m.get('pr_auc', float('nan')):7.3f} "
              f"{m.get('roc_auc', float('nan')):7.3f} {m['brier']:7.4f}")
    ratio = model.get("pr_auc", 0) / max(rule.get("pr_auc", 1e-9), 1e-9)
    print(f"PR-AUC model / rule: {ratio:.2f}x (target >= 2x)")
    med = float(np.median(caught)) if caught else float("nan")
    print(f"gradual failures warned: {len(caught)}/{len(leads['gradual'])}; median lead {med:.1f} h "
          f"(target >= 2 h), p25 {np.percentile(caught, 25) if caught else float('nan'):.1f} h")
    share = len(leads["sudden"]) / max(len(leads["sudden"]) + len(leads["gradual"]), 1)
    print(f"sudden failures: {len(leads['sudden'])} ({share:.0%} of all failures), "
          f"{len(sudden_warned)} had an unrelated warning before them (not counted as caught)")
    print(f"runtime {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
