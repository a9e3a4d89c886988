"""Rolling-origin evaluation of the forecasters on NAB (realAWSCloudwatch + machine temperature).

    .venv/bin/python bench/forecast.py [--no-lstm] [--series SUBSTR] [--epochs N] [--json OUT]

Per series: the first half is history. The LSTM is trained on it (its own
train/validation/calibration split lies inside that half) and then frozen; the
fallback, naive and seasonal naive run online through the same ForecastEngine
the device runs (the fallback refits once a day of steps on the past only).
Every origin of the second half is scored (steps 1..12). "auto" is what the
device publishes: the selector's pick among LSTM, fallback and naive at each origin.

MASE = MAE / in-sample one-step naive MAE of the first half (same scale for all
methods of a series). Coverage = share of actuals inside the published 80 / 95 %
conformal band, per method. ARIMA (statsmodels) is run only if importable.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from models.forecast.tflite_loader import interpreter_class  # noqa: E402  (before TensorFlow)

interpreter_class()

from models.forecast import ForecastEngine, ForecastParams  # noqa: E402
from models.forecast.scoring import coverage, mae, naive_scale  # noqa: E402
from models.forecast.series import infer_step_s, read_csv_columns  # noqa: E402

METHODS = ("lstm", "fallback", "auto", "naive", "snaive")


def datasets_dir() -> Path:
    return Path(os.environ.get("EDGE_DATASETS", REPO.parent / "shared" / "datasets"))


def series_files(filter_: str | None) -> list[Path]:
    nab = datasets_dir() / "nab" / "data"
    files = sorted((nab / "realAWSCloudwatch").glob("*.csv"))
    files.append(nab / "realKnownCause" / "machine_temperature_system_failure.csv")
    return [f for f in files if not filter_ or filter_ in f.name]


def evaluate(path: Path, use_lstm: bool, epochs: int, horizon: int = 12, units: int = 32,
             input_mode: str = "relative", selectable: tuple[str, ...] = ("lstm", "fallback", "naive")) -> dict:
    ts, cols = read_csv_columns(path, ["value"])
    y = cols["value"]
    step = infer_step_s(ts)
    n = len(y)
    split = n // 2
    t0 = time.monotonic()
    lstm_s = 0.0
    params = ForecastParams(metrics=("value",), step_s=0, horizon=horizon, limits=(),
                            baselines=("naive", "snaive"), selectable=selectable)
    engine = ForecastEngine(params, step_s=step)
    lstm_meta = None
    if use_lstm:
        from models.training.lstm import LSTMParams, train_lstm
        t1 = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            lstm_meta = train_lstm(ts[:split], y[:split, None], ["value"], Path(tmp) / "m", 1,
                                   LSTMParams(horizon=horizon, epochs=epochs, batch_size=128, patience=3,
                                              units=units, input_mode=input_mode),
                                   step_s=step)
            engine.load_lstm(Path(tmp) / "m")
        lstm_s = time.monotonic() - t1
    records: dict[str, dict[str, list]] = {m: {"a": [], "f": [], "lo80": [], "hi80": [], "lo95": [], "hi95": []}
                                           for m in METHODS}
    published: dict[str, int] = {}
    for i in range(n):
        engine.observe_step(ts[i], {"value": y[i]})
        engine.maintain(max_fits=None)
        if i < split or i + horizon >= n:
            continue
        iss = engine.issued("value")
        actual = y[i + 1:i + 1 + horizon]
        published[iss["published"]] = published.get(iss["published"], 0) + 1
        for m in METHODS:
            name = iss["published"] if m == "auto" else m
            if name not in iss["points"]:
                continue
            r = records[m]
            r["a"].append(actual)
            r["f"].append(iss["points"][name])
            b = iss["bands"].get(name)
            nanv = np.full(horizon, np.nan)
            r["lo80"].append(b[0.8][0] if b else nanv)
            r["hi80"].append(b[0.8][1] if b else nanv)
            r["lo95"].append(b[0.95][0] if b else nanv)
            r["hi95"].append(b[0.95][1] if b else nanv)
    scale = naive_scale(y[:split], 1)
    out = {"series": path.stem, "n": n, "step_s": step, "origins": n - split - horizon, "scale": scale,
           "seconds": round(time.monotonic() - t0, 1), "lstm_train_s": round(lstm_s, 1),
           "published": published, "fallback_kind": engine.status()["metrics"]["value"]["fallback"].get("kind")}
    for m, r in records.items():
        if not r["a"]:
            continue
        a, f = np.array(r["a"]), np.array(r["f"])
        out[m] = {"mase": mae(a, f) / scale if scale > 0 else math.nan, "mae": mae(a, f),
                  "cov80": coverage(a, np.array(r["lo80"]), np.array(r["hi80"])),
                  "cov95": coverage(a, np.array(r["lo95"]), np.array(r["hi95"])),
                  "n": int(a.size)}
    if lstm_meta:
        out["lstm_epochs"] = lstm_meta["training"]["epochs_run"]
    return out


def fmt(v: float | None) -> str:
    return "   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-lstm", action="store_true", help="skip LSTM training (no TensorFlow needed)")
    ap.add_argument("--series", help="only series whose file name contains this")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--units", type=int, default=32)
    ap.add_argument("--input-mode", default="relative", choices=("relative", "absolute"))
    ap.add_argument("--selectable", default="lstm,fallback,naive",
                    help="candidates the device may publish (auto), e.g. lstm,fallback,naive")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "forecast.json")
    args = ap.parse_args(argv)
    files = series_files(args.series)
    if not files or not files[0].exists():
        print(f"NAB data not found under {datasets_dir()}; set EDGE_DATASETS")
        return 2
    try:
        import statsmodels  # noqa: F401
        print("note: statsmodels is importable but the ARIMA baseline is not implemented in this bench")
    except ImportError:
        print("note: statsmodels is not installed: ARIMA baseline skipped")
    print("protocol: first half = history (LSTM trained there, then frozen); every origin of the second half "
          "scored, steps 1..12, no origin subsampling; MASE scale = in-sample one-step naive MAE of the first half")
    t0 = time.monotonic()
    results = []
    head = f"{'series':34s} " + " ".join(f"{m:>6s}" for m in METHODS) + "   cov80/cov95 auto  fb    lstm  kind"
    print(head)
    for path in files:
        r = evaluate(path, not args.no_lstm, args.epochs, units=args.units, input_mode=args.input_mode,
                     selectable=tuple(args.selectable.split(",")))
        results.append(r)
        print(f"{r['series'][:34]:34s} " + " ".join(fmt(r.get(m, {}).get("mase")) for m in METHODS)
              + f"   {fmt(r['auto']['cov80'])}/{fmt(r['auto']['cov95'])}"
              + f" {fmt(r['fallback']['cov95'])} {fmt(r.get('lstm', {}).get('cov95'))}"
              + f" {r['fallback_kind']} ({r['seconds']}s, lstm {r['lstm_train_s']}s)", flush=True)
    aws = [r for r in results if "machine_temperature" not in r["series"]]

    def mean(rs: list[dict], m: str, key: str) -> float:
        vals = [r[m][key] for r in rs if m in r and math.isfinite(r[m][key])]
        return float(np.mean(vals)) if vals else math.nan

    summary = {}
    for label, rs in (("AWS mean", aws), ("all mean", results)):
        if not rs:
            continue
        summary[label] = {m: {k: mean(rs, m, k) for k in ("mase", "cov80", "cov95")} for m in METHODS}
        print(f"{label:34s} " + " ".join(fmt(summary[label][m]["mase"]) for m in METHODS))
        for m in METHODS:
            s = summary[label][m]
            if not math.isnan(s["mase"]):
                print(f"    {m:9s} MASE {s['mase']:.3f}  coverage80 {s['cov80']:.3f}  coverage95 {s['cov95']:.3f}")
    elapsed = time.monotonic() - t0
    print(f"total {elapsed:.0f}s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"series": results, "summary": summary, "seconds": elapsed}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
