"""Prediction intervals from recent out-of-sample residuals, per horizon step.

Why conformal and not Gaussian: device metrics are skewed (CPU spikes up, never
below 0), heavy tailed and heteroscedastic; a +-1.96 sigma band is too wide on
calm days and misses every spike. Split conformal prediction needs nothing but
exchangeable residuals: for step k keep the last ``window`` signed residuals
r = actual - forecast of forecasts made k steps earlier, and the band for a new
forecast f is [f + q_lo, f + q_hi] with q_lo / q_hi the finite-sample corrected
order statistics at alpha/2 and 1 - alpha/2 (asymmetric bands for skewed
metrics). Each model has its own calibrator: residuals are a property of the model.

Time series are not exchangeable (regimes change), so on top of the rolling
window we apply adaptive conformal inference (Gibbs & Candes 2021) per level and
step: alpha_t+1 = alpha_t + gamma (alpha - miss_t). After a run of misses the
band widens, after a long run of hits it tightens, and the long-run miss rate
converges to alpha whatever the drift. ``aci_gamma = 0`` turns it off.

Realised coverage (was the actual inside the band we published?) is tracked
per level, cumulative and over the last ``coverage_window`` checks, and reported.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConformalParams:
    levels: tuple[float, ...] = (0.8, 0.95)
    window: int = 500              # residuals kept per horizon step
    min_residuals: int = 30        # below this a step has no band
    aci_gamma: float = 0.005       # adaptive conformal step size; 0 = plain split conformal
    aci_alpha_min: float = 0.002   # effective alpha is clipped to [min, max] (finite bands)
    aci_alpha_max: float = 0.6
    coverage_window: int = 1000

    def __post_init__(self) -> None:
        if not self.levels or any(not 0.0 < lv < 1.0 for lv in self.levels):
            raise ValueError("levels must be in (0, 1)")
        if self.window < 2 or self.min_residuals < 1 or self.aci_gamma < 0:
            raise ValueError("window >= 2, min_residuals >= 1, aci_gamma >= 0 required")


def level_key(level: float) -> str:
    """0.8 -> '80', 0.95 -> '95', 0.975 -> '97.5' (the names used in payloads and CSV columns)."""
    return f"{level * 100:g}"


def conformal_offsets(residuals: np.ndarray, alpha: float) -> tuple[float, float]:
    """(q_lo, q_hi) of signed residuals for miscoverage ``alpha`` with the (n+1) correction."""
    return _sorted_offsets(np.sort(np.asarray(residuals, dtype=np.float64)), alpha)


def _sorted_offsets(r: np.ndarray, alpha: float) -> tuple[float, float]:
    n = len(r)
    if n == 0:
        return -math.inf, math.inf
    hi = math.ceil((n + 1) * (1.0 - alpha / 2.0))
    lo = math.floor((n + 1) * (alpha / 2.0))
    q_hi = float(r[min(hi, n) - 1]) if hi <= n else float(r[-1])
    q_lo = float(r[max(lo, 1) - 1]) if lo >= 1 else float(r[0])
    return q_lo, q_hi


class CoverageTracker:
    """Hit/miss counts for one level: cumulative and over a rolling window."""

    def __init__(self, window: int) -> None:
        self.hits = 0
        self.total = 0
        self.recent: deque[int] = deque(maxlen=window)

    def add(self, hit: bool) -> None:
        self.hits += int(hit)
        self.total += 1
        self.recent.append(int(hit))

    def summary(self) -> dict:
        return {
            "coverage": self.hits / self.total if self.total else None,
            "n": self.total,
            "recent": (sum(self.recent) / len(self.recent)) if self.recent else None,
        }


class ConformalCalibrator:
    """Per-step residual windows + adaptive alphas + coverage for one model and one metric.

    Residuals live in an (horizon, window) ring matrix so one ``np.sort`` per
    call gives every step's order statistics.
    """

    def __init__(self, horizon: int, params: ConformalParams = ConformalParams()) -> None:
        self.horizon = horizon
        self.params = params
        self._R = np.full((horizon, params.window), np.nan)
        self._pos = np.zeros(horizon, dtype=np.int64)
        self._n = np.zeros(horizon, dtype=np.int64)
        self._alpha = {lv: np.full(horizon, 1.0 - lv) for lv in params.levels}
        self.coverage = {lv: CoverageTracker(params.coverage_window) for lv in params.levels}
        self.online_residuals = 0

    def _push(self, k: np.ndarray, r: np.ndarray) -> None:
        """Append residual r[i] to step k[i] (k 0-based, distinct)."""
        self._R[k, self._pos[k]] = r
        self._pos[k] = (self._pos[k] + 1) % self.params.window
        self._n[k] = np.minimum(self._n[k] + 1, self.params.window)

    def seed(self, residuals: np.ndarray) -> None:
        """Prime steps that have fewer than ``min_residuals`` with (n, horizon) residuals, e.g. a
        fit's in-sample ones or a model's held-out calibration set; online residuals push them out."""
        residuals = np.asarray(residuals, dtype=np.float64)
        if residuals.ndim != 2 or residuals.shape[1] < self.horizon or len(residuals) == 0:
            return
        for k in range(self.horizon):
            if self._n[k] >= self.params.min_residuals:
                continue
            col = residuals[:, k]
            col = col[np.isfinite(col)][-self.params.window:]
            self._R[k, :] = np.nan
            self._R[k, :len(col)] = col
            self._n[k] = len(col)
            self._pos[k] = len(col) % self.params.window

    def reset_residuals(self) -> None:
        """Forget residuals (the model behind this calibrator changed); coverage and alphas stay."""
        self._R[:] = np.nan
        self._pos[:] = 0
        self._n[:] = 0

    def ready(self, step: int = 1) -> bool:
        return bool(self._n[step - 1] >= self.params.min_residuals)

    def bands(self, point: np.ndarray) -> dict[float, tuple[np.ndarray, np.ndarray]] | None:
        """{level: (lower, upper)} around ``point`` (len horizon); NaN where a step is not ready yet.
        None when no step is ready."""
        n = self._n
        ready = n >= self.params.min_residuals
        if not ready.any():
            return None
        point = np.asarray(point, dtype=np.float64)
        R = np.sort(self._R, axis=1)                     # NaN (empty slots) sort last
        rows = np.arange(self.horizon)
        nn = np.maximum(n, 1)
        out: dict[float, tuple[np.ndarray, np.ndarray]] = {}
        for lv in self.params.levels:
            a = np.clip(self._alpha[lv], self.params.aci_alpha_min, self.params.aci_alpha_max)
            hi_rank = np.minimum(np.ceil((nn + 1) * (1.0 - a / 2.0)), nn).astype(np.int64)
            lo_rank = np.maximum(np.floor((nn + 1) * (a / 2.0)), 1).astype(np.int64)
            lo = np.where(ready, point + R[rows, lo_rank - 1], np.nan)
            hi = np.where(ready, point + R[rows, hi_rank - 1], np.nan)
            out[lv] = (lo, hi)
        return out

    def observe_steps(self, steps: np.ndarray, actual: float, forecasts: np.ndarray,
                      issued: dict[float, tuple[np.ndarray, np.ndarray]] | None) -> None:
        """Forecasts made ``steps`` (1-based, distinct) steps ago meet their common actual: score the
        bands published then (if any), move the adaptive alphas, learn the residuals."""
        if not math.isfinite(actual):
            return
        k = np.asarray(steps, dtype=np.int64) - 1
        f = np.asarray(forecasts, dtype=np.float64)
        ok = np.isfinite(f)
        if not ok.all():
            k, f = k[ok], f[ok]
            issued = {lv: (lo[ok], hi[ok]) for lv, (lo, hi) in issued.items()} if issued else None
        if len(k) == 0:
            return
        if issued:
            for lv, (lo, hi) in issued.items():
                if lv not in self._alpha:
                    continue
                has = np.isfinite(lo) & np.isfinite(hi)
                if not has.any():
                    continue
                hit = (lo[has] <= actual) & (actual <= hi[has])
                tracker = self.coverage[lv]
                for h_ in hit.tolist():
                    tracker.add(h_)
                if self.params.aci_gamma > 0:
                    kk = k[has]
                    a = self._alpha[lv][kk] + self.params.aci_gamma * ((1.0 - lv) - (~hit).astype(np.float64))
                    # keep the raw alpha in a bounded range so a long streak cannot wind it up
                    self._alpha[lv][kk] = np.clip(a, -0.5, 1.0)
        self._push(k, actual - f)
        self.online_residuals += len(k)

    def observe(self, step: int, actual: float, forecast: float,
                issued_bands: dict[float, tuple[float, float]] | None) -> None:
        """Scalar form of ``observe_steps`` for one forecast."""
        issued = {lv: (np.array([lo]), np.array([hi])) for lv, (lo, hi) in issued_bands.items()} \
            if issued_bands else None
        self.observe_steps(np.array([step]), actual, np.array([forecast]), issued)

    def summary(self) -> dict:
        return {
            "residuals": int(self._n[0]),
            "coverage": {level_key(lv): t.summary() for lv, t in self.coverage.items()},
            "alpha": {level_key(lv): float(np.mean(a)) for lv, a in self._alpha.items()},
        }
