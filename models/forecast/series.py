"""Time-series plumbing shared by the device, training and backtests.

Why a module of its own: the LSTM must be trained on exactly the steps the
device forecasts on (bucket means over ``step_s``, forward-filled gaps, the same
time-of-day features), so training, the engine and the backtest all call these
functions instead of re-implementing them. ``models`` may not import ``agent``,
hence the small timestamp parser here.
"""
from __future__ import annotations

import csv
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

DAY_S = 86400.0
TIME_FEATURES: tuple[str, ...] = ("time:tod_sin", "time:tod_cos")


def parse_ts_s(text: str) -> float:
    """ISO 8601 (naive means UTC) or epoch seconds -> epoch seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def read_csv_columns(path: str | Path, columns: Sequence[str] | None = None
                     ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A CSV with a ``timestamp`` column -> (ts_s, {column: float array}); empty cells are NaN.

    ``columns=None`` keeps every numeric column except the timestamp.
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        if "timestamp" not in header:
            raise ValueError(f"{path}: no 'timestamp' column (have {header})")
        ts_idx = header.index("timestamp")
        wanted = [c for c in header if c != "timestamp"] if columns is None else list(columns)
        missing = [c for c in wanted if c not in header]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing} (have {header})")
        idx = [header.index(c) for c in wanted]
        ts: list[float] = []
        cols: list[list[float]] = [[] for _ in wanted]
        for row in reader:
            if not row:
                continue
            ts.append(parse_ts_s(row[ts_idx]))
            for out, i in zip(cols, idx):
                cell = row[i].strip() if i < len(row) else ""
                try:
                    out.append(float(cell) if cell else math.nan)
                except ValueError:
                    out.append(math.nan)
    return np.asarray(ts, dtype=np.float64), {c: np.asarray(v, dtype=np.float64) for c, v in zip(wanted, cols)}


def rows_to_columns(rows: Iterable[tuple[float, Mapping[str, float]] | Mapping[str, float]],
                    metrics: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ts_s, values) tuples or dicts holding ``ts_s`` -> (ts (n,), X (n, len(metrics))) with NaN holes."""
    ts: list[float] = []
    X: list[list[float]] = []
    for row in rows:
        if isinstance(row, tuple):
            t, values = row
        else:
            values = row
            t = row["ts_s"]
        ts.append(float(t))
        X.append([float(values.get(m, math.nan)) for m in metrics])
    return np.asarray(ts, dtype=np.float64), np.asarray(X, dtype=np.float64).reshape(len(ts), len(metrics))


def ffill(X: np.ndarray) -> np.ndarray:
    """Forward-fill NaN/inf down each column; leading holes stay NaN."""
    X = np.array(X, dtype=np.float64, copy=True)
    one_d = X.ndim == 1
    if one_d:
        X = X[:, None]
    bad = ~np.isfinite(X)
    if bad.any():
        n = len(X)
        idx = np.where(~bad, np.arange(n)[:, None], 0)
        np.maximum.accumulate(idx, axis=0, out=idx)
        filled = X[idx, np.arange(X.shape[1])]
        # rows before the first finite value of a column keep NaN
        first_ok = np.where((~bad).any(axis=0), (~bad).argmax(axis=0), n)
        filled[np.arange(n)[:, None] < first_ok[None, :]] = np.nan
        X = filled
    return X[:, 0] if one_d else X


def infer_step_s(ts_s: np.ndarray) -> float:
    """Median spacing of timestamps (the sampling interval of a CSV export)."""
    d = np.diff(np.asarray(ts_s, dtype=np.float64))
    d = d[d > 0]
    if len(d) == 0:
        raise ValueError("need at least two distinct timestamps to infer the step")
    return float(np.median(d))


def resample_mean(ts_s: np.ndarray, X: np.ndarray, step_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Bucket means over ``step_s`` (bucket end time as its timestamp), gaps forward-filled.

    The engine's ``StepAggregator`` does the same thing online; both stamp a step
    with the END of its bucket, i.e. the moment its mean is known.
    """
    ts_s = np.asarray(ts_s, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if len(ts_s) == 0:
        return ts_s, X
    b = np.floor(ts_s / step_s).astype(np.int64)
    b0, b1 = int(b.min()), int(b.max())
    nb = b1 - b0 + 1
    sums = np.zeros((nb, X.shape[1]))
    counts = np.zeros((nb, X.shape[1]))
    ok = np.isfinite(X)
    np.add.at(sums, b - b0, np.where(ok, X, 0.0))
    np.add.at(counts, b - b0, ok.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    out_ts = (np.arange(b0, b1 + 1, dtype=np.float64) + 1.0) * step_s
    return out_ts, ffill(means)


def season_steps(step_s: float, season_s: float = DAY_S) -> int:
    """Steps per season (a day by default): 288 for 5-minute data, 1440 for 1-minute steps."""
    return max(1, int(round(season_s / float(step_s))))


def time_features(ts_s: np.ndarray | float) -> np.ndarray:
    """(n, 2) sin/cos of the UTC time of day; lets a 50-step LSTM window know where in the day it is."""
    t = np.atleast_1d(np.asarray(ts_s, dtype=np.float64))
    ang = 2.0 * np.pi * np.mod(t, DAY_S) / DAY_S
    return np.stack([np.sin(ang), np.cos(ang)], axis=1)
