"""Training data for one target, from the store: rows per device, split in time.

A target is ``device:ID``, ``group:NAME`` (members from the ``[groups]`` table
of the fleet config and from a ``groups`` list in a device's twin) or ``fleet``
(every device in the store). Rows come from the collected telemetry or from the
origin's ``device_shadow_history``; both become (ts_s, {metric: value}).

Held-out slice: the most recent ``holdout_fraction`` of EACH device's rows.
Recent, because a model is judged on what it will meet next, and per device,
so every device of a group is in the evaluation; the champion and the
challenger are scored on exactly these rows.

Features are computed per device (forward fill, differences and rolling
windows must never run across two devices) and only then pooled.

The origin's shadow state may lack what the agent derives on the device:
``derive_metrics`` adds memory/disk/swap percentages from used/total and
per-second rates from cumulative counters, the way the agent's sampler does.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np

from fleet.config import FleetConfig
from fleet.store import Store
from models.bundle import Target
from models.features import DEFAULT_FEATURES, build_matrix, is_counter, select_feature_names

log = logging.getLogger(__name__)

Rows = list[tuple[float, dict[str, float]]]

_PERCENTS = (("system.memoryPercent", "system.memoryUsed", "system.memoryTotal"),
             ("system.diskPercent", "system.diskUsed", "system.diskTotal"),
             ("system.swapPercent", "system.swapUsed", "system.swapTotal"))
_RATES = (("network.bytesReceivedPerSec", "network.bytesReceived"),
          ("network.bytesSentPerSec", "network.bytesSent"),
          ("disk.readBytesPerSec", "disk.readBytes"),
          ("disk.writeBytesPerSec", "disk.writeBytes"))


class NotEnoughData(ValueError):
    """The target has too few usable rows to train (or no device at all)."""


@dataclass(frozen=True)
class DeviceSeries:
    device_id: str
    rows: Rows                   # oldest first, train then held-out
    split: int                   # index of the first held-out row

    @property
    def train_rows(self) -> Rows:
        return self.rows[:self.split]

    @property
    def holdout_rows(self) -> Rows:
        return self.rows[self.split:]

    @property
    def split_ts_s(self) -> float:
        return self.rows[self.split][0]


@dataclass(frozen=True)
class Dataset:
    target: Target
    source: str
    devices: tuple[DeviceSeries, ...]
    features: tuple[str, ...]
    forecast_metrics: tuple[str, ...]
    interval_s: float
    labels: Mapping[str, tuple[tuple[float, float, str], ...]] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return sum(d.split for d in self.devices)

    @property
    def n_holdout(self) -> int:
        return sum(len(d.rows) - d.split for d in self.devices)

    @property
    def data_from_s(self) -> float:
        return min(d.rows[0][0] for d in self.devices)

    @property
    def data_to_s(self) -> float:
        return max(d.rows[-1][0] for d in self.devices)

    @property
    def holdout_from_s(self) -> float:
        return min(d.split_ts_s for d in self.devices)

    def train_matrix(self) -> np.ndarray:
        """Pooled forest training rows (finite rows only), features computed per device."""
        parts = []
        for d in self.devices:
            X = build_matrix([v for _, v in d.rows], self.features)[:d.split]
            parts.append(X[np.isfinite(X).all(axis=1)])
        return np.concatenate(parts) if parts else np.zeros((0, len(self.features)))

    def forecast_device(self) -> DeviceSeries:
        """The series the forecaster learns from: the device with the most training rows.

        Why one device: the LSTM trainer takes one series, and stitching devices end
        to end would create jumps no device ever makes."""
        return max(self.devices, key=lambda d: (d.split, d.device_id))

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "devices": [d.device_id for d in self.devices],
                "n_train": self.n_train, "n_holdout": self.n_holdout, "data_from_s": self.data_from_s,
                "data_to_s": self.data_to_s, "holdout_from_s": self.holdout_from_s,
                "interval_s": self.interval_s, "features": list(self.features),
                "forecast_metrics": list(self.forecast_metrics)}


# -- pure helpers ------------------------------------------------------------------------------
def derive_metrics(rows: Rows) -> Rows:
    """Add percentages and rates the agent's sampler would have produced, where missing."""
    out: Rows = []
    prev: tuple[float, dict[str, float]] | None = None
    for ts, values in rows:
        v = dict(values)
        for pct, used, total in _PERCENTS:
            if pct not in v and used in v and v.get(total, 0) > 0:
                v[pct] = 100.0 * v[used] / v[total]
        if prev is not None:
            dt = ts - prev[0]
            for rate, counter in _RATES:
                if rate not in v and counter in v and counter in prev[1] and dt > 0:
                    delta = v[counter] - prev[1][counter]
                    if delta >= 0:      # a reset or wrap gives no rate, never a negative one
                        v[rate] = delta / dt
        out.append((ts, v))
        prev = (ts, values)
    return out


