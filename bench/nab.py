"""NAB v1.1 evaluation of the device detector (replay over every series, NAB scoring).

Run: .venv/bin/python bench/nab.py [--workers 2] [--ranges both|given|learned] [--force-forest] [--limit N]

Each series is replayed exactly as `edge-agent replay` would (agent.replay.replay_rows:
z-score from the first row; an Isolation Forest trained on the first rows = the
NAB probationary period only with --force-forest, since replay skips the forest
for single-column input), and the ``anomaly_score`` column is scored with NAB's
rules (bench/nab_scoring.py): windows from labels/combined_windows.json, scaled
sigmoid, 15 % probation, one threshold per profile optimised over the corpus,
normalised against the null and perfect detectors.

The transition-novelty grid (models/novelty.py) is run two ways: from each
series' min and max, which NAB's own harness hands every detector (inputMin,
inputMax: HTM's and CAD OSE's published scores use them), and learned from the
probationary rows only, which is what a device without configured ranges does.
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import sys
import time
from dataclasses import replace
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.replay import ReplayParams, parse_timestamp, replay_rows  # noqa: E402
from bench.nab_scoring import (PROFILES, file_rows, normalise, parse_nab_ts, probationary_length,  # noqa: E402
                               score_at, sweep)

PUBLISHED = {"numenta HTM": (70.1, 63.1, 74.3), "twitterADVec": (47.1, 33.6, 53.5),
             "windowedGaussian": (39.7, 20.9, 47.4)}


def nab_dir() -> Path:
    return Path(os.environ.get("EDGE_DATASETS", ROOT.parent / "shared" / "datasets")) / "nab"


def load_series(path: Path) -> tuple[list[str], list[float], list[dict]]:
    raw, ts, rows = [], [], []
    with open(path, newline="") as f:
        for line in csv.DictReader(f):
            raw.append(line["timestamp"])
            ts.append(parse_timestamp(line["timestamp"]))
            rows.append({"value": float(line["value"])})
    return raw, ts, rows


def detect_file(args: tuple[str, str, ReplayParams, bool]) -> tuple[str, list[str], list[float], float]:
    rel, path, params, given_range = args
    raw, ts, rows = load_series(Path(path))
    n = len(rows)
    # the device trains on its first samples; on NAB those are the probationary rows
    p = params if params.train_rows is not None else replace(params, train_rows=int(probationary_length(n)))
    if given_range:   # NAB's harness gives every detector the series' min and max (inputMin/inputMax)
        values = [r["value"] for r in rows]
        if max(values) > min(values):
            p = replace(p, value_ranges=(("value", min(values), max(values)),))
    t0 = time.perf_counter()
    results, _, _ = replay_rows(ts, rows, ("value",), p)
    return rel, raw, [r.anomaly_score for r in results], time.perf_counter() - t0


def run(params: ReplayParams, workers: int = 2, limit: int | None = None, given_range: bool = True) -> dict:
    base = nab_dir()
    windows = json.loads((base / "labels" / "combined_windows.json").read_text())
    rels = sorted(windows)[:limit] if limit else sorted(windows)
    jobs = [(rel, str(base / "data" / rel), params, given_range) for rel in rels]
    # longest first keeps both workers busy to the end
    jobs.sort(key=lambda j: -os.path.getsize(j[1]))
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        outs = pool.map(detect_file, jobs, chunksize=1)
    detect_s = time.perf_counter() - t0
    outs.sort(key=lambda o: o[0])
    n_rows = sum(len(o[1]) for o in outs)
    cpu_s = sum(o[3] for o in outs)
    n_windows_total = sum(len(windows[r]) for r in rels)
    results: dict = {"rows": n_rows, "files": len(outs), "detect_wall_s": detect_s,
                     "us_per_row": 1e6 * cpu_s / max(n_rows, 1), "profiles": {}, "categories": {}}
    for pname, prof in PROFILES.items():
        files, nulls = [], []
        base_id = 0
        for rel, raw, scores, _ in outs:
            ts = [parse_nab_ts(t) for t in raw]
            wins = [(parse_nab_ts(a), parse_nab_ts(b)) for a, b in windows[rel]]
            files.append(file_rows(rel, ts, scores, wins, prof, base_id))
            nulls.append(file_rows(rel, ts, [0.0] * len(scores), wins, prof, base_id))
            base_id += len(wins)
        best = sweep(files, prof)
        null = sweep(nulls, prof)
        perfect = n_windows_total * prof["tpWeight"]
        results["profiles"][pname] = {"score": normalise(best.score, null.score, perfect), "raw": best.score,
                                      "null": null.score, "threshold": best.threshold, "tp_windows": best.tp,
                                      "fn_windows": best.fn, "fp_rows": best.fp}
        cats: dict[str, list] = defaultdict(list)
        for f in files:
            cats[f.name.split("/")[0]].append(f)
        for cat, fs in sorted(cats.items()):
            r = score_at(fs, prof, best.threshold)
            nw = sum(len(windows[f.name]) for f in fs)
            norm = normalise(r.score, -prof["fnWeight"] * nw, nw * prof["tpWeight"]) if nw else None
            results["categories"].setdefault(cat, {})[pname] = {"raw": r.score, "score": norm, "tp": r.tp,
                                                                 "fn": r.fn, "fp_rows": r.fp, "windows": nw}
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="only the first N files (smoke run)")
    ap.add_argument("--force-forest", action="store_true",
                    help="train the forest although NAB series have one column (replay skips it by default)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--ranges", choices=("both", "given", "learned"), default="both",
                    help="novelty grid from each series' min/max as NAB gives every detector (given), "
                         "from the probationary rows only (learned, what a device does), or both runs")
    a = ap.parse_args(argv)
    params = ReplayParams(forest_min_metrics=1) if a.force_forest else ReplayParams()
    t0 = time.perf_counter()
    out = {}
    for mode in (("given", "learned") if a.ranges == "both" else (a.ranges,)):
        res = out[mode] = run(params, a.workers, a.limit, given_range=mode == "given")
        print(f"NAB v1.1, value ranges {mode}: {res['files']} files, {res['rows']} rows, detection "
              f"{res['detect_wall_s']:.1f} s wall on {a.workers} workers, {res['us_per_row']:.0f} us/row per core; "
              f"forest={'forced on' if a.force_forest else 'replay default (off for one column)'}")
        print(f"{'profile':<20}{'score':>8}{'threshold':>12}{'TP win':>8}{'FN win':>8}{'FP rows':>9}")
        for p, r in res["profiles"].items():
            print(f"{p:<20}{r['score']:>8.1f}{r['threshold']:>12.4f}{r['tp_windows']:>8}{r['fn_windows']:>8}"
                  f"{r['fp_rows']:>9}")
        print("per category at each profile's corpus threshold (score normalised within the category):")
        for cat, d in res["categories"].items():
            cells = []
            for p, r in d.items():
                s = f"{r['score']:.1f}" if r["score"] is not None else f"raw {r['raw']:.2f}"
                cells.append(f"{p}={s} (tp {r['tp']}/{r['windows']}, fp {r['fp_rows']})")
            print(f"  {cat:<24}" + "  ".join(cells))
        print()
    print("published (standard / low_FP / low_FN): " +
          "; ".join(f"{k} {v[0]}/{v[1]}/{v[2]}" for k, v in PUBLISHED.items()))
    print(f"total bench time {time.perf_counter() - t0:.1f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
