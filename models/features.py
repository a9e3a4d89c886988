"""Feature vectors for the detectors, from sample dicts (metric name -> float).

A model is only ever fed columns in the order of the feature-name list saved with
it, so the list itself is the contract: ``spec_from_names(names)`` rebuilds the
exact transformation from the names alone (no hidden state in a model file).

Naming: a base feature is a metric name (``system.cpuUsage``). Optional derived
short-window statistics carry a suffix: ``<metric>|mean<k>``, ``<metric>|std<k>``
(rolling over the last k transformed values, current one included) and
``<metric>|diff1`` (first difference). Rates (metric names ending in ``PerSec``)
are log1p-transformed (negative rates clipped to 0) because they span orders
of magnitude; cumulative counters are never features.

Missing values (explicit policy): a metric absent from a sample, or NaN/inf,
is forward-filled with the last observed value of that metric (rates are absent
on the first sample and after a counter reset; a sensor can drop out). A metric
never observed yet stays NaN: the z-score ignores NaN features (z = 0 and the
value is not learnt) and the forest does not score a row that still has a NaN.
Derived statistics are computed on the forward-filled series; while fewer than
k values exist they use what is there (std of one value is 0, diff of the
first value is 0).
"""
from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

log = logging.getLogger(__name__)

DEFAULT_FEATURES: tuple[str, ...] = (
    "system.cpuUsage",
    "system.memoryPercent",
    "system.diskPercent",
    "system.swapPercent",
    "system.load1",
    "disk.readBytesPerSec",
    "disk.writeBytesPerSec",
    "network.bytesReceivedPerSec",
    "network.bytesSentPerSec",
    "system.temperature",
)

# Cumulative counters and totals: never features (they only grow or are constant).
COUNTER_METRICS: frozenset[str] = frozenset({
    "disk.readBytes", "disk.writeBytes", "network.bytesReceived", "network.bytesSent",
    "system.uptime", "system.memoryTotal", "system.swapTotal", "system.diskTotal",
})

_SEP = "|"


def is_counter(metric: str) -> bool:
    base = metric.split(":", 1)[0]
    return base in COUNTER_METRICS or base.startswith("system.diskTotal")


def metric_domain(metric: str) -> tuple[float, float]:
    """The values a metric can take: percentages 0..100; the device's byte, rate, load, count and
    time metrics >= 0; anything else (temperatures, CSV columns) unbounded. Forecasts are clipped
    to it, so a band never promises -3 % CPU."""
    base = metric.split(":", 1)[0]
    if base.endswith("Percent") or base == "system.cpuUsage" or base.startswith("system.cpuUsage."):
        return 0.0, 100.0
    if base.startswith(("system.", "disk.", "network.")) and not base.endswith("temperature"):
        return 0.0, math.inf
    return -math.inf, math.inf


# Sampled and exported, but not what detectors watch: besides the counters and totals above, the
# process count, a small integer that jumps with every cron job and says nothing a rate does not.
NON_FEATURE_LEVELS: frozenset[str] = frozenset({"system.processCount"})


def is_detector_feature(metric: str) -> bool:
    """False for a sampled metric a detector must not be fed (a replay skips such a CSV column)."""
    return not is_counter(metric) and metric.split(":", 1)[0] not in NON_FEATURE_LEVELS


def is_rate(metric: str) -> bool:
    return metric.endswith("PerSec")


@dataclass(frozen=True)
class FeatureSpec:
    """Everything needed to turn samples into vectors; derived from names."""

    names: tuple[str, ...]          # output columns, in order
    bases: tuple[str, ...]          # distinct base metrics, in first-use order
    # per output column: (base index, op, k) with op in {"value", "mean", "std", "diff1"}
    ops: tuple[tuple[int, str, int], ...]

    @property
    def max_window(self) -> int:
        return max([k for _, op, k in self.ops if op in ("mean", "std")] + [2])


