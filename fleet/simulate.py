"""Fleet simulator: device histories with known failures, for training, benches and load tests.

API (read by fleet/clusters.py and the benches; stable):

    SimParams(devices=30, days=14, seed=0, step_s=300.0, start_ts_s=1.7e9,
              roles=("gateway", "camera", "sensor_hub"), failure_rate_per_device_day=0.06,
              sudden_share=0.25, drift_devices=0, planned_reboots_per_device_day=0.05,
              use_nab=True)                                   frozen
    Failure(device_id, ts_s, cause, onset_ts_s)               ground truth; cause in CAUSES;
                                                              onset_ts_s None for "sudden"
    DeviceHistory(device_id, role, ts_s, values, drifted_to, events)
        ts_s    (n,) float64, only the samples the device reported (offline time is a gap)
        values  {agent metric name: (n,) float64}; rates are NaN on the first sample after a boot
        drifted_to  the role a drift device moves into (None for the others); the drift is linear
                    from 30 % to 70 % of the simulated period
        events  [{"ts_s", "kind": "offline"|"online"|"reboot"|"anomaly", "clean": bool,
                  "severity": None|"warning"|"critical", "end_ts_s": float|None, "metric": str|None}]
                offline clean=True is a planned shutdown; clean=False is the last will (a crash)
    SimulatedFleet(params, devices, failures)  .device(id), .failures_of(id)
    simulate_fleet(params) -> SimulatedFleet            deterministic per params (seed)
    write_csv(fleet, out_dir)       <out>/<device>.csv (timestamp + metric columns), events.jsonl,
                                    truth.json (failures + roles + drift; never mixed into histories)
    write_store(fleet, store)       telemetry + anomaly messages as the collector stores them,
                                    status events into ``device_status`` (see fleet/labels.py)
    publish_mqtt(fleet, host, port) the same messages over MQTT, as devices would send them; returns
                                    the number the broker acknowledged (all, or PublishIncomplete)
    delivery_report(fleet, store, wait_s=0) {"published", "stored", "lost", "loss_fraction", "missing"}:
                                    which of the published telemetry/anomaly messages reached a store
    CLI: edge-fleet simulate --devices N --days D --seed S [--out DIR | --store URL | --mqtt ...
         [--report-store URL --wait-s S]]

Why it looks the way it does: roles differ in their normal levels (a camera
writes and sends a lot, a sensor hub idles), so clustering has structure to
find; per-device levels scatter around the role's, so a fixed threshold
(disk > 90 %) fires on healthy full-ish cameras. Daily/weekly cycles and noise
are cut from real NAB traces (random offset, robust-normalised) when
``../shared/datasets/nab`` is there, otherwise synthetic (sinusoid + AR(1)).
Gradual failures develop over 6-36 h before the failure:

    oom           memory leak -> memoryPercent climbs to ~100, swap fills, CPU rises -> OOM reboot
    disk_full     log flood -> diskPercent climbs linearly to 100, writes up -> crash; cleaned on repair
    thermal       temperature runs away to ~90 degC, throttling raises CPU and load -> shutdown
    storage_wear  I/O throughput falls, load (iowait) and blocked processes rise -> storage dies
    sudden        no precursor (power loss, kernel panic); no model should be credited for these

A failure takes the device offline without a clean shutdown (the last will),
and it comes back after a repair delay with its uptime reset. Planned reboots
(clean offline + reboot) happen too and are not failures. The device's own
detector would see the late precursor: anomaly episodes (warning, then
critical in the last hours) are among the events, plus rare false alarms.
numpy only at import.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

CAUSES = ("oom", "disk_full", "thermal", "storage_wear", "sudden")
GRADUAL_CAUSES = CAUSES[:4]
DAY_S = 86400.0
GIB = 1024.0 ** 3

# role -> metric -> (level, per-device spread, daily cycle amplitude, noise scale)
ROLE_PROFILES: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "gateway": {
        "cpu": (25.0, 5.0, 10.0, 4.0), "mem": (45.0, 6.0, 4.0, 1.5), "disk": (40.0, 8.0, 0.0, 0.2),
        "temp": (52.0, 3.0, 3.0, 1.0), "rx": (2.0e6, 4e5, 1.0e6, 3e5), "tx": (1.5e6, 3e5, 7e5, 2e5),
        "rd": (5.0e4, 1e4, 2e4, 1e4), "wr": (8.0e4, 2e4, 3e4, 2e4), "proc": (140.0, 10.0, 5.0, 2.0),
    },
    "camera": {
        "cpu": (55.0, 6.0, 12.0, 5.0), "mem": (62.0, 6.0, 5.0, 1.5), "disk": (76.0, 9.0, 0.0, 0.3),
        "temp": (63.0, 3.0, 4.0, 1.2), "rx": (1.0e5, 3e4, 4e4, 2e4), "tx": (4.0e6, 6e5, 1.5e6, 4e5),
        "rd": (3.0e5, 6e4, 1e5, 5e4), "wr": (2.0e6, 3e5, 6e5, 2e5), "proc": (180.0, 12.0, 5.0, 2.0),
    },
    "sensor_hub": {
        "cpu": (10.0, 3.0, 4.0, 2.0), "mem": (30.0, 5.0, 2.0, 1.0), "disk": (25.0, 6.0, 0.0, 0.1),
        "temp": (44.0, 3.0, 2.0, 0.8), "rx": (5.0e4, 1e4, 2e4, 8e3), "tx": (2.0e4, 5e3, 8e3, 4e3),
        "rd": (1.0e4, 3e3, 4e3, 2e3), "wr": (1.5e4, 4e3, 6e3, 3e3), "proc": (110.0, 8.0, 3.0, 1.5),
    },
}
MEM_TOTAL_BYTES = {"gateway": 4 * GIB, "camera": 8 * GIB, "sensor_hub": 2 * GIB}
DISK_TOTAL_BYTES = {"gateway": 32 * GIB, "camera": 128 * GIB, "sensor_hub": 16 * GIB}
CORES = {"gateway": 4, "camera": 4, "sensor_hub": 4}

# NAB series used as noise / cycle shapes (5-minute steps unless noted)
_NAB_FILES = (
    "realAWSCloudwatch/ec2_cpu_utilization_5f5533.csv", "realAWSCloudwatch/ec2_cpu_utilization_825cc2.csv",
    "realAWSCloudwatch/ec2_network_in_257a54.csv", "realAWSCloudwatch/ec2_disk_write_bytes_1ef3de.csv",
    "realAWSCloudwatch/rds_cpu_utilization_cc0c53.csv", "realTweets/Twitter_volume_AAPL.csv",
    "realTweets/Twitter_volume_GOOG.csv", "realKnownCause/nyc_taxi.csv",
)


@dataclass(frozen=True)
class SimParams:
    devices: int = 30
    days: float = 14
    seed: int = 0
    step_s: float = 300.0
    start_ts_s: float = 1_700_000_000.0
    roles: tuple[str, ...] = ("gateway", "camera", "sensor_hub")
    failure_rate_per_device_day: float = 0.06
    sudden_share: float = 0.25
    drift_devices: int = 0
    planned_reboots_per_device_day: float = 0.05
    use_nab: bool = True
    datasets_dir: str = ""          # where nab/ is; "" = $EDGE_DATASETS, then ../shared/datasets

    def __post_init__(self) -> None:
        if self.devices < 1 or self.days <= 0 or self.step_s <= 0:
            raise ValueError("devices >= 1, days > 0 and step_s > 0 are required")
        if not 0 <= self.sudden_share <= 1 or self.failure_rate_per_device_day < 0:
            raise ValueError("sudden_share in [0, 1] and a non-negative failure rate are required")
        unknown = [r for r in self.roles if r not in ROLE_PROFILES]
        if unknown or not self.roles:
            raise ValueError(f"unknown roles {unknown}; known: {sorted(ROLE_PROFILES)}")
        if not 0 <= self.drift_devices <= self.devices or (self.drift_devices and len(self.roles) < 2):
            raise ValueError("drift_devices must be in [0, devices] and needs two roles")

    @property
    def end_ts_s(self) -> float:
        return self.start_ts_s + self.days * DAY_S


@dataclass(frozen=True)
class Failure:
    device_id: str
    ts_s: float
    cause: str
    onset_ts_s: float | None

    @property
    def gradual(self) -> bool:
        return self.cause != "sudden"


@dataclass
class DeviceHistory:
    device_id: str
    role: str
    ts_s: np.ndarray
    values: dict[str, np.ndarray]
    drifted_to: str | None = None
    events: list[dict] = field(default_factory=list)

    def samples(self) -> list[tuple[float, dict[str, float]]]:
        """(ts_s, {metric: value}) as the agent stores them: NaN (absent) values left out."""
        names = list(self.values)
        cols = np.column_stack([self.values[n] for n in names]) if names else np.empty((len(self.ts_s), 0))
        out = []
        for ts, row in zip(self.ts_s.tolist(), cols.tolist()):
            out.append((ts, {n: v for n, v in zip(names, row) if v == v}))
        return out


@dataclass
class SimulatedFleet:
    params: SimParams
    devices: list[DeviceHistory]
    failures: list[Failure]
    noise: str = "synthetic"        # "nab" when cut from NAB traces: summaries say which

    def device(self, device_id: str) -> DeviceHistory:
        for d in self.devices:
            if d.device_id == device_id:
                return d
        raise KeyError(device_id)

    def failures_of(self, device_id: str) -> list[Failure]:
        return [f for f in self.failures if f.device_id == device_id]

    def truth(self) -> dict[str, Any]:
        return {"params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.params).items()},
                "devices": [{"device_id": d.device_id, "role": d.role, "drifted_to": d.drifted_to}
                            for d in self.devices],
                "failures": [asdict(f) for f in self.failures]}


# -- noise and cycles ------------------------------------------------------------------------
def datasets_candidates(explicit: str = "") -> list[Path]:
    """Where NAB may be, in order: --datasets, $EDGE_DATASETS, ../shared/datasets from the working
    directory (what the README says), then beside the repository (tests and benches run from it)."""
    if explicit:
        return [Path(explicit)]
    if os.environ.get("EDGE_DATASETS"):
        return [Path(os.environ["EDGE_DATASETS"])]
    return [Path.cwd().parent / "shared" / "datasets", Path(__file__).resolve().parents[2] / "shared" / "datasets"]


def find_nab(explicit: str = "") -> tuple[Path | None, list[Path]]:
    """(the first candidate holding nab/data, every candidate looked at)."""
    tried = datasets_candidates(explicit)
    return next((c for c in tried if (c / "nab" / "data").is_dir()), None), tried


@lru_cache(maxsize=4)
def _nab_shapes(datasets: str = "") -> tuple[np.ndarray, ...]:
    """Robust-normalised NAB series (median 0, MAD-scale 1, clipped); () when absent."""
    found, _ = find_nab(datasets)
    if found is None:
        return ()
    root = found / "nab" / "data"
    out = []
    for rel in _NAB_FILES:
        path = root / rel
        if not path.is_file():
            continue
        try:
            with open(path, newline="", encoding="utf-8") as f:
                vals = np.array([float(r["value"]) for r in csv.DictReader(f)], dtype=np.float64)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("simulate: skipping %s: %s", path, exc)
            continue
        if rel.endswith("nyc_taxi.csv"):      # 30-minute steps -> 5-minute by interpolation
            vals = np.interp(np.arange(len(vals) * 6) / 6.0, np.arange(len(vals)), vals)
        med = np.median(vals)
        mad = np.median(np.abs(vals - med)) * 1.4826 or (np.std(vals) or 1.0)
        out.append(np.clip((vals - med) / mad, -4.0, 4.0))
    return tuple(out)


def _noise(rng: np.random.Generator, n: int, shapes: tuple[np.ndarray, ...]) -> np.ndarray:
    """n steps of unit-scale noise: a slice of a real trace, or AR(1) when none is available."""
    usable = [s for s in shapes if len(s) > 64]
    if usable:
        s = usable[int(rng.integers(len(usable)))]
        start = int(rng.integers(len(s)))
        idx = (start + np.arange(n)) % len(s)
        x = s[idx] * (1.0 if rng.random() < 0.5 else -1.0)
        return x + 0.3 * rng.standard_normal(n)
    e = rng.standard_normal(n)
    x = np.empty(n)
    acc = 0.0
    for i in range(n):
        acc = 0.8 * acc + 0.6 * e[i]
        x[i] = acc
    return x


def _cycle(t: np.ndarray, phase_s: float) -> np.ndarray:
    """Daily + weekly shape in [-1, 1]-ish: busy days, quiet nights and weekends."""
    day = np.sin(2 * np.pi * ((t + phase_s) % DAY_S) / DAY_S - np.pi / 2)
    weekday = ((t // DAY_S + 3) % 7) < 5
    return day * np.where(weekday, 1.0, 0.6) + np.where(weekday, 0.1, -0.2)


# -- failure timeline ----------------------------------------------------------------------
_DOWN_S = {"oom": (120, 900), "disk_full": (3600, 6 * 3600), "thermal": (1800, 3 * 3600),
           "storage_wear": (2 * 3600, 12 * 3600), "sudden": (300, 2 * 3600)}


def _timeline(rng: np.random.Generator, p: SimParams, device_id: str
              ) -> tuple[list[Failure], list[tuple[float, float]], list[tuple[float, float]]]:
    """Failures, their downtime intervals and planned reboot intervals (down, up)."""
    failures: list[Failure] = []
    down: list[tuple[float, float]] = []
    cursor = p.start_ts_s + 6 * 3600.0
    rate = p.failure_rate_per_device_day / DAY_S
    while rate > 0:
        ts = cursor + rng.exponential(1.0 / rate)
        if ts >= p.end_ts_s:
            break
        cause = "sudden" if rng.random() < p.sudden_share else GRADUAL_CAUSES[int(rng.integers(4))]
        onset = None
        if cause != "sudden":
            onset = max(ts - rng.uniform(6, 36) * 3600.0, cursor + 3600.0)
            if ts - onset < 3 * 3600.0:          # too little room for a precursor after the last repair
                ts = onset + 3 * 3600.0
                if ts >= p.end_ts_s:
                    break
        lo, hi = _DOWN_S[cause]
        up = ts + rng.uniform(lo, hi)
        failures.append(Failure(device_id, float(ts), cause, None if onset is None else float(onset)))
        down.append((float(ts), float(up)))
        cursor = up
    planned: list[tuple[float, float]] = []
    n_planned = rng.poisson(p.planned_reboots_per_device_day * p.days)
    for ts in np.sort(rng.uniform(p.start_ts_s + 3600, p.end_ts_s, n_planned)):
        span = (float(ts), float(ts + rng.uniform(60, 600)))
        busy = any(f.onset_ts_s is not None and f.onset_ts_s - 3600 <= ts <= u + 3600 or
                   f.onset_ts_s is None and f.ts_s - 3600 <= ts <= u + 3600
                   for f, (_, u) in zip(failures, down))
        if not busy and not any(a - 3600 <= ts <= b + 3600 for a, b in planned):
            planned.append(span)
    return failures, down, planned


# -- one device ----------------------------------------------------------------------------
def _levels(rng: np.random.Generator, role: str) -> dict[str, tuple[float, float, float]]:
    prof = ROLE_PROFILES[role]
    out = {}
    for k, (level, spread, amp, noise) in prof.items():
        lv = level + spread * float(np.clip(rng.standard_normal(), -2.0, 2.0))   # no device born broken
        out[k] = (lv, amp * rng.uniform(0.7, 1.3), noise * rng.uniform(0.7, 1.3))
    return out


def _simulate_device(rng: np.random.Generator, p: SimParams, device_id: str, role: str,
                     drift_to: str | None, shapes: tuple[np.ndarray, ...]) -> tuple[DeviceHistory, list[Failure]]:
    t = p.start_ts_s + np.arange(int(round(p.days * DAY_S / p.step_s))) * p.step_s
    n = len(t)
    lv = _levels(rng, role)
    if drift_to is not None:
        target = _levels(rng, drift_to)
        w = np.clip((t - p.start_ts_s - 0.3 * p.days * DAY_S) / (0.4 * p.days * DAY_S), 0.0, 1.0)
    phase = rng.uniform(-2, 2) * 3600.0
    cyc = _cycle(t, phase)
    series: dict[str, np.ndarray] = {}
    for k in lv:
        level, amp, noise = lv[k]
        x = level + amp * cyc + noise * _noise(rng, n, shapes)
        if drift_to is not None:
            l2, a2, n2 = target[k]
            x = (1 - w) * x + w * (l2 + a2 * cyc + n2 * _noise(rng, n, shapes))
        series[k] = x
    # disk fills slowly and is cleaned weekly (log rotation): a sawtooth, not noise
    series["disk"] = series["disk"] + 3.0 * (((t - p.start_ts_s + rng.uniform(0, 7 * DAY_S)) % (7 * DAY_S)) / (7 * DAY_S))
    series["temp"] = series["temp"] + 0.12 * (series["cpu"] - lv["cpu"][0])
    failures, down, planned = _timeline(rng, p, device_id)

    # precursors
    for f, (ts_down, _) in zip(failures, down):
        if f.onset_ts_s is None:
            continue
        m = (t >= f.onset_ts_s) & (t < ts_down)
        prog = (t[m] - f.onset_ts_s) / (ts_down - f.onset_ts_s)
        if f.cause == "oom":
            base = series["mem"][m]
            series["mem"][m] = base + (99.7 - base) * prog ** 1.3
            series["cpu"][m] += 20.0 * prog ** 3
        elif f.cause == "disk_full":
            base = series["disk"][m]
            series["disk"][m] = base + (100.0 - base) * prog
            series["wr"][m] *= 1.0 + 3.0 * prog
        elif f.cause == "thermal":
            base = series["temp"][m]
            series["temp"][m] = base + (90.0 - base) * prog ** 1.5
            throttle = np.clip((series["temp"][m] - 72.0) / 18.0, 0.0, 1.0)
            series["cpu"][m] += 35.0 * throttle
        elif f.cause == "storage_wear":
            series["wr"][m] *= 1.0 - 0.75 * prog
            series["rd"][m] *= 1.0 - 0.6 * prog
            series["proc"][m] += 25.0 * prog ** 1.5
            series["iowait"] = series.get("iowait", np.zeros(n))
            series["iowait"][m] += 4.0 * prog ** 1.5

    cores = CORES[role]
    cpu = np.clip(series["cpu"], 0.5, 100.0)
    mem = np.clip(series["mem"], 5.0, 99.9)
    disk = np.clip(series["disk"], 1.0, 100.0)
    temp = series["temp"]
    load1 = np.clip(cpu / 100.0 * cores * (1 + 0.1 * rng.standard_normal(n)) + series.get("iowait", 0.0), 0.0, None)
    swap = np.clip((mem - 80.0) / 20.0, 0.0, 1.0) * 90.0 + np.abs(rng.normal(0, 0.3, n))
    rates = {k: np.clip(series[k], 0.0, None) for k in ("rx", "tx", "rd", "wr")}

    # alive mask, uptime and reboots
    alive = np.ones(n, dtype=bool)
    boots = [p.start_ts_s - rng.uniform(1, 20) * DAY_S]
    events: list[dict] = []
    outages = sorted([(a, b, False) for a, b in down] + [(a, b, True) for a, b in planned])
    for a, b, clean in outages:
        alive &= ~((t >= a) & (t < b))
        events.append(_event(a, "offline", clean=clean))
        events.append(_event(b, "reboot", clean=clean))
        events.append(_event(b, "online", clean=clean))
        boots.append(b)
    boots_arr = np.array(boots)
    last_boot = boots_arr[np.searchsorted(boots_arr, t, side="right") - 1]
    uptime = t - last_boot + rng.uniform(0, p.step_s)
    mem_total, disk_total = MEM_TOTAL_BYTES[role], DISK_TOTAL_BYTES[role]
    values = {
        "system.cpuUsage": cpu,
        "system.load1": load1,
        "system.load5": load1 * 0.9 + 0.1 * np.mean(load1),
        "system.memoryPercent": mem,
        "system.memoryUsed": mem / 100.0 * mem_total,
        "system.memoryTotal": np.full(n, mem_total),
        "system.swapPercent": swap,
        "system.diskPercent": disk,
        "system.diskUsed": disk / 100.0 * disk_total,
        "system.diskTotal": np.full(n, disk_total),
        "system.temperature": temp,
        "system.processCount": np.round(np.clip(series["proc"], 20, None)),
        "system.uptime": uptime,
        "disk.readBytesPerSec": rates["rd"],
        "disk.writeBytesPerSec": rates["wr"],
        "network.bytesReceivedPerSec": rates["rx"],
        "network.bytesSentPerSec": rates["tx"],
    }
    keep = alive
    ts_kept = t[keep]
    vals = {k: v[keep].astype(np.float64) for k, v in values.items()}
    # first sample after a boot has no rates (the counters restarted)
    fab = np.r_[True, (np.searchsorted(boots_arr, ts_kept, side="right")[1:] !=
                       np.searchsorted(boots_arr, ts_kept, side="right")[:-1])]
    for k in ("disk.readBytesPerSec", "disk.writeBytesPerSec", "network.bytesReceivedPerSec",
              "network.bytesSentPerSec"):
        vals[k][fab] = np.nan
    events.extend(_anomaly_events(rng, p, t, failures, down, device_id))
    events.sort(key=lambda e: (e["ts_s"], e["kind"]))
    return DeviceHistory(device_id, role, ts_kept, vals, drift_to, events), failures


def _event(ts_s: float, kind: str, *, clean: bool = False, severity: str | None = None,
           end_ts_s: float | None = None, metric: str | None = None) -> dict:
    return {"ts_s": float(ts_s), "kind": kind, "clean": clean, "severity": severity,
            "end_ts_s": end_ts_s, "metric": metric}


_CAUSE_METRIC = {"oom": "system.memoryPercent", "disk_full": "system.diskPercent",
                 "thermal": "system.temperature", "storage_wear": "system.load1"}


def _anomaly_events(rng: np.random.Generator, p: SimParams, t: np.ndarray, failures: list[Failure],
                    down: list[tuple[float, float]], device_id: str) -> list[dict]:
    """What the device's own detector would report: late-precursor episodes plus false alarms."""
    out = []
    for f, (ts_down, _) in zip(failures, down):
        if f.onset_ts_s is None:
            continue
        span = ts_down - f.onset_ts_s
        metric = _CAUSE_METRIC[f.cause]
        if rng.random() < 0.8:   # the detector usually notices the second half
            start = f.onset_ts_s + span * rng.uniform(0.45, 0.75)
            out.append(_event(start, "anomaly", severity="warning", end_ts_s=start + span * 0.1, metric=metric))
        if rng.random() < 0.6:   # and goes critical in the last hours
            start = ts_down - min(span * 0.15, rng.uniform(0.5, 3) * 3600.0)
            out.append(_event(start, "anomaly", severity="critical", end_ts_s=ts_down - p.step_s, metric=metric))
    n_false = rng.poisson(0.4 * p.days)
    metrics = list(_CAUSE_METRIC.values()) + ["system.cpuUsage", "network.bytesSentPerSec"]
    for ts in rng.uniform(p.start_ts_s, p.end_ts_s, n_false):
        if any(a <= ts < b for a, b in down):
            continue
        sev = "critical" if rng.random() < 0.1 else "warning"
        dur = rng.uniform(1, 6) * p.step_s
        out.append(_event(float(ts), "anomaly", severity=sev, end_ts_s=float(ts + dur),
                          metric=metrics[int(rng.integers(len(metrics)))]))
    return out


