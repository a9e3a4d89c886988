"""Behaviour profiles and distance to a cluster centroid (numpy only; fleet and device share it).

A *profile* summarises how a device behaved over a window (one day by
default): per metric, its mean, spread, low and high percentiles and the
strength of its daily cycle. The fleet clusters devices by their profiles; a
device recomputes its own profile from its buffered samples and measures how
far it is from its cluster's centroid. Both sides must compute the profile the
same way, which is why this one module does it for both.

Profile feature names are ``<metric>|<stat>`` (``system.cpuUsage|p95``), so the
bundle's feature check (``models.bundle.feature_bases``) sees which metrics a
cluster model needs. Rates (``...PerSec``) are log1p-transformed first, like
the detectors' features, because they span orders of magnitude.

Distances are computed in the scaled space (``(profile - mean) / scale``) and
reported as the RMS over the features both sides have (``sqrt(sum(d^2) / n)``):
a z-like unit that does not grow with the number of features and stays
meaningful when a device lacks a sensor (that feature is left out).

The model travels as ``cluster.npz`` (plain float/int arrays, loaded with
``allow_pickle=False``) plus ``model.json`` (kind "cluster", feature names,
profile window, which cluster each device was assigned to).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

KIND = "cluster"
NPZ_FILE = "cluster.npz"
META_FILE = "model.json"
FORMAT = 1

DEFAULT_METRICS: tuple[str, ...] = (
    "system.cpuUsage",
    "system.memoryPercent",
    "system.diskPercent",
    "system.load1",
    "system.processCount",
    "system.temperature",
    "disk.readBytesPerSec",
    "disk.writeBytesPerSec",
    "network.bytesReceivedPerSec",
    "network.bytesSentPerSec",
)
# mean, std, 5th/50th/95th percentile, and "hstd": std of the hour-of-day means (daily-cycle strength)
STATS: tuple[str, ...] = ("mean", "std", "p05", "p50", "p95", "hstd")
DEFAULT_STATS: tuple[str, ...] = ("mean", "p05", "p95")   # level and range: what tells roles apart
MIN_VALUES = 12          # fewer finite values of a metric in the window: its stats are NaN
MIN_HOURS = 12           # hour-of-day bins needed for "hstd"
SECONDS_PER_HOUR = 3600.0


class ClusterModelError(ValueError):
    """A cluster model file is malformed (refused before use)."""


# -- profiles ---------------------------------------------------------------------------------
def feature_names(metrics: Sequence[str], stats: Sequence[str] = DEFAULT_STATS) -> tuple[str, ...]:
    bad = [s for s in stats if s not in STATS]
    if bad:
        raise ValueError(f"unknown profile stats {bad}; known: {', '.join(STATS)}")
    return tuple(f"{m}|{s}" for m in metrics for s in stats)


def split_name(name: str) -> tuple[str, str]:
    metric, sep, stat = name.rpartition("|")
    if not sep or stat not in STATS:
        raise ValueError(f"bad profile feature name {name!r} (want '<metric>|<stat>')")
    return metric, stat


def transform(metric: str, values: np.ndarray) -> np.ndarray:
    """What the profile summarises: the value itself, or log1p of a rate (negative clipped)."""
    v = np.asarray(values, dtype=float)
    if metric.endswith("PerSec"):
        with np.errstate(invalid="ignore"):
            return np.log1p(np.clip(v, 0.0, None))
    return v


def _stat(stat: str, v: np.ndarray, ts_s: np.ndarray) -> float:
    """One statistic over the finite values ``v`` taken at ``ts_s`` (same length)."""
    if len(v) < MIN_VALUES:
        return math.nan
    if stat == "mean":
        return float(np.mean(v))
    if stat == "std":
        return float(np.std(v))
    if stat in ("p05", "p50", "p95"):
        return float(np.percentile(v, float(stat[1:])))
    # hstd: how much the hour-of-day means differ (UTC hours; a daily cycle, not a trend)
    hours = (np.floor(ts_s / SECONDS_PER_HOUR) % 24).astype(int)
    counts = np.bincount(hours, minlength=24)
    sums = np.bincount(hours, weights=v, minlength=24)
    have = counts > 0
    if have.sum() < MIN_HOURS:
        return math.nan
    return float(np.std(sums[have] / counts[have]))


def profile_from_columns(ts_s: np.ndarray, columns: Mapping[str, np.ndarray],
                         names: Sequence[str]) -> np.ndarray:
    """The profile (one value per feature name, NaN where it cannot be computed) of one window.

    ``columns`` maps metric -> values aligned with ``ts_s``; NaN means absent. A metric the
    window lacks (or has fewer than MIN_VALUES values of) gives NaN for all its stats."""
    ts = np.asarray(ts_s, dtype=float)
    out = np.full(len(names), np.nan)
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, name in enumerate(names):
        metric, stat = split_name(name)
        if metric not in cache:
            col = columns.get(metric)
            if col is None:
                cache[metric] = (np.zeros(0), np.zeros(0))
            else:
                v = transform(metric, col)
                ok = np.isfinite(v)
                cache[metric] = (v[ok], ts[ok])
        v, t = cache[metric]
        out[i] = _stat(stat, v, t)
    return out


def rows_to_columns(rows: Iterable[tuple[float, Mapping[str, float]]],
                    metrics: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(ts_s, {metric: value}) rows -> a time array and one float array per metric (NaN = absent)."""
    ts: list[float] = []
    cols: dict[str, list[float]] = {m: [] for m in metrics}
    for t, values in rows:
        ts.append(float(t))
        for m in metrics:
            v = values.get(m)
            cols[m].append(math.nan if v is None else float(v))
    return np.asarray(ts, dtype=float), {m: np.asarray(c, dtype=float) for m, c in cols.items()}


