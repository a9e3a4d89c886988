"""``edge-agent backtest INPUT.csv --metric NAME --out OUT.csv``: rolling-origin forecast evaluation.

Runs the device's forecasting engine (models.forecast.ForecastEngine) over a
CSV as fast as it can, one row = one step, the way the agent would on a device:
the fallback is trained online from the rows seen so far (refits every
``refit_every_steps`` rows), intervals come from the online conformal
calibrators, and with ``--model DIR`` an LSTM directory (forecaster.tflite +
model.json, or an unpacked bundle holding one) is installed from the start and
the selector picks between it and the fallback exactly as on the device.

OUT has, per origin and step, ``origin, step, actual, forecast, lower_80,
upper_80, lower_95, upper_95, model`` where ``origin`` is the input timestamp
(as written in INPUT) of the last row the forecast could see, ``step`` counts
rows ahead (1 = the next row), ``model`` is the published model (e.g.
``fallback:hw``, ``lstm:v3``). Only steps that exist in INPUT are written, so
every row has an actual (empty if the cell was empty). Origins start once the
published model has calibrated bands at every step (or at row ``--warmup``) and can be
thinned with ``--every``.
"""
from __future__ import annotations

import argparse
import dataclasses
import csv
import json
import logging
import math
import sys
from pathlib import Path
from typing import IO, Callable, Sequence

import numpy as np

from agent.timeparse import parse_timestamp_s
from models.forecast import ForecastEngine, ForecastParams
from models.forecast.conformal import level_key
from models.forecast.lstm import META_FILE
from models.forecast.scoring import naive_scale, score_table

log = logging.getLogger(__name__)

COLUMNS = ("origin", "step", "actual", "forecast", "lower_80", "upper_80", "lower_95", "upper_95", "model")


