"""Robust rolling z-score per feature: the detector that runs from the first samples.

Choice: rolling median / MAD over the last ``window`` samples rather than an EWMA.
Why: an EWMA mean and variance are dragged by the very outliers we want to flag
(a spike inflates the variance for a long time and hides the next spike), and
device metrics are skewed and spiky. Median/MAD has a 50 % breakdown point, so
up to half the window can be anomalous before the baseline moves. The cost is a
partial sort of the (window x features) buffer; ``refresh_every`` recomputes the
baseline every k samples (default 10: ~1 ms per refresh for 30 features x 3000
rows on x86, amortised to ~0.1 ms/sample) and the result stays deterministic:
the batch function reproduces it exactly.

A sample is scored against the baseline of the samples BEFORE it (it cannot
mask itself), then joins the window. No z is produced (all zeros, ``ready``
False) until ``warmup`` samples were seen. Scale: 1.4826*MAD (consistent with a
normal sigma); when MAD is 0 (more than half the window equal, e.g. idle swap)
the mean absolute deviation from the median (x1.2533) is used, and when that is
0 too a floor ``min_scale_abs + min_scale_rel*|median|`` so that a constant
series that moves is flagged with a large but finite z.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

MAD_TO_SIGMA = 1.4826
MEANAD_TO_SIGMA = 1.2533


@dataclass(frozen=True)
class ZScoreParams:
    window: int = 3000          # samples in the rolling baseline (50 min at 1 Hz)
    warmup: int = 30            # samples before any z is reported
    refresh_every: int = 10     # recompute median/MAD every k samples
    min_scale_abs: float = 1e-6
    min_scale_rel: float = 1e-3
    clip: float = 1e3           # |z| is clipped to this (keeps sums finite)

    def __post_init__(self) -> None:
        if self.window < 2 or self.warmup < 1 or self.refresh_every < 1:
            raise ValueError("window >= 2, warmup >= 1, refresh_every >= 1 required")


def robust_center_scale(buf: np.ndarray, params: ZScoreParams) -> tuple[np.ndarray, np.ndarray]:
    """Median and sigma-consistent scale per column of ``buf`` (rows = samples)."""
    if np.isnan(buf).any():
        # a feature never observed (no temperature sensor) has an all-NaN column: its center and
        # scale stay NaN (z = 0) and numpy is not asked for the median of nothing
        seen = ~np.isnan(buf).all(axis=0)
        med = np.full(buf.shape[1], np.nan)
        mad = np.full(buf.shape[1], np.nan)
        meanad = np.full(buf.shape[1], np.nan)
        if seen.any():
            b = buf[:, seen]
            m = np.nanmedian(b, axis=0)
            dev = np.abs(b - m)
            med[seen], mad[seen], meanad[seen] = m, np.nanmedian(dev, axis=0), np.nanmean(dev, axis=0)
    else:
        med = np.median(buf, axis=0)
        dev = np.abs(buf - med)
        mad = np.median(dev, axis=0)
        meanad = np.mean(dev, axis=0)
    scale = MAD_TO_SIGMA * mad
    alt = MEANAD_TO_SIGMA * meanad
    scale = np.where(scale > 0, scale, alt)
    floor = params.min_scale_abs + params.min_scale_rel * np.abs(med)
    scale = np.where(np.isfinite(scale) & (scale > floor), scale, floor)
    return med, scale


class RollingZScore:
    """Streaming robust z; ``update(x)`` costs one median over the buffer at most."""

    def __init__(self, n_features: int, params: ZScoreParams = ZScoreParams()):
        self.params = params
        self.n_features = n_features
        self._buf = np.full((params.window, n_features), np.nan)
        self._pos = 0
        self._count = 0
        self._since_refresh = params.refresh_every  # force a refresh on first use
        self.center = np.full(n_features, np.nan)
        self.scale = np.full(n_features, np.nan)

    @property
    def ready(self) -> bool:
        return self._count >= self.params.warmup

    @property
    def count(self) -> int:
        return self._count

    def _refresh(self) -> None:
        n = min(self._count, self.params.window)
        self.center, self.scale = robust_center_scale(self._buf[:n] if n < self.params.window else self._buf,
                                                      self.params)
        self._since_refresh = 0

    def update(self, x: np.ndarray) -> np.ndarray:
        """z of ``x`` against the window before it; zeros during warm-up."""
        x = np.asarray(x, dtype=np.float64)
        if self.ready:
            if self._since_refresh >= self.params.refresh_every:
                self._refresh()
            with np.errstate(invalid="ignore"):
                z = (x - self.center) / self.scale
            z = np.nan_to_num(z, nan=0.0, posinf=self.params.clip, neginf=-self.params.clip)
            np.clip(z, -self.params.clip, self.params.clip, out=z)
        else:
            z = np.zeros(self.n_features)
        # learn: buffer rows keep the sample order; a fully NaN row is not learnt
        if not np.isnan(x).all():
            self._buf[self._pos] = x
            self._pos = (self._pos + 1) % self.params.window
            self._count += 1
            self._since_refresh += 1
        return z

    def state(self) -> dict:
        return {"count": self._count, "ready": self.ready,
                "center": self.center.tolist(), "scale": self.scale.tolist()}


def rolling_zscores(X: np.ndarray, params: ZScoreParams = ZScoreParams()) -> np.ndarray:
    """Batch equivalent of feeding ``RollingZScore`` row by row (used by tests and replays)."""
    X = np.asarray(X, dtype=np.float64)
    n, f = X.shape
    out = np.zeros((n, f))
    learnt: list[int] = []          # row indices that were learnt, in order
    center = scale = None
    since = params.refresh_every
    for i in range(n):
        if len(learnt) >= params.warmup:
            if since >= params.refresh_every:
                rows = learnt[-params.window:]
                center, scale = robust_center_scale(X[rows], params)
                since = 0
            with np.errstate(invalid="ignore"):
                z = (X[i] - center) / scale
            z = np.nan_to_num(z, nan=0.0, posinf=params.clip, neginf=-params.clip)
            out[i] = np.clip(z, -params.clip, params.clip)
        if not np.isnan(X[i]).all():
            learnt.append(i)
            since += 1
    return out


@dataclass(frozen=True)
class DailyProfileParams:
    buckets: int = 24              # slots per period (hours of the day)
    period_s: float = 86400.0
    memory_days: float = 4.0       # each slot's mean/deviation forget with this memory, in periods ...
    min_days: float = 1.5          # ... and give no z before this many periods of samples were seen

    def __post_init__(self) -> None:
        if self.buckets < 1 or self.period_s <= 0 or self.memory_days <= 0 or self.min_days < 0:
            raise ValueError("buckets >= 1, period_s > 0, memory_days > 0, min_days >= 0 required")


class DailyProfileZ:
    """z of each feature against the same time of day on previous days (contextual anomalies).

    Why: the rolling median/MAD only knows the last ``window`` samples, so a value
    that is ordinary for the day but wrong for the hour (a backup that did not run,
    traffic flat at noon) is invisible to it. Per time-of-day slot this keeps an
    exponentially weighted mean and mean absolute deviation (O(slots x features)
    memory, a few vector ops per sample). The forgetting rate is set in days, not
    samples: samples per slot per day are estimated from the observed spacing of
    timestamps, so 1 s and 5 min data behave alike. A sample is scored before it
    is learnt; z is 0 while its slot has seen fewer than ``min_days`` days.
    """

    def __init__(self, n_features: int, params: DailyProfileParams = DailyProfileParams()):
        self.params = params
        nb = params.buckets
        self.mean = np.zeros((nb, n_features))
        self.dev = np.zeros((nb, n_features))
        self.count = np.zeros((nb, n_features))
        self._last_ts: float | None = None
        self._dt_s: float | None = None
        self.center = np.full(n_features, np.nan)   # of the last scored sample's slot (for explanations)
        self.scale = np.full(n_features, np.nan)

    def update(self, ts_s: float, x: np.ndarray, zparams: ZScoreParams = ZScoreParams()) -> np.ndarray:
        p = self.params
        slot_s = p.period_s / p.buckets
        if self._last_ts is not None and ts_s > self._last_ts:
            dt = min(ts_s - self._last_ts, slot_s)
            self._dt_s = dt if self._dt_s is None else self._dt_s + 0.01 * (dt - self._dt_s)
        self._last_ts = ts_s
        per_day = slot_s / self._dt_s if self._dt_s else math.inf   # samples per slot per period
        k = int((ts_s % p.period_s) // slot_s) % p.buckets
        x = np.asarray(x, dtype=np.float64)
        mean, dev, cnt = self.mean[k], self.dev[k], self.count[k]
        scale = MEANAD_TO_SIGMA * dev + zparams.min_scale_abs + zparams.min_scale_rel * np.abs(mean)
        ok = ~np.isnan(x)
        ready = ok & (cnt >= p.min_days * per_day) & (cnt > 0)
        z = np.zeros(len(x))
        z[ready] = np.clip((x[ready] - mean[ready]) / scale[ready], -zparams.clip, zparams.clip)
        self.center, self.scale = np.where(ready, mean, np.nan), np.where(ready, scale, np.nan)
        # learn: running mean until the memory is reached, then exponential forgetting
        cnt[ok] += 1
        alpha = np.maximum(1.0 / np.maximum(cnt[ok], 1), 1.0 / max(p.memory_days * per_day, 1.0))
        d = x[ok] - mean[ok]
        mean[ok] += alpha * d
        first = cnt[ok] == 1
        dev[ok] += np.where(first, 0.0, alpha * (np.abs(x[ok] - mean[ok]) - dev[ok]))
        return z
