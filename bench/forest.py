"""Compact forest vs scikit-learn: speed, exactness, size, memory; detector per-sample cost.

Run: .venv/bin/python bench/forest.py [--repeat 200]

All timings are measured in this one run, on the same model and rows, so the
ratios are what matters (the absolute numbers depend on the machine's load).
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.detect import DetectParams, Detector  # noqa: E402
from models.features import DEFAULT_FEATURES, build_matrix  # noqa: E402
from models.forest import load_forest_model  # noqa: E402
from models.training.forest import ForestParams, export_isolation_forest, fit_isolation_forest, \
    train_forest_from_rows  # noqa: E402


def device_rows(n: int, seed: int = 0) -> list[dict]:
    """Plausible 1 Hz device samples for the default features."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        cpu = float(np.clip(rng.gamma(2.0, 6.0), 0, 100))
        rows.append({
            "system.cpuUsage": cpu, "system.memoryPercent": 40 + 0.002 * i + rng.normal(0, 0.3),
            "system.diskPercent": 61.0 + 1e-5 * i, "system.swapPercent": 0.0 + abs(rng.normal(0, 0.01)),
            "system.load1": cpu / 25 + rng.normal(0, 0.05), "disk.readBytesPerSec": rng.exponential(2e3),
            "disk.writeBytesPerSec": rng.exponential(5e4), "network.bytesReceivedPerSec": rng.exponential(1e4),
            "network.bytesSentPerSec": rng.exponential(8e3), "system.temperature": 48 + cpu / 10 + rng.normal(0, 0.5),
        })
    return rows


def per_call_s(fn, repeat: int, rounds: int) -> float:
    """Best mean over ``rounds`` batches of ``repeat`` calls: the batch least disturbed by other load."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best


RSS_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import numpy as np
    from models.forest import load_forest_model
    m = load_forest_model({model!r})
    m.forest.score_one(np.zeros(m.forest.n_features))
    bad = [k for k in sys.modules if k.split('.')[0] in ('sklearn', 'scipy', 'joblib', 'agent', 'fleet')]
    assert not bad, bad
    with open('/proc/self/status') as f:
        rss = [l for l in f if l.startswith('VmHWM')][0].split()[1]
    print(rss)
""")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=200, help="calls per timed batch (one-row)")
    a = ap.parse_args(argv)
    import joblib  # comparison only: never used for a model that travels

    rows = device_rows(3600)
    names = tuple(DEFAULT_FEATURES)
    X = build_matrix(rows, names)
    params = ForestParams()
    model = fit_isolation_forest(X, params)
    cf = export_isolation_forest(model)
    test = build_matrix(device_rows(1000, seed=1), names)
    test[::50, 0] = 100.0
    one = test[:1]

    diff_s = np.abs(cf.score_samples(test) - model.score_samples(test)).max()
    diff_d = np.abs(cf.decision_function(test) - model.decision_function(test)).max()
    t_np1 = per_call_s(lambda: cf.score_samples(one), a.repeat, 25)
    t_one = per_call_s(lambda: cf.score_one(one[0]), a.repeat, 25)
    t_sk1 = per_call_s(lambda: model.score_samples(one), 10, 15)
    t_np1k = per_call_s(lambda: cf.score_samples(test), 5, 10)
    t_sk1k = per_call_s(lambda: model.score_samples(test), 5, 10)
    assert abs(cf.score_one(one[0]) + model.score_samples(one)[0]) <= 1e-9
    print(f"forest: {cf.n_trees} trees, {cf.n_nodes} nodes, depth {cf.max_depth}, {cf.n_features} features, "
          f"trained on {len(X)} rows")
    print(f"max |diff| vs sklearn: score_samples {diff_s:.2e}, decision_function {diff_d:.2e} (1000 rows)")
    print(f"1 row     numpy {t_np1 * 1e6:9.1f} us   sklearn {t_sk1 * 1e6:9.1f} us   ratio {t_sk1 / t_np1:6.1f}x"
          f"   (score_one: {t_one * 1e6:.1f} us, {t_sk1 / t_one:.0f}x)")
    print(f"1000 rows numpy {t_np1k * 1e3:9.2f} ms   sklearn {t_sk1k * 1e3:9.2f} ms   ratio {t_sk1k / t_np1k:6.1f}x")

    with tempfile.TemporaryDirectory() as tmp:
        mdir = Path(tmp) / "forest-v1"
        train_forest_from_rows(rows, names, params, mdir, version=1)
        npz = (mdir / "forest.npz").stat().st_size
        js = (mdir / "model.json").stat().st_size
        buf = io.BytesIO()
        joblib.dump(model, buf)
        jl = len(buf.getvalue())
        buf = io.BytesIO()
        joblib.dump(model, buf, compress=3)
        jlz = len(buf.getvalue())
        print(f"model files: forest.npz {npz / 1024:.1f} KiB + model.json {js / 1024:.1f} KiB; "
              f"sklearn joblib {jl / 1024:.1f} KiB (compress=3: {jlz / 1024:.1f} KiB)")
        code = RSS_CHILD.format(root=str(ROOT), model=str(mdir))
        rss = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                 text=True).stdout.strip())
        base = int(subprocess.run([sys.executable, "-c", "import numpy\nprint([l for l in open('/proc/self/status') "
                                   "if l.startswith('VmHWM')][0].split()[1])"], check=True, capture_output=True,
                                  text=True).stdout.strip())
        print(f"peak RSS, process importing numpy + models.forest and scoring the loaded model: {rss / 1024:.1f} MiB "
              f"(numpy alone: {base / 1024:.1f} MiB)")

        # the daemon's hot path: one Detector.update per sample
        live = device_rows(4000, seed=2)
        for label, forest in (("z-score only", None), ("z-score + forest", load_forest_model(mdir))):
            det = Detector(DetectParams(), forest=forest)
            for i, r in enumerate(live[:3500]):
                det.update(float(i), r)
            rest = live[3500:]
            t0 = time.perf_counter()
            for i, r in enumerate(rest):
                det.update(3500.0 + i, r)
            dt = (time.perf_counter() - t0) / len(rest)
            print(f"Detector.update ({label}, {len(det.z_names)} z features): {dt * 1e6:.0f} us/sample "
                  f"({100 * dt:.3f} % of one core at 1 Hz)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