def split_index(n_rows: int, holdout_fraction: float) -> int:
    n_hold = max(1, int(round(n_rows * holdout_fraction)))
    return max(1, n_rows - n_hold)


def median_interval_s(devices: Sequence[DeviceSeries]) -> float:
    gaps = np.concatenate([np.diff([ts for ts, _ in d.rows]) for d in devices if len(d.rows) > 1] or [np.zeros(0)])
    gaps = gaps[gaps > 0]
    return float(np.median(gaps)) if len(gaps) else 1.0


def group_members(store: Store, config: FleetConfig, group: str) -> list[str]:
    members = set(config.groups.get(group, ()))
    for device_id, reported in store.twins().items():
        groups = reported.get("groups")
        if isinstance(groups, list) and group in groups:
            members.add(device_id)
    return sorted(members)


def target_devices(store: Store, config: FleetConfig, target: Target) -> list[str]:
    if target.type == "device":
        return [target.id]
    if target.type == "group":
        return group_members(store, config, target.id)
    return [d["device_id"] for d in store.devices()]


# -- building ----------------------------------------------------------------------------------
def load_rows(store: Store, device_id: str, since_s: float | None, until_s: float | None, source: str,
              shadow: Store | None = None, shadow_table: str = "device_shadow_history",
              max_rows: int | None = None) -> Rows:
    """Rows of one device in [since, until), the most recent ``max_rows`` of them."""
    if source == "shadow":
        rows = (shadow or store).shadow_rows(device_id, since_s, until_s, shadow_table)
        if max_rows is not None:
            rows = rows[-max_rows:]
    else:
        rows = store.samples(device_id, since_s, until_s, limit=max_rows)
    return derive_metrics(rows)


def build_dataset(store: Store, config: FleetConfig, target: Target, *, now_s: float,
                  source: str | None = None, shadow: Store | None = None,
                  since_s: float | None = None) -> Dataset:
    """Rows of every device of ``target`` within the lookback, split, with chosen features."""
    p = config.train
    source = source or p.source
    devices = target_devices(store, config, target)
    if not devices:
        raise NotEnoughData(f"{target.label}: no devices (a group needs [groups] in the fleet config or "
                            "devices reporting it in their twin)")
    since = since_s if since_s is not None else now_s - p.lookback_s
    series = []
    for device_id in devices:
        rows = load_rows(store, device_id, since, None, source, shadow, config.source.shadow_table, p.max_rows)
        if len(rows) < 4:
            log.info("%s: device %s has %d rows; left out", target.label, device_id, len(rows))
            continue
        series.append(DeviceSeries(device_id, rows, split_index(len(rows), p.holdout_fraction)))
    if not series:
        raise NotEnoughData(f"{target.label}: no device has data from {source} since "
                            f"{datetime.fromtimestamp(since, tz=timezone.utc):%Y-%m-%d %H:%M:%SZ}")
    train_values = [v for d in series for _, v in d.train_rows]
    if p.features:
        features = tuple(f for f in p.features if not is_counter(f.split("|", 1)[0]))
    else:
        features = select_feature_names(train_values, DEFAULT_FEATURES, min_presence=0.5)
    if not features:
        raise NotEnoughData(f"{target.label}: none of the features {list(p.features or DEFAULT_FEATURES)} "
                            "is present in the data")
    forecast_metrics = select_feature_names(train_values, p.forecast_metrics, min_presence=0.9)
    labels = {d.device_id: tuple(store.labels(d.device_id, d.rows[0][0], d.rows[-1][0])) for d in series}
    ds = Dataset(target, source, tuple(series), tuple(features), tuple(forecast_metrics),
                 median_interval_s(series), labels)
    n_usable = len(ds.train_matrix())
    if n_usable < p.min_samples:
        raise NotEnoughData(f"{target.label}: {n_usable} usable training rows < train.min_samples={p.min_samples}")
    log.info("%s: %d devices, %d training + %d held-out rows from %s, features %s", target.label,
             len(series), ds.n_train, ds.n_holdout, source, ",".join(features))
    return ds


def in_windows(ts: np.ndarray, windows: Sequence[tuple[float, float, Any]]) -> np.ndarray:
    mask = np.zeros(len(ts), dtype=bool)
    for start, end, *_ in windows:
        mask |= (ts >= start) & (ts <= end)
    return mask


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