def simulate_fleet(params: SimParams = SimParams(),
                   progress: Callable[[int, int], None] | None = None) -> SimulatedFleet:
    """Deterministic per params: the same seed gives the same fleet, bit for bit;
    ``progress(done, devices)`` after each device."""
    shapes = _nab_shapes(params.datasets_dir) if params.use_nab else ()
    root = np.random.SeedSequence(params.seed)
    children = root.spawn(params.devices + 1)
    plan = np.random.default_rng(children[-1])
    drifting = set(plan.choice(params.devices, size=params.drift_devices, replace=False).tolist())
    devices, failures = [], []
    width = max(3, len(str(params.devices - 1)))
    for i in range(params.devices):
        rng = np.random.default_rng(children[i])
        role = params.roles[i % len(params.roles)]
        drift_to = None
        if i in drifting:
            others = [r for r in params.roles if r != role]
            drift_to = others[int(rng.integers(len(others)))]
        dev, fails = _simulate_device(rng, params, f"sim-{i:0{width}d}", role, drift_to, shapes)
        devices.append(dev)
        failures.extend(fails)
        if progress is not None:
            progress(i + 1, params.devices)
    failures.sort(key=lambda f: (f.ts_s, f.device_id))
    return SimulatedFleet(params, devices, failures, "nab" if shapes else "synthetic")