def read_input(path: str | Path, metric: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(timestamp texts, ts_s, values) of ``metric`` (or of the ``value`` column when INPUT has
    no column named ``metric``)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or "timestamp" not in header:
            raise ValueError(f"{path}: expected a header with a 'timestamp' column")
        if metric in header:
            col = header.index(metric)
        elif "value" in header:
            col = header.index("value")
        else:
            raise ValueError(f"{path}: no column {metric!r} (or 'value'); columns: {', '.join(header)}")
        ti = header.index("timestamp")
        texts: list[str] = []
        ts: list[float] = []
        ys: list[float] = []
        for row in reader:
            if not row or len(row) <= ti:
                continue
            texts.append(row[ti])
            ts.append(parse_timestamp_s(row[ti]))
            cell = row[col].strip() if col < len(row) else ""
            try:
                ys.append(float(cell) if cell else math.nan)
            except ValueError:
                ys.append(math.nan)
    if len(ts) < 3:
        raise ValueError(f"{path}: need at least 3 rows, got {len(ts)}")
    return texts, np.asarray(ts), np.asarray(ys)


def find_lstm_dir(path: str | Path) -> Path:
    """A directory with an LSTM model.json, or one level above it (an unpacked bundle)."""
    p = Path(path)
    candidates = [p] + sorted(c for c in p.iterdir() if c.is_dir()) if p.is_dir() else []
    for c in candidates:
        meta = c / META_FILE
        if meta.is_file():
            try:
                if json.loads(meta.read_text(encoding="utf-8")).get("kind") == "lstm":
                    return c
            except (OSError, json.JSONDecodeError):
                continue
    raise FileNotFoundError(f"{path}: no LSTM model directory (model.json with kind 'lstm') found")


def _fmt(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else repr(float(v))   # shortest exact round trip


def backtest(input_csv: str | Path, metric: str, out_csv: str | Path | IO[str], *, model_dir: str | Path | None = None,
             horizon: int = 12, every: int = 1, warmup: int | None = None,
             params: ForecastParams | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the rolling-origin CSV; returns {"rows", "origins", "step_s", "scores": per model};
    ``progress(done, total)`` is told after every input row."""
    if every < 1:
        raise ValueError("every must be >= 1")
    texts, ts, ys = read_input(input_csv, metric)
    d = np.diff(ts)
    d = d[d > 0]
    step_s = float(np.median(d)) if len(d) else 1.0
    base = params or ForecastParams()
    params = dataclasses.replace(base, metrics=(metric,), step_s=0.0, horizon=horizon)
    engine = ForecastEngine(params, step_s=step_s)
    if model_dir is not None:
        engine.load_lstm(find_lstm_dir(model_dir))
    levels = [level_key(lv) for lv in params.conformal.levels]
    if "80" not in levels or "95" not in levels:
        raise ValueError("the backtest CSV needs the 80 and 95 % levels")
    close = isinstance(out_csv, (str, Path))
    out = open(out_csv, "w", newline="", encoding="utf-8") if close else out_csv
    rows_written = origins = 0
    first_origin: int | None = None
    scored: list[dict] = []
    try:
        writer = csv.writer(out)
        writer.writerow(COLUMNS)
        n = len(ys)
        for i in range(n):
            engine.observe_step(float(ts[i]), {metric: float(ys[i])})
            engine.maintain(max_fits=None)
            if progress is not None:
                progress(i + 1, n)
            iss = engine.issued(metric)
            if iss is None or i + 1 >= n:
                continue
            bands = iss["bands"].get(iss["published"])
            if first_origin is None:
                complete = bool(bands) and all(np.isfinite(lo).all() and np.isfinite(hi).all()
                                               for lo, hi in bands.values())
                if (warmup is not None and i < warmup) or (warmup is None and not complete):
                    continue
                first_origin = i
            if (i - first_origin) % every:
                continue
            origins += 1
            point = iss["points"][iss["published"]]
            for k in range(1, min(horizon, n - 1 - i) + 1):
                row = {"origin": texts[i], "step": k, "actual": ys[i + k], "forecast": float(point[k - 1]),
                       "model": iss["model"]}
                for lv, key in ((0.8, "80"), (0.95, "95")):
                    lo, hi = (bands[lv][0][k - 1], bands[lv][1][k - 1]) if bands else (math.nan, math.nan)
                    row[f"lower_{key}"], row[f"upper_{key}"] = lo, hi
                writer.writerow([row["origin"], k] + [_fmt(row[c]) for c in COLUMNS[2:8]] + [row["model"]])
                scored.append(row)
                rows_written += 1
    finally:
        if close:
            out.close()
    scale = naive_scale(ys[: first_origin + 1] if first_origin is not None else ys, 1)
    return {"rows": rows_written, "origins": origins, "step_s": step_s, "first_origin_row": first_origin,
            "mase_scale": scale, "scores": score_table(scored, scale)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``edge-agent backtest`` arguments (the CLI owner calls this on its subparser)."""
    parser.add_argument("input", metavar="INPUT.csv", help="CSV with a timestamp column and metric columns (or value)")
    parser.add_argument("--metric", required=True, help="column to forecast (falls back to 'value')")
    parser.add_argument("--out", required=True, metavar="OUT.csv", help="rolling-origin forecasts CSV to write")
    parser.add_argument("--model", metavar="DIR", help="LSTM model directory (forecaster.tflite + model.json)")
    parser.add_argument("--horizon", type=int, default=12, help="steps (rows) ahead, default 12")
    parser.add_argument("--every", type=int, default=1, help="use every N-th origin, default 1 (all)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="first origin row (0-based); default: once the published model has "
                             "intervals at every step")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace, params: ForecastParams | None = None, stdout: IO[str] | None = None) -> int:
    """Execute a parsed ``edge-agent backtest``; prints a per-model summary. Exit code 0/2."""
    stdout = stdout or sys.stdout   # looked up now, not at import: a redirected stdout must be honoured
    from agent.progress import Progress

    try:
        with Progress("backtest", quiet=getattr(args, "quiet", False)) as bar:
            summary = backtest(args.input, args.metric, args.out, model_dir=args.model, horizon=args.horizon,
                               every=args.every, warmup=args.warmup, params=params, progress=bar)
    except (OSError, ValueError) as exc:
        print(f"backtest: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        stdout.write(json.dumps(summary, indent=1, default=float) + "\n")
        return 0
    stdout.write(f"{summary['origins']} origins, {summary['rows']} rows -> {args.out} "
                 f"(step {summary['step_s']:g}s, MASE scale = in-sample naive MAE {summary['mase_scale']:.4g})\n")
    for name, s in sorted(summary["scores"].items(), key=lambda kv: (kv[0] == "all", kv[0])):
        stdout.write(f"  {name:16s} n={int(s['n']):6d}  MAE {s['mae']:.4g}  MASE {s['mase']:.3f}  "
                     f"coverage80 {s['coverage_80']:.3f}  coverage95 {s['coverage_95']:.3f}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edge-agent backtest", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