def window_profiles(ts_s: np.ndarray, columns: Mapping[str, np.ndarray], names: Sequence[str],
                    window_s: float, min_coverage: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Profiles of consecutive windows ending at the last sample, newest last: (ends_s, P).

    Windows are counted back from the newest sample so the last one is what a device
    computing "the last ``window_s``" sees. A window whose samples span less than
    ``min_coverage`` of ``window_s`` is left out (a partial first day)."""
    ts = np.asarray(ts_s, dtype=float)
    if len(ts) == 0:
        return np.zeros(0), np.zeros((0, len(names)))
    order = np.argsort(ts, kind="stable")
    ts = ts[order]
    cols = {m: np.asarray(c, dtype=float)[order] for m, c in columns.items()}
    ends, profiles = [], []
    end = ts[-1]
    while end - ts[0] >= min_coverage * window_s:
        lo = int(np.searchsorted(ts, end - window_s, side="right"))
        hi = int(np.searchsorted(ts, end, side="right"))
        if hi - lo >= 2 and ts[hi - 1] - ts[lo] >= min_coverage * window_s:
            profiles.append(profile_from_columns(ts[lo:hi], {m: c[lo:hi] for m, c in cols.items()}, names))
            ends.append(end)
        end -= window_s
    if not profiles:
        return np.zeros(0), np.zeros((0, len(names)))
    return np.asarray(ends[::-1]), np.vstack(profiles[::-1])


# -- the model --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterModel:
    """Scaler, centroids (in scaled space) and radii; see the module docstring."""

    feature_names: tuple[str, ...]
    mean: np.ndarray                 # (d,) scaler centre
    scale: np.ndarray                # (d,) scaler scale, > 0
    centroids: np.ndarray            # (k, d) scaled space
    radius: np.ndarray               # (k,) distance beyond which a profile is "outside"
    sizes: np.ndarray                # (k,) devices per cluster at fit time
    window_s: float = 86400.0        # profile window the radii were measured on
    quantile: float = 0.95           # radius = this quantile of member distances (x margin)
    version: int = 0
    assignments: Mapping[str, int] = field(default_factory=dict)   # device id -> cluster
    assigned: int | None = None      # the cluster of the target device (device bundles)
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def metrics(self) -> tuple[str, ...]:
        out: list[str] = []
        for n in self.feature_names:
            m = split_name(n)[0]
            if m not in out:
                out.append(m)
        return tuple(out)

    def scaled(self, profile: np.ndarray) -> np.ndarray:
        return (np.asarray(profile, dtype=float) - self.mean) / self.scale

    def distances(self, profile: np.ndarray) -> np.ndarray:
        """RMS distance of one profile to every centroid (NaN features left out); (k,)."""
        return rms_distances(self.scaled(profile)[None, :], self.centroids)[0]

    def cluster_of(self, device_id: str | None) -> int | None:
        if device_id is not None and device_id in self.assignments:
            return int(self.assignments[device_id])
        return self.assigned


def rms_distances(Z: np.ndarray, C: np.ndarray) -> np.ndarray:
    """(n, d) points x (k, d) centroids -> (n, k) RMS distances over each point's finite features."""
    Z = np.atleast_2d(np.asarray(Z, dtype=float))
    ok = np.isfinite(Z)
    n_ok = ok.sum(axis=1)
    diff = np.where(ok[:, None, :], Z[:, None, :] - C[None, :, :], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.sqrt((diff ** 2).sum(axis=2) / n_ok[:, None])
    d[n_ok == 0, :] = np.nan
    return d


@dataclass(frozen=True)
class Assessment:
    """One device check: its cluster, distance, radius, and which features pull it away."""

    cluster: int
    distance: float
    radius: float
    nearest: int
    nearest_distance: float
    n_features: int
    contributions: tuple[tuple[str, float, float, float], ...]   # (feature, value, centroid value, z) top first

    @property
    def beyond(self) -> bool:
        return math.isfinite(self.distance) and self.distance > self.radius


def assess(model: ClusterModel, profile: np.ndarray, cluster: int | None = None, top: int = 3) -> Assessment:
    """Distance of ``profile`` to ``cluster`` (default: the nearest centroid) and its explanation."""
    z = model.scaled(profile)
    d = model.distances(profile)
    finite = np.isfinite(d)
    nearest = int(np.nanargmin(d)) if finite.any() else 0
    c = nearest if cluster is None or not 0 <= cluster < model.k else int(cluster)
    diff = z - model.centroids[c]
    ok = np.isfinite(diff)
    order = [int(i) for i in np.argsort(-np.abs(np.where(ok, diff, 0.0))) if ok[i]][:top]
    centroid_raw = model.centroids[c] * model.scale + model.mean
    contributions = tuple((model.feature_names[i], float(profile[i]), float(centroid_raw[i]), float(diff[i]))
                          for i in order)
    return Assessment(cluster=c, distance=float(d[c]), radius=float(model.radius[c]), nearest=nearest,
                      nearest_distance=float(d[nearest]), n_features=int(ok.sum()), contributions=contributions)


# -- files ------------------------------------------------------------------------------------
def save_cluster_model(model: ClusterModel, out_dir: str | Path, extra_meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``cluster.npz`` (plain arrays) and ``model.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / NPZ_FILE, mean=model.mean.astype(np.float64), scale=model.scale.astype(np.float64),
             centroids=model.centroids.astype(np.float64), radius=model.radius.astype(np.float64),
             sizes=model.sizes.astype(np.int64))
    meta = {**dict(model.meta), **dict(extra_meta or {}),
            "kind": KIND, "format": FORMAT, "version": int(model.version),
            "feature_names": list(model.feature_names), "window_s": float(model.window_s),
            "quantile": float(model.quantile), "k": model.k,
            "assignments": {str(k): int(v) for k, v in sorted(model.assignments.items())},
            "assigned_cluster": None if model.assigned is None else int(model.assigned)}
    (out / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
    return out


def load_cluster_model(model_dir: str | Path) -> ClusterModel:
    """Read and validate a cluster model directory; ClusterModelError when anything is off."""
    d = Path(model_dir)
    try:
        meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ClusterModelError(f"{META_FILE}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise ClusterModelError(f"{META_FILE} is not a {KIND!r} model")
    names = meta.get("feature_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ClusterModelError("feature_names must be a non-empty list of strings")
    for n in names:
        try:
            split_name(n)
        except ValueError as exc:
            raise ClusterModelError(str(exc)) from None
    try:
        with np.load(d / NPZ_FILE, allow_pickle=False) as z:
            arrays = {k: np.array(z[k]) for k in ("mean", "scale", "centroids", "radius", "sizes")}
    except (OSError, ValueError, KeyError) as exc:
        raise ClusterModelError(f"{NPZ_FILE}: {exc}") from None
    dim = len(names)
    mean, scale, cent, radius, sizes = (arrays[k] for k in ("mean", "scale", "centroids", "radius", "sizes"))
    for key, a in arrays.items():
        if a.dtype.kind not in "fiu":
            raise ClusterModelError(f"{NPZ_FILE}: {key} is not numeric")
    if mean.shape != (dim,) or scale.shape != (dim,) or cent.ndim != 2 or cent.shape[1] != dim or cent.shape[0] < 1:
        raise ClusterModelError(f"array shapes do not match {dim} features: mean {mean.shape}, scale {scale.shape}, "
                                f"centroids {cent.shape}")
    k = cent.shape[0]
    if radius.shape != (k,) or sizes.shape != (k,):
        raise ClusterModelError(f"radius {radius.shape} / sizes {sizes.shape} do not match {k} clusters")
    if not (np.isfinite(mean).all() and np.isfinite(scale).all() and np.isfinite(cent).all()
            and np.isfinite(radius).all()) or (scale <= 0).any() or (radius <= 0).any():
        raise ClusterModelError("non-finite values, or a scale or radius <= 0")
    assignments = meta.get("assignments") or {}
    if not isinstance(assignments, dict) or not all(isinstance(v, int) and 0 <= v < k for v in assignments.values()):
        raise ClusterModelError("assignments must map device ids to cluster indices")
    assigned = meta.get("assigned_cluster")
    if assigned is not None and not (isinstance(assigned, int) and 0 <= assigned < k):
        raise ClusterModelError(f"assigned_cluster {assigned!r} is not a cluster index")
    window_s = meta.get("window_s", 86400.0)
    if not isinstance(window_s, (int, float)) or not window_s > 0:
        raise ClusterModelError("window_s must be > 0")
    return ClusterModel(feature_names=tuple(names), mean=mean.astype(float), scale=scale.astype(float),
                        centroids=cent.astype(float), radius=radius.astype(float), sizes=sizes.astype(int),
                        window_s=float(window_s), quantile=float(meta.get("quantile", 0.95)),
                        version=int(meta.get("version", 0)), assignments=dict(assignments), assigned=assigned,
                        meta=meta)


__all__ = ["Assessment", "ClusterModel", "ClusterModelError", "DEFAULT_METRICS", "DEFAULT_STATS", "KIND",
           "assess", "feature_names", "load_cluster_model", "profile_from_columns", "rms_distances",
           "rows_to_columns", "save_cluster_model", "window_profiles"]