# -- output ----------------------------------------------------------------------------------
def write_csv(fleet: SimulatedFleet, out_dir: str | Path) -> Path:
    """<out>/<device>.csv histories, events.jsonl, and truth.json (ground truth, kept apart)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for d in fleet.devices:
        names = list(d.values)
        with open(out / f"{d.device_id}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["timestamp"] + names)
            cols = np.column_stack([d.values[k] for k in names])
            for ts, row in zip(d.ts_s.tolist(), cols.tolist()):
                w.writerow([f"{ts:.0f}"] + ["" if v != v else f"{v:.6g}" for v in row])
    with open(out / "events.jsonl", "w", encoding="utf-8") as f:
        for d in fleet.devices:
            for e in d.events:
                f.write(json.dumps({"device_id": d.device_id, **e}) + "\n")
    (out / "truth.json").write_text(json.dumps(fleet.truth(), indent=1), encoding="utf-8")
    return out


def _messages(fleet: SimulatedFleet, batch: int = 288) -> Iterable[dict]:
    """The device messages (agent payload format), deterministic message ids."""
    from agent.payloads import anomaly_event, telemetry_batch

    seed = fleet.params.seed
    for d in fleet.devices:
        samples = d.samples()
        for i in range(0, len(samples), batch):
            chunk = samples[i:i + batch]
            yield telemetry_batch(d.device_id, chunk[-1][0], chunk, interval_s=fleet.params.step_s,
                                  message_id=f"sim{seed}-{d.device_id}-t{i}")
        for j, e in enumerate(x for x in d.events if x["kind"] == "anomaly"):
            yield anomaly_event(d.device_id, e["end_ts_s"], event_id=f"sim{seed}-{d.device_id}-a{j}",
                                severity=e["severity"], metrics=[e["metric"]], value=None, expected_low=None,
                                expected_high=None, deviation=None, detector="sim", model_version=None,
                                started_ts_s=e["ts_s"], ended_ts_s=e["end_ts_s"],
                                message_id=f"sim{seed}-{d.device_id}-m{j}")


def write_store(fleet: SimulatedFleet, store: Any) -> dict[str, int]:
    """Store the histories as the collector would have (telemetry + anomaly messages), plus
    status events (offline/online with ``clean``) into fleet.labels' ``device_status`` table."""
    from fleet.collect import parse_message, routes
    from fleet.labels import record_status

    table = routes()
    counts = {"messages": 0, "samples": 0, "status": 0}
    pending = []
    for msg in _messages(fleet):
        kind = msg["kind"]
        topic = f"devices/{msg['deviceId']}/{'telemetry' if kind == 'telemetry' else 'anomalies'}"
        pending.append(parse_message(topic, json.dumps(msg).encode(), table, max_bytes=64 * 1024 * 1024))
        if len(pending) >= 200:
            r = store.ingest(pending, received_s=max(m.ts_s or 0.0 for m in pending))
            counts["messages"] += r.stored
            counts["samples"] += r.samples
            pending = []
    if pending:
        r = store.ingest(pending, received_s=max(m.ts_s or 0.0 for m in pending))
        counts["messages"] += r.stored
        counts["samples"] += r.samples
    rows = [(d.device_id, e["ts_s"], e["kind"], bool(e["clean"]))
            for d in fleet.devices for e in d.events if e["kind"] in ("offline", "online")]
    counts["status"] = record_status(store, rows)
    return counts


