"""Numpy-only forecasters trained on the device from its own buffer.

They run from the first minutes (the LSTM needs a trained artefact) and stay as
the safety net when the LSTM's recent error is worse (see ``selector``).

Structure, picked by data length and then by error:
- fewer than ``min_trend_steps`` steps: naive (last value);
- otherwise: damped-trend Holt (phi < 1, so a trend is never extrapolated
  linearly forever), naive, and - once ``min_seasons`` full days exist -
  seasonal naive and additive Holt-Winters with a daily season
  (season length in steps = season_s / step_s: 288 for 5-minute data).
The candidate with the smallest in-sample multi-step MAE (mean over steps
1..h of |y[t+k] - yhat(t+k|t)|, every origin of the fit window) wins. Those
in-sample forecasts are predictive (the filter at t has only seen y[..t]; only
the 3-4 smoothing constants saw the whole window), which is why their residuals
are a fair seed for the conformal intervals until online residuals exist.

Smoothing constants come from a coordinate descent over a small grid (about 30
filter passes), so a fit costs O(30 x window) scalar steps; the window is
capped at ``fit_max_seasons`` days (or ``fit_max_steps`` without a season).

Robustness: device metrics spike (a cron job, a compile). A plain Holt-Winters
filter moves its level by alpha x spike and its season by gamma x spike, and
forecasts the echo a day later. We clip the innovation at ``clip_sigma`` times a
running scale (a Huber-type robust exponential smoothing, Gelper, Fried & Croux
2010) before it updates level, trend and season; the running scale grows while
errors keep hitting the clip, so a genuine level shift is adopted in a few steps.
The scale is floored by half the window's mean absolute step change so that a
long flat stretch cannot freeze the filter.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

_GRID = {
    "alpha": (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9, 1.0),
    "beta": (0.0, 0.01, 0.03, 0.1, 0.2),
    "phi": (0.8, 0.9, 0.95, 0.98, 1.0),     # 1.0 = undamped Holt (a steady leak); chosen only on evidence
    "gamma": (0.0, 0.02, 0.05, 0.1, 0.2, 0.4),
}
_START = {"alpha": 0.35, "beta": 0.01, "phi": 0.9, "gamma": 0.05}
_MEANAD_TO_SIGMA = 1.2533


@dataclass(frozen=True)
class FallbackParams:
    min_trend_steps: int = 24        # below this many steps: naive only
    min_seasons: float = 2.0         # full seasons before seasonal candidates are tried
    fit_max_seasons: float = 4.0     # fit window cap with a season (in seasons)
    fit_max_steps: int = 2000        # fit window cap without a season (in steps)
    robust: bool = True
    clip_sigma: float = 3.0
    sigma_lambda: float = 0.05       # EWMA weight of the running error scale
    sweeps: int = 2                  # coordinate-descent sweeps over the grid
    season_smooth_frac: float = 0.02  # initial season: circular moving average over this fraction of a season
    seed_residuals: int = 500        # in-sample residual origins kept for conformal seeding
    kinds: tuple[str, ...] = ("naive", "snaive", "damped", "hw")

    def __post_init__(self) -> None:
        if self.min_trend_steps < 3 or self.min_seasons < 1 or self.clip_sigma <= 0:
            raise ValueError("min_trend_steps >= 3, min_seasons >= 1, clip_sigma > 0 required")
        unknown = set(self.kinds) - {"naive", "snaive", "damped", "hw"}
        if unknown or "naive" not in self.kinds:
            raise ValueError(f"kinds must include 'naive' and be among naive/snaive/damped/hw, got {self.kinds}")


class PointForecaster(Protocol):
    kind: str

    def update(self, y: float) -> None: ...

    def forecast(self, horizon: int) -> np.ndarray: ...


class NaiveModel:
    """y(t+k) = y(t)."""

    kind = "naive"

    def __init__(self, last: float) -> None:
        self.last = float(last)

    def update(self, y: float) -> None:
        if math.isfinite(y):
            self.last = float(y)

    def forecast(self, horizon: int) -> np.ndarray:
        return np.full(horizon, self.last)

    def state(self) -> dict:
        return {"kind": self.kind, "last": self.last}


class SeasonalNaiveModel:
    """y(t+k) = y(t+k-m): yesterday at the same time of day (k <= m)."""

    kind = "snaive"

    def __init__(self, last_season: np.ndarray) -> None:
        self.buf = np.array(last_season, dtype=np.float64)   # oldest first, len m
        self.m = len(self.buf)
        self.pos = 0                                          # index of the oldest value

    def update(self, y: float) -> None:
        if not math.isfinite(y):
            y = self.buf[(self.pos - 1) % self.m]
        self.buf[self.pos] = y
        self.pos = (self.pos + 1) % self.m

    def forecast(self, horizon: int) -> np.ndarray:
        idx = (self.pos + np.arange(horizon)) % self.m
        return self.buf[idx].copy()

    def state(self) -> dict:
        return {"kind": self.kind, "m": self.m}


@dataclass(frozen=True)
class HWCoeffs:
    alpha: float
    beta: float
    phi: float
    gamma: float
    m: int                 # season length in steps; 0 = no season (damped trend)
    robust: bool = True
    clip_sigma: float = 3.0
    sigma_lambda: float = 0.05
    sigma_floor: float = 1e-9


def _filter(y: list[float], c: HWCoeffs, level: float, trend: float, season: list[float], pos: int,
            sigma: float, record: bool):
    """Robust additive damped Holt(-Winters) filter; the single implementation for batch and online.

    ``season`` is mutated in place (ring indexed by ``pos``). Returns the final
    (level, trend, pos, sigma) and, when ``record``, per-step level, trend and the
    season value written at that step.
    """
    a, b_, phi, g, m = c.alpha, c.beta, c.phi, c.gamma, c.m
    robust, k, lam, floor = c.robust, c.clip_sigma, c.sigma_lambda, c.sigma_floor
    L: list[float] = []
    B: list[float] = []
    S: list[float] = []
    for yt in y:
        if yt != yt:          # NaN: a hole the caller did not fill; carry the state forward
            yt = level + phi * trend + (season[pos] if m else 0.0)
        s_old = season[pos] if m else 0.0
        pred = level + phi * trend + s_old
        e = yt - pred
        if robust:
            lim = k * sigma
            if e > lim:
                e = lim
            elif e < -lim:
                e = -lim
            sigma = (1.0 - lam) * sigma + lam * _MEANAD_TO_SIGMA * (e if e >= 0 else -e)
            if sigma < floor:
                sigma = floor
        yc = pred + e
        new_level = a * (yc - s_old) + (1.0 - a) * (level + phi * trend)
        trend = b_ * (new_level - level) + (1.0 - b_) * phi * trend
        level = new_level
        if m:
            s_new = g * (yc - level) + (1.0 - g) * s_old
            season[pos] = s_new
            pos = pos + 1
            if pos == m:
                pos = 0
        else:
            s_new = 0.0
        if record:
            L.append(level)
            B.append(trend)
            S.append(s_new)
    return level, trend, pos, sigma, L, B, S


def _damp_sums(phi: float, horizon: int) -> np.ndarray:
    """D_k = phi + phi^2 + ... + phi^k for k = 1..horizon."""
    return np.cumsum(phi ** np.arange(1, horizon + 1))


class HoltWintersModel:
    """Additive damped-trend Holt-Winters (m > 0) or damped Holt (m == 0), robust filter."""

    def __init__(self, coeffs: HWCoeffs, level: float, trend: float, season: list[float] | None,
                 pos: int, sigma: float) -> None:
        self.coeffs = coeffs
        self.level = level
        self.trend = trend
        self.season = list(season) if season is not None else []
        self.pos = pos
        self.sigma = sigma
        self.kind = "hw" if coeffs.m else "damped"

    def update(self, y: float) -> None:
        self.level, self.trend, self.pos, self.sigma, _, _, _ = _filter(
            [float(y)], self.coeffs, self.level, self.trend, self.season, self.pos, self.sigma, False)

    def forecast(self, horizon: int) -> np.ndarray:
        out = self.level + _damp_sums(self.coeffs.phi, horizon) * self.trend
        if self.coeffs.m:
            idx = (self.pos + np.arange(horizon)) % self.coeffs.m
            out = out + np.asarray(self.season)[idx]
        return out

    def state(self) -> dict:
        c = self.coeffs
        return {"kind": self.kind, "alpha": c.alpha, "beta": c.beta, "phi": c.phi, "gamma": c.gamma,
                "m": c.m, "level": self.level, "trend": self.trend, "sigma": self.sigma}


@dataclass
class FitResult:
    model: PointForecaster
    kind: str
    criterion: dict[str, float]               # in-sample multi-step MAE per candidate kind
    residuals: np.ndarray                     # (n_origins, horizon) signed in-sample residuals of the winner
    n_steps: int                              # length of the fit window
    coeffs: dict = field(default_factory=dict)


def _multistep_errors(y: np.ndarray, pred_fn, horizon: int, t0: int) -> np.ndarray:
    """(n_origins, horizon) residuals y[t+k] - yhat(t+k|t) for origins t0..n-1-horizon."""
    n = len(y)
    origins = np.arange(t0, n - horizon)
    if len(origins) == 0:
        return np.zeros((0, horizon))
    return np.stack([y[origins + k] - pred_fn(origins, k) for k in range(1, horizon + 1)], axis=1)


def _hw_pass(y: np.ndarray, coeffs: HWCoeffs, init: tuple[float, float, list[float], float]):
    level0, trend0, season0, sigma0 = init
    season = list(season0)
    level, trend, pos, sigma, L, B, S = _filter(y.tolist(), coeffs, level0, trend0, season, 0, sigma0, True)
    model = HoltWintersModel(coeffs, level, trend, season, pos, sigma)
    return model, np.asarray(L), np.asarray(B), np.asarray(S), np.asarray(season0)


def _hw_errors(y: np.ndarray, coeffs: HWCoeffs, init, horizon: int, t0: int):
    model, L, B, S, s0 = _hw_pass(y, coeffs, init)
    D = _damp_sums(coeffs.phi, horizon)
    if coeffs.m:
        s_ext = np.concatenate([s0, S])   # s_ext[t + k] is the season value written at time t+k-m

        def pred(origins: np.ndarray, k: int) -> np.ndarray:
            return L[origins] + D[k - 1] * B[origins] + s_ext[origins + k]
    else:
        def pred(origins: np.ndarray, k: int) -> np.ndarray:
            return L[origins] + D[k - 1] * B[origins]
    return model, _multistep_errors(y, pred, horizon, t0)


def _score(err: np.ndarray) -> float:
    return float(np.mean(np.abs(err))) if err.size else math.inf


def _hw_init(y: np.ndarray, m: int, sigma_floor: float, init_steps: int,
             smooth_frac: float = 0.0) -> tuple[float, float, list[float], float]:
    """Initial level, trend, season and scale.

    With a season: the slope between the first and last season means removes the
    trend before the per-phase medians (otherwise a trend leaks into the season
    as a saw-tooth), and the level starts half a season before the first mean.
    Only the first ``init_steps`` values are used, and the in-sample error is
    scored after them, so the initial season cannot peek at the scored values.
    """
    if m:
        k = max(1, min(len(y), init_steps) // m)
        phases = y[: k * m].reshape(k, m)
        means = phases.mean(axis=1)
        slope = float((means[-1] - means[0]) / ((k - 1) * m)) if k > 1 else 0.0
        detrended = phases - slope * np.arange(k * m).reshape(k, m)
        med = np.median(detrended, axis=0)
        w = max(1, int(round(m * smooth_frac)))
        if w > 1 and m > 2 * w:
            # circular moving average: a profile estimated from 1-2 days is mostly noise per phase
            left, right = w // 2, w - 1 - w // 2
            padded = np.concatenate([med[len(med) - left:], med, med[:right]])
            med = np.convolve(padded, np.ones(w) / w, mode="valid")
        season0 = (med - med.mean()).tolist()
        trend0 = slope
        level0 = float(means[0] - slope * (m + 1) / 2.0)
    else:
        season0 = []
        trend0 = 0.0
        level0 = float(np.median(y[: min(len(y), 5)]))
    sigma0 = max(sigma_floor, _MEANAD_TO_SIGMA * float(np.mean(np.abs(np.diff(y[: min(len(y), 200)])))))
    return level0, trend0, season0, sigma0


def fit_holt_winters(y: np.ndarray, m: int, horizon: int, params: FallbackParams,
                     t0: int) -> tuple[HoltWintersModel, np.ndarray, HWCoeffs]:
    """Coordinate descent over the smoothing grid minimising in-sample multi-step MAE."""
    d = np.abs(np.diff(y))
    floor = max(1e-9, 0.5 * float(d.mean())) if len(d) else 1e-9
    base = dict(m=m, robust=params.robust, clip_sigma=params.clip_sigma, sigma_lambda=params.sigma_lambda,
                sigma_floor=floor)
    init = _hw_init(y, m, floor, t0, params.season_smooth_frac)
    names = ["alpha", "beta", "phi"] + (["gamma"] if m else [])
    cur = {n: _START[n] for n in names}
    if not m:
        cur["gamma"] = 0.0
    cache: dict[tuple, float] = {}

    def evaluate(p: dict) -> float:
        key = tuple(p[n] for n in ("alpha", "beta", "phi", "gamma"))
        if key not in cache:
            _, err = _hw_errors(y, HWCoeffs(**p, **base), init, horizon, t0)
            cache[key] = _score(err)
        return cache[key]

    best = evaluate(cur)
    for _ in range(params.sweeps):
        improved = False
        for n in names:
            for v in _GRID[n]:
                trial = dict(cur, **{n: v})
                s = evaluate(trial)
                if s < best - 1e-12:
                    best, cur, improved = s, trial, True
        if not improved:
            break
    coeffs = HWCoeffs(**cur, **base)
    model, err = _hw_errors(y, coeffs, init, horizon, t0)
    log.debug("fit %s m=%d on %d steps: %s mae=%.6g (%d passes)", model.kind, m, len(y), cur, best, len(cache) + 1)
    return model, err, coeffs


def fit_fallback(y: np.ndarray, season_steps: int, horizon: int,
                 params: FallbackParams = FallbackParams()) -> FitResult:
    """Fit every applicable candidate on the tail of ``y`` (finite, contiguous steps) and keep the best."""
    y = np.asarray(y, dtype=np.float64)
    y = y[np.isfinite(y)]
    if len(y) == 0:
        raise ValueError("no finite values to fit")
    m = int(season_steps)
    seasonal = m > 1 and len(y) >= params.min_seasons * m + horizon and "hw" in params.kinds
    seasonal_naive = m > 1 and len(y) >= m + horizon + 1 and "snaive" in params.kinds
    cap = int(params.fit_max_seasons * m) if seasonal else params.fit_max_steps
    y = y[-max(cap, 1):]
    n = len(y)
    # every candidate is scored on the same origins: after the seasons that initialise the
    # Holt-Winters season (half of the window, whole seasons) when a season is in play
    if seasonal:
        t0 = max(1, (n // m + 1) // 2) * m
    elif seasonal_naive:
        t0 = m
    else:
        t0 = min(max(3, n // 10), max(0, n - horizon - 1))
    crit: dict[str, float] = {}
    errs: dict[str, np.ndarray] = {}
    models: dict[str, PointForecaster] = {}
    coeffs: dict[str, dict] = {}

    errs["naive"] = _multistep_errors(y, lambda o, k: y[o], horizon, t0)
    models["naive"] = NaiveModel(y[-1])
    if seasonal_naive:
        errs["snaive"] = _multistep_errors(y, lambda o, k: y[o + k - m], horizon, t0)
        models["snaive"] = SeasonalNaiveModel(y[-m:])
    if n >= params.min_trend_steps and "damped" in params.kinds and n - horizon > t0:
        model, err, c = fit_holt_winters(y, 0, horizon, params, t0)
        models["damped"], errs["damped"], coeffs["damped"] = model, err, c.__dict__.copy()
    if seasonal:
        model, err, c = fit_holt_winters(y, m, horizon, params, t0)
        models["hw"], errs["hw"], coeffs["hw"] = model, err, c.__dict__.copy()
    for k, e in errs.items():
        crit[k] = _score(e)
    kind = min(crit, key=lambda k: (crit[k], k != "naive")) if crit else "naive"
    if not math.isfinite(crit.get(kind, math.inf)):
        kind = "naive"
    res = errs.get(kind, np.zeros((0, horizon)))[-params.seed_residuals:]
    log.debug("fallback fit on %d steps (m=%d): %s -> %s", n, m, crit, kind)
    return FitResult(model=models[kind], kind=kind, criterion=crit, residuals=res, n_steps=n,
                     coeffs=coeffs.get(kind, {}))
