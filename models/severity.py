"""Scores -> severity (normal / warning / critical), anomaly_score in [0, 1], explanations.

Combination rule (z-score + Isolation Forest)
---------------------------------------------
Both detectors are put on one scale, "z units":

* z-score: ``z_max = max_i |z_i|`` over features.
* forest: anomaly score ``a = -score_samples`` mapped linearly so that the
  training median maps to 0 and the calibrated warning threshold to
  ``z_warning``: ``z_forest = z_warning * (a - a_median) / (a_warning - a_median)``.

``score = max(z_max, z_forest)`` (union: either detector can raise an alert; the
z-score catches a single metric far outside its range, the forest catches joint
combinations that are rare although each metric is in range). Severity is the
worse of the two detectors' own severities: z: ``z_max >= z_warning`` -> warning,
``>= z_critical`` -> critical; forest: ``a >= warning`` / ``a >= critical``
thresholds calibrated on the training scores. Before the forest exists only the
z-score contributes. Optionally (``anomaly_gate > 0``) a row whose anomaly_score
(below) is under the gate is reported normal, which mutes metrics that are
*usually* that spiky (off by default: it also mutes the rows after an onset).

anomaly_score
-------------
``SurpriseCalibrator`` (below) over the columns |z| per feature, |daily z| per base
metric (time-of-day profile) and the forest on the z scale: each column's score relative to its own recent
maximum, combined by max, squashed to [0, 1) and damped while an incident is
already known (refractory). It is the ranked, continuous signal for thresholds
and benchmarks; severity stays threshold based (interpretable, in z units).

Explanation
-----------
The features with the largest |z|: name, value, z, and the expected range
``median +/- k * scale`` (scale = sigma-consistent MAD), in the feature's units
(rates are log1p-transformed features; the explanation converts them back).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from models.features import is_rate

log = logging.getLogger(__name__)

SEVERITIES: tuple[str, ...] = ("normal", "warning", "critical")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}


def severity_rank(severity: str) -> int:
    return _RANK[severity]


def worst(*severities: str) -> str:
    return SEVERITIES[max(_RANK[s] for s in severities)]


@dataclass(frozen=True)
class SeverityParams:
    z_warning: float = 4.0
    z_critical: float = 6.0
    anomaly_gate: float = 0.0        # anomaly_score below this => normal (0 disables)
    explain_top_k: int = 3
    explain_k: float = 3.0           # expected range = median +/- k * scale

    def __post_init__(self) -> None:
        if not 0 < self.z_warning <= self.z_critical:
            raise ValueError("0 < z_warning <= z_critical required")


def z_severity(z_max: float, params: SeverityParams) -> str:
    if z_max >= params.z_critical:
        return "critical"
    if z_max >= params.z_warning:
        return "warning"
    return "normal"


def forest_severity(anomaly: float, thresholds: dict[str, float]) -> str:
    if anomaly >= thresholds["critical"]:
        return "critical"
    if anomaly >= thresholds["warning"]:
        return "warning"
    return "normal"


def forest_z(anomaly: float, thresholds: dict[str, float], params: SeverityParams) -> float:
    """Forest anomaly score on the z scale (median -> 0, warning threshold -> z_warning)."""
    span = thresholds["warning"] - thresholds["median"]
    if span <= 0:
        span = 1e-9
    return max(0.0, params.z_warning * (anomaly - thresholds["median"]) / span)


def combine(z_max: float, anomaly: float | None, thresholds: dict[str, float] | None,
            params: SeverityParams) -> tuple[float, str]:
    """(score in z units, severity) by the union rule in the module docstring."""
    sev = z_severity(z_max, params)
    score = z_max
    if anomaly is not None and thresholds is not None:
        sev = worst(sev, forest_severity(anomaly, thresholds))
        score = max(score, forest_z(anomaly, thresholds, params))
    return score, sev


def gate(severity: str, anomaly_score: float, params: SeverityParams) -> str:
    if params.anomaly_gate > 0 and anomaly_score < params.anomaly_gate:
        return "normal"
    return severity


def _untransform(name: str, v: float) -> float:
    """Back to the metric's units: rates (and their rolling means) were log1p'd; a diff/std of a
    log-rate is a log-ratio and stays as is."""
    base, _, suffix = name.partition("|")
    if is_rate(base) and not suffix.startswith(("diff", "std")) and math.isfinite(v):
        return math.expm1(v)
    return v


def explain(names: Sequence[str], values: np.ndarray, z: np.ndarray, center: np.ndarray, scale: np.ndarray,
            params: SeverityParams) -> list[dict]:
    """Top-|z| features with value, z and expected range, most deviating first."""
    z = np.asarray(z, dtype=np.float64)
    order = np.argsort(-np.abs(z), kind="stable")[: params.explain_top_k]
    out = []
    for i in order:
        if not abs(z[i]) > 0:
            break
        lo = center[i] - params.explain_k * scale[i]
        hi = center[i] + params.explain_k * scale[i]
        name = names[i]
        out.append({
            "feature": name,
            "value": _untransform(name, float(values[i])),
            "z": round(float(z[i]), 3),
            "expected_low": _untransform(name, float(lo)),
            "expected_high": _untransform(name, float(hi)),
        })
    return out


# -- anomaly_score calibration ---------------------------------------------------

@dataclass(frozen=True)
class CalibratorParams:
    history: int = 5000          # rows of past scores a new score is compared with
    block: int = 50              # the history advances in blocks of this many rows
    refractory: int = 100        # a score must beat the last `refractory` combined scores ...
    damp: float = 0.5            # ... or it is multiplied by this
    clip: float = 50.0           # per-column scores are clipped here first (z units)
    warmup: int = 50             # anomaly_score is 0 for the first rows

    def __post_init__(self) -> None:
        if self.history < self.block or self.block < 1 or self.refractory < 0 or not 0 <= self.damp <= 1:
            raise ValueError("need history >= block >= 1, refractory >= 0, 0 <= damp <= 1")


MAX_RATIO = 1e3   # a column that was exactly 0 for the whole history and moves: capped, so scores stay < 1


class SurpriseCalibrator:
    """Per-column scores (|z| per feature, forest on the z scale) -> anomaly_score in [0, 1).

    Each column is divided by its own maximum over the previous ``history`` rows
    (``r = s / prev_max``: r >= 1 means "beyond anything this signal did lately"),
    the columns are combined by max, and ``anomaly_score = r / (1 + r)`` (0.5 at a
    new record). Why a ratio to the recent maximum rather than a Gaussian tail:
    device metrics and their z-scores are heavy-tailed, and "larger than any
    deviation in the last hours" is scale-free, needs no distribution fit and
    compares across metrics. Refractory damping: a row whose combined score does
    not exceed every one of the previous ``refractory`` combined scores is
    multiplied by ``damp``, so one incident gives one high score at its onset
    instead of a plateau (repeated alarms for a known incident are noise).

    The history max is kept per block of ``block`` rows (ring of block maxima plus
    the running block), so a row costs O(history/block x columns), not O(history).
    """

    def __init__(self, n_columns: int, params: CalibratorParams = CalibratorParams()):
        self.params = params
        nb = params.history // params.block
        self._blocks = np.full((nb, n_columns), -np.inf)
        self._bpos = 0
        self._cur = np.full(n_columns, -np.inf)
        self._in_block = 0
        self._recent = np.full(max(params.refractory, 1), -np.inf)
        self._rpos = 0
        self._n = 0

    def update(self, scores: np.ndarray) -> float:
        p = self.params
        s = np.minimum(np.nan_to_num(np.abs(np.asarray(scores, dtype=np.float64)), nan=0.0), p.clip)
        prev = np.maximum(self._blocks.max(axis=0), self._cur)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(s > 0, s / np.where(prev > 0, prev, 1e-12), 0.0)
        ratio = min(float(r.max()), MAX_RATIO) if len(r) and self._n >= p.warmup else 0.0
        out = ratio / (1.0 + ratio)
        if p.refractory > 0:
            beaten = out > float(self._recent.max())
            self._recent[self._rpos] = out
            self._rpos = (self._rpos + 1) % p.refractory
            if not beaten:
                out *= p.damp
        # learn after scoring
        np.maximum(self._cur, s, out=self._cur)
        self._in_block += 1
        if self._in_block == p.block:
            self._blocks[self._bpos] = self._cur
            self._bpos = (self._bpos + 1) % len(self._blocks)
            self._cur = np.full_like(self._cur, -np.inf)
            self._in_block = 0
        self._n += 1
        return out