class PublishIncomplete(OSError):
    """The broker did not acknowledge every message in time."""


def publish_mqtt(fleet: SimulatedFleet, host: str, port: int, *, topic_prefix: str = "devices/{device_id}",
                 timeout_s: float = 30.0, batch: int = 288) -> int:
    """Publish every device's telemetry and anomaly messages (QoS 1) and status events; returns how many
    the broker acknowledged (PUBACK), which is all of them or PublishIncomplete."""
    import uuid

    import paho.mqtt.client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                         client_id=f"edge-fleet-sim-{fleet.params.seed}-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(200)
    client.connect(host, port, 30)
    client.loop_start()
    try:
        infos = []
        for msg in _messages(fleet, batch):
            base = topic_prefix.replace("{device_id}", msg["deviceId"])
            sub = "telemetry" if msg["kind"] == "telemetry" else "anomalies"
            infos.append(client.publish(f"{base}/{sub}", json.dumps(msg), qos=1))
        for d in fleet.devices:
            base = topic_prefix.replace("{device_id}", d.device_id)
            for e in d.events:
                if e["kind"] in ("offline", "online"):
                    infos.append(client.publish(f"{base}/status", e["kind"], qos=1))
        for info in infos:
            info.wait_for_publish(timeout_s)
        acked = sum(1 for info in infos if info.is_published())
        if acked < len(infos):
            raise PublishIncomplete(f"the broker acknowledged {acked} of {len(infos)} messages")
        return acked
    finally:
        client.loop_stop()
        client.disconnect()