def derived_names(bases: Sequence[str], window: int, stats: Sequence[str] = ("mean", "std", "diff1")) -> tuple[str, ...]:
    """Base features followed by their short-window statistics (the optional feature set)."""
    out = list(bases)
    for b in bases:
        for s in stats:
            out.append(f"{b}{_SEP}diff1" if s == "diff1" else f"{b}{_SEP}{s}{window}")
    return tuple(out)


def spec_from_names(names: Sequence[str]) -> FeatureSpec:
    bases: list[str] = []
    ops: list[tuple[int, str, int]] = []
    for name in names:
        base, _, suffix = name.partition(_SEP)
        if is_counter(base):
            raise ValueError(f"{base!r} is a cumulative counter and never a feature")
        if base not in bases:
            bases.append(base)
        bi = bases.index(base)
        if not suffix:
            ops.append((bi, "value", 1))
        elif suffix == "diff1":
            ops.append((bi, "diff1", 2))
        elif suffix.startswith("mean") or suffix.startswith("std"):
            op = "mean" if suffix.startswith("mean") else "std"
            k = int(suffix[len(op):])
            if k < 1:
                raise ValueError(f"bad window in feature name {name!r}")
            ops.append((bi, op, k))
        else:
            raise ValueError(f"unknown feature suffix in {name!r}")
    if len(set(names)) != len(names):
        raise ValueError("duplicate feature names")
    return FeatureSpec(tuple(names), tuple(bases), tuple(ops))


def transform_value(metric: str, value: float) -> float:
    """Per-metric transform (log1p for rates); NaN for missing or non-finite."""
    if value is None:
        return math.nan
    v = float(value)
    if not math.isfinite(v):
        return math.nan
    if is_rate(metric):
        return math.log1p(max(v, 0.0))
    return v


def select_feature_names(rows: Iterable[Mapping[str, float]], candidates: Sequence[str] = DEFAULT_FEATURES,
                         min_presence: float = 0.5) -> tuple[str, ...]:
    """Candidates present (finite) in at least ``min_presence`` of the rows, in candidate order.

    Why: a device without a temperature sensor or swap must not train a model on a
    column that is always missing.
    """
    rows = list(rows)
    if not rows:
        return ()
    out = []
    for name in candidates:
        n = sum(1 for r in rows if name in r and r[name] is not None and math.isfinite(float(r[name])))
        if n >= min_presence * len(rows):
            out.append(name)
    return tuple(out)


def base_matrix(rows: Sequence[Mapping[str, float]], bases: Sequence[str]) -> np.ndarray:
    """Transformed, forward-filled base metrics, shape (n_rows, n_bases); NaN until first seen."""
    m = np.full((len(rows), len(bases)), np.nan)
    for i, r in enumerate(rows):
        for j, b in enumerate(bases):
            if b in r:
                m[i, j] = transform_value(b, r[b])
    # forward fill per column
    for j in range(m.shape[1]):
        col = m[:, j]
        ok = ~np.isnan(col)
        idx = np.where(ok, np.arange(len(col)), -1)
        np.maximum.accumulate(idx, out=idx)
        filled = np.where(idx >= 0, col[np.maximum(idx, 0)], np.nan)
        m[:, j] = filled
    return m


def _rolling(col: np.ndarray, k: int, op: str) -> np.ndarray:
    n = len(col)
    out = np.empty(n)
    fn = np.mean if op == "mean" else np.std
    head = min(k - 1, n)
    for i in range(head):
        out[i] = _stat_nan(col[: i + 1], fn)
    if n >= k:
        win = sliding_window_view(col, k)
        with np.errstate(invalid="ignore"):
            vals = fn(win, axis=1)
        # windows containing NaN (metric not seen yet) use the finite part
        bad = np.isnan(win).any(axis=1)
        if bad.any():
            for w in np.nonzero(bad)[0]:
                vals[w] = _stat_nan(win[w], fn)
        out[k - 1:] = vals
    return out


