"""NAB v1.1 scoring rules, re-implemented from NAB's documented behaviour (no NAB code).

Per file (NAB's sweeper): rows before the probationary length
``min(floor(0.15 * N), 0.15 * 5000)`` are not scored. A row inside a window
(entered at the row whose timestamp equals the window start, left after the row
equal to its end) is worth ``S(-(right - i + 1) / width) * tp / S(-1)`` if
detected, where ``S(x) = 2 / (1 + exp(5x)) - 1`` (and ``S(x) = -1`` for x >= 3),
``right`` is the window's last row index and ``width`` its row count; a window
earns the best (= earliest) of its detected rows, or ``-fn`` when none is
detected. A detected row outside windows costs ``fp * S(|prev_right - i| /
(prev_width - 1))`` after a window, and ``-fp`` (S(3)) before the first window.

A detector's score for a profile is the corpus total at the single anomaly-score
threshold (detection = anomaly_score >= threshold) that maximises it, found by
sweeping every distinct score value over the whole corpus; it is normalised as
``100 * (raw - null) / (perfect - null)`` with null = the same optimisation for a
detector that always outputs 0, and perfect = number of windows * tp weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

import numpy as np

PROFILES: dict[str, dict[str, float]] = {
    "standard": {"tpWeight": 1.0, "fpWeight": 0.11, "fnWeight": 1.0},
    "reward_low_FP_rate": {"tpWeight": 1.0, "fpWeight": 0.22, "fnWeight": 1.0},
    "reward_low_FN_rate": {"tpWeight": 1.0, "fpWeight": 0.11, "fnWeight": 2.0},
}
PROBATION_PERCENT = 0.15


def scaled_sigmoid(x: float) -> float:
    if x >= 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * x)) - 1.0


def probationary_length(n_rows: int, percent: float = PROBATION_PERCENT) -> float:
    return min(math.floor(percent * n_rows), percent * 5000)


def parse_nab_ts(s: str) -> datetime:
    s = s.strip()
    for fmt in ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S"):
        try:
            return datetime.strptime(s, fmt)
        except ValueError:
            continue
    raise ValueError(f"bad NAB timestamp {s!r}")


@dataclass(frozen=True)
class FileRows:
    """Per-row scoring data of one file for one profile."""

    name: str
    scores: np.ndarray      # anomaly_score per scorable row
    weight: np.ndarray      # sweep score if detected
    window: np.ndarray      # global window id, -1 outside windows
    n_windows: int


def file_rows(name: str, timestamps: Sequence[datetime], anomaly_scores: Sequence[float],
              windows: Sequence[tuple[datetime, datetime]], profile: dict[str, float],
              window_base: int = 0) -> FileRows:
    n = len(timestamps)
    if len(anomaly_scores) != n:
        raise ValueError("timestamps and scores differ in length")
    index = {t: i for i, t in enumerate(timestamps)}
    max_tp = scaled_sigmoid(-1.0)
    weight = np.empty(n)
    win = np.full(n, -1, dtype=np.int64)
    spans = [(index[a], index[b]) for a, b in windows]
    prev_right = prev_width = None
    wi = 0
    i = 0
    named: set[int] = set()
    prob = probationary_length(n)
    while i < n:
        if wi < len(spans) and i == spans[wi][0]:
            left, right = spans[wi]
            width = float(right - left + 1)
            for j in range(left, right + 1):
                pos = -(right - j + 1) / width
                weight[j] = scaled_sigmoid(pos) * profile["tpWeight"] / max_tp
                if j >= prob:
                    win[j] = window_base + wi
                    named.add(window_base + wi)
            prev_right, prev_width = right, width
            wi += 1
            i = right + 1
            continue
        if prev_right is None:
            pos = 3.0
        else:
            pos = abs(prev_right - i) / float(prev_width - 1)
        weight[i] = scaled_sigmoid(pos) * profile["fpWeight"]
        i += 1
    keep = np.arange(n) >= prob
    return FileRows(name, np.asarray(anomaly_scores, dtype=np.float64)[keep], weight[keep], win[keep], len(named))


@dataclass(frozen=True)
class SweepResult:
    threshold: float
    score: float
    tp: int
    fp: int
    fn: int


def sweep(files: Sequence[FileRows], profile: dict[str, float]) -> SweepResult:
    """Best corpus score over all thresholds (detection = score >= threshold)."""
    scores = np.concatenate([f.scores for f in files])
    weight = np.concatenate([f.weight for f in files])
    win = np.concatenate([f.window for f in files])
    ids = sorted({int(w) for w in win if w >= 0})
    n_windows = len(ids)
    base = -profile["fnWeight"] * n_windows
    order = np.argsort(-scores, kind="stable")
    s, w, wn = scores[order], weight[order], win[order]
    delta = np.where(wn < 0, w, 0.0)
    best: dict[int, float] = {}
    inside = np.nonzero(wn >= 0)[0]
    for k in inside:
        wid = int(wn[k])
        prev = best.get(wid, -profile["fnWeight"])
        if w[k] > prev:
            delta[k] = w[k] - prev
            best[wid] = w[k]
    total = base + np.cumsum(delta)
    # a threshold can only sit between distinct score values: evaluate at the end of each tie group
    ends = np.nonzero(np.r_[s[1:] != s[:-1], True])[0]
    cand = total[ends]
    k = int(np.argmax(cand))
    if cand[k] <= base:
        return SweepResult(threshold=float(s[0]) + 1.0 if len(s) else 1.0, score=base, tp=0, fp=0, fn=n_windows)
    thr = float(s[ends[k]])
    return score_at(files, profile, thr)


def score_at(files: Sequence[FileRows], profile: dict[str, float], threshold: float) -> SweepResult:
    total = 0.0
    tp = fp = fn = 0
    for f in files:
        det = f.scores >= threshold
        out = det & (f.window < 0)
        total += float(f.weight[out].sum())
        fp += int(out.sum())
        ids = np.unique(f.window[f.window >= 0])
        for wid in ids:
            m = det & (f.window == wid)
            if m.any():
                total += float(f.weight[m].max())
                tp += 1
            else:
                total -= profile["fnWeight"]
                fn += 1
    return SweepResult(threshold=threshold, score=total, tp=tp, fp=fp, fn=fn)


def normalise(raw: float, null: float, perfect: float) -> float:
    return 100.0 * (raw - null) / (perfect - null)
