"""Clustering on simulated fleets: adjusted Rand index vs the simulator's roles, and drift recall.

For each seed: a fleet (``fleet.simulate``, failures included) in which some
devices drift linearly into another role's behaviour between 30 % and 70 % of
the period. The clusters are fitted on the history before the drift starts
(``fleet.clusters``: K-Means with k by silhouette, DBSCAN outliers, radii).
Then every device is checked the way the agent checks itself
(``agent.cluster_watch``): hourly, on the profile of its last 24 h, an episode
opening after ``stay_beyond_checks`` consecutive checks beyond its cluster's
radius. Printed per seed and overall:

    ARI              clusters vs roles (target >= 0.9)
    drift recall     drifted devices with a cluster_deviation episode after the drift began
    lead             hours from the drift start to the episode (the drift takes 40 % of the period)
    false alarms     other devices with an episode in the same period, split by whether they had a
                     (gradual or sudden) failure then - a failing device does behave unlike its peers

Usage: .venv/bin/python bench/clusters.py [--seeds 3] [--devices 60] [--days 14] [--drift 6]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.clusters import ClusterParams, build_profiles, fit_clusters  # noqa: E402
from fleet.simulate import SimParams, simulate_fleet  # noqa: E402
from models.clusters import assess, profile_from_columns  # noqa: E402
from models.episodes import EpisodeParams, EpisodeTracker  # noqa: E402

HOUR = 3600.0


def first_episode(model, dev, cluster: int, since_s: float, until_s: float, window_s: float,
                  stay: int, close: int) -> float | None:
    """Hourly checks of one device in [since, until]; the time the first deviation episode opens."""
    tracker = EpisodeTracker(EpisodeParams(open_after=stay, close_after=close))
    ts = dev.ts_s
    for now in np.arange(since_s, until_s, HOUR):
        keep = (ts > now - window_s) & (ts <= now)
        if keep.sum() < 2 or ts[keep][-1] - ts[keep][0] < 0.5 * window_s:
            continue
        p = profile_from_columns(ts[keep], {m: v[keep] for m, v in dev.values.items()}, model.feature_names)
        a = assess(model, p, cluster)
        sev = "normal" if not a.beyond else "warning"
        if any(e["action"] == "open" for e in tracker.update(now, sev, a.distance / a.radius)):
            return float(now)
    return None


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    from sklearn.metrics import adjusted_rand_score

    sp = SimParams(devices=args.devices, days=args.days, seed=seed, drift_devices=args.drift)
    fleet = simulate_fleet(sp)
    start, end = sp.start_ts_s, sp.end_ts_s
    drift_from = start + 0.3 * (end - start)
    cp = ClusterParams()
    t0 = time.perf_counter()
    res = fit_clusters(build_profiles({d.device_id: (d.ts_s, d.values) for d in fleet.devices}, cp,
                                      until_s=drift_from), cp)
    fit_s = time.perf_counter() - t0
    roles = {d.device_id: d.role for d in fleet.devices}
    ari = adjusted_rand_score([roles[d] for d in res.device_ids], res.labels)
    hits, leads, fa_fail, fa_clean, n_fail, n_clean = 0, [], 0, 0, 0, 0
    for dev in fleet.devices:
        if dev.device_id not in res.model.assignments:
            continue
        opened = first_episode(res.model, dev, res.model.assignments[dev.device_id], drift_from, end,
                               cp.window_s, args.stay, args.close)
        if dev.drifted_to:
            if opened is not None:
                hits += 1
                leads.append((opened - drift_from) / HOUR)
            continue
        failed = any(f.ts_s >= drift_from - cp.window_s for f in fleet.failures_of(dev.device_id))
        n_fail += failed
        n_clean += not failed
        if opened is not None:
            fa_fail += failed
            fa_clean += not failed
    n_drift = sum(1 for d in fleet.devices if d.drifted_to)
    return {"seed": seed, "k": res.model.k, "ari": ari, "outliers": int(res.outlier.sum()), "fit_s": fit_s,
            "drifted": n_drift, "hits": hits, "leads_h": leads, "fa_fail": fa_fail, "n_fail": n_fail,
            "fa_clean": fa_clean, "n_clean": n_clean}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=100)
    ap.add_argument("--devices", type=int, default=60)
    ap.add_argument("--days", type=float, default=14)
    ap.add_argument("--drift", type=int, default=6)
    ap.add_argument("--stay", type=int, default=3, help="stay_beyond_checks")
    ap.add_argument("--close", type=int, default=3, help="close_after_checks")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = [run_seed(s, args) for s in range(args.first_seed, args.first_seed + args.seeds)]
    print(f"{args.devices} devices, {args.days:g} days, {args.drift} drifting per fleet; clusters fitted on the "
          f"first 30 % (before the drift), hourly 24 h-profile checks, episode after {args.stay} checks beyond")
    print(f"{'seed':>5} {'k':>2} {'ARI':>6} {'outl':>4} {'fit s':>6} {'drift recall':>13} {'lead h (med)':>12} "
          f"{'false alarms: failing':>22} {'healthy':>9}")
    for r in rows:
        med = f"{statistics.median(r['leads_h']):.0f}" if r["leads_h"] else "-"
        print(f"{r['seed']:>5} {r['k']:>2} {r['ari']:>6.3f} {r['outliers']:>4} {r['fit_s']:>6.2f} "
              f"{r['hits']:>6}/{r['drifted']:<6} {med:>12} {r['fa_fail']:>14}/{r['n_fail']:<7} "
              f"{r['fa_clean']:>4}/{r['n_clean']:<4}")
    ari = [r["ari"] for r in rows]
    hits, drifted = sum(r["hits"] for r in rows), sum(r["drifted"] for r in rows)
    leads = [x for r in rows for x in r["leads_h"]]
    fa_clean, n_clean = sum(r["fa_clean"] for r in rows), sum(r["n_clean"] for r in rows)
    fa_fail, n_fail = sum(r["fa_fail"] for r in rows), sum(r["n_fail"] for r in rows)
    print(f"ARI mean {np.mean(ari):.3f} (min {min(ari):.3f}; target >= 0.9)")
    print(f"drift recall {hits}/{drifted} = {hits / max(drifted, 1):.2f}, median lead "
          f"{statistics.median(leads) if leads else float('nan'):.0f} h after the drift began "
          f"(drift spans {0.4 * args.days * 24:.0f} h)")
    print(f"false alarms: healthy devices {fa_clean}/{n_clean} = {fa_clean / max(n_clean, 1):.3f}, "
          f"devices with a failure in the period {fa_fail}/{n_fail} = {fa_fail / max(n_fail, 1):.2f}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