def _stat_nan(window: np.ndarray, fn) -> float:
    w = window[~np.isnan(window)]
    return float(fn(w)) if len(w) else math.nan


def _diff1(col: np.ndarray) -> np.ndarray:
    out = np.zeros(len(col))
    if len(col) > 1:
        out[1:] = col[1:] - col[:-1]
        # the first finite value has no predecessor: 0, not NaN
        prev_nan = np.isnan(col[:-1]) & ~np.isnan(col[1:])
        out[1:][prev_nan] = 0.0
    out[np.isnan(col)] = np.nan
    return out


def build_matrix(rows: Sequence[Mapping[str, float]], names: Sequence[str]) -> np.ndarray:
    """Batch feature matrix (n_rows, n_features); equals FeatureBuilder row by row."""
    spec = spec_from_names(names)
    base = base_matrix(rows, spec.bases)
    out = np.empty((len(rows), len(spec.names)))
    for c, (bi, op, k) in enumerate(spec.ops):
        col = base[:, bi]
        if op == "value":
            out[:, c] = col
        elif op == "diff1":
            out[:, c] = _diff1(col)
        else:
            out[:, c] = _rolling(col, k, op)
    return out


class FeatureBuilder:
    """Streaming counterpart of ``build_matrix``: one ``update(values)`` per sample.

    Per-sample work is a handful of vectorised numpy ops over the base metrics,
    whatever the number of derived columns.
    """

    def __init__(self, names: Sequence[str]):
        self.spec = spec_from_names(names)
        nb = len(self.spec.bases)
        self._last = np.full(nb, np.nan)
        self._prev = np.full(nb, np.nan)
        self._hist = deque(maxlen=self.spec.max_window)
        ops = self.spec.ops
        self._value_cols = np.array([c for c, (_, op, _) in enumerate(ops) if op == "value"], dtype=np.intp)
        self._value_src = np.array([b for b, op, _ in ops if op == "value"], dtype=np.intp)
        self._diff_cols = np.array([c for c, (_, op, _) in enumerate(ops) if op == "diff1"], dtype=np.intp)
        self._diff_src = np.array([b for b, op, _ in ops if op == "diff1"], dtype=np.intp)
        # rolling stats grouped by (op, k): one reduction per group
        groups: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        for c, (b, op, k) in enumerate(ops):
            if op in ("mean", "std"):
                cols, src = groups.setdefault((op, k), ([], []))
                cols.append(c)
                src.append(b)
        self._groups = [(op, k, np.array(cols, dtype=np.intp), np.array(src, dtype=np.intp))
                        for (op, k), (cols, src) in groups.items()]

    @property
    def names(self) -> tuple[str, ...]:
        return self.spec.names

    def update(self, values: Mapping[str, float]) -> np.ndarray:
        self._prev[:] = self._last
        for j, b in enumerate(self.spec.bases):
            if b in values:
                v = transform_value(b, values[b])
                if not math.isnan(v):
                    self._last[j] = v
        cur = self._last
        out = np.empty(len(self.spec.ops))
        out[self._value_cols] = cur[self._value_src]
        if len(self._diff_cols):
            c, p = cur[self._diff_src], self._prev[self._diff_src]
            # the first observed value has no predecessor: 0; never observed: NaN
            out[self._diff_cols] = np.where(np.isnan(p), np.where(np.isnan(c), np.nan, 0.0), c - p)
        if self._groups:
            self._hist.append(cur.copy())
            hist = np.asarray(self._hist)
            for op, k, cols, src in self._groups:
                w = hist[-k:][:, src]
                if np.isnan(w).any():
                    fn = np.mean if op == "mean" else np.std
                    out[cols] = [_stat_nan(w[:, i], fn) for i in range(w.shape[1])]
                else:
                    out[cols] = w.mean(axis=0) if op == "mean" else w.std(axis=0)
        return out