def message_ids(fleet: SimulatedFleet, batch: int = 288) -> list[str]:
    """The ids of the messages the collector stores (telemetry and anomalies; status is not stored)."""
    return [m["messageId"] for m in _messages(fleet, batch)]


def stored_ids(store: Any, ids: Sequence[str], chunk: int = 500) -> set[str]:
    """Which of ``ids`` the fleet store's messages table holds."""
    found: set[str] = set()
    for i in range(0, len(ids), chunk):
        part = list(ids[i:i + chunk])
        marks = ", ".join("?" * len(part))
        found.update(r[0] for r in store.query(f"SELECT message_id FROM messages WHERE message_id IN ({marks})",
                                               part))
    return found


def delivery_report(fleet: SimulatedFleet, store: Any, *, wait_s: float = 0.0, batch: int = 288,
                    poll_s: float = 0.5) -> dict[str, Any]:
    """Published vs stored, waiting up to ``wait_s`` for the collectors to catch up.

    ``missing`` lists (up to 20 of) the message ids that never reached the store."""
    import time

    ids = message_ids(fleet, batch)
    deadline = time.monotonic() + wait_s
    while True:
        found = stored_ids(store, ids)
        if len(found) == len(ids) or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    missing = [i for i in ids if i not in found]
    return {"published": len(ids), "stored": len(found), "lost": len(missing),
            "loss_fraction": len(missing) / len(ids) if ids else 0.0, "missing": missing[:20]}


def params_from_args(devices: int, days: float, seed: int, **kw: Any) -> SimParams:
    return SimParams(devices=devices, days=days, seed=seed, **{k: v for k, v in kw.items() if v is not None})


def summary(fleet: SimulatedFleet) -> dict[str, Any]:
    causes: dict[str, int] = {}
    for f in fleet.failures:
        causes[f.cause] = causes.get(f.cause, 0) + 1
    return {"devices": len(fleet.devices), "samples": int(sum(len(d.ts_s) for d in fleet.devices)),
            "failures": len(fleet.failures), "by_cause": causes,
            "drifting": [d.device_id for d in fleet.devices if d.drifted_to],
            "days": fleet.params.days, "seed": fleet.params.seed, "noise": fleet.noise}
