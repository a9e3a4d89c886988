"""``edge-fleet clusters``: group devices by behaviour, find the ones that belong nowhere, ship the clusters.

Per device, the collected history is cut into windows of ``window_s`` (one day)
counted back from its newest sample, and each window becomes a behaviour profile
(``models.clusters``: per metric mean, spread, percentiles, daily-cycle
strength). A device's profile is the median of its window profiles, so one bad
day (a failure, a maintenance) does not move it.

- K-Means (scikit-learn) over the standardised device profiles; k is
  configured, or chosen by the best silhouette between 2 and ``k_max``.
- DBSCAN over the same points finds devices that belong to no dense group
  ("outliers"). Its ``eps`` defaults to ``eps_factor`` x the median distance of
  a device to its ``min_samples``-th nearest neighbour, so it follows the
  fleet's own spread instead of a magic constant.
- Per cluster: the centroid (mean of its non-outlier members, scaled space)
  and a radius = ``quantile`` of the distances of its members' *window*
  profiles to the centroid, times ``margin``. The window profiles, not only the
  device medians, set the radius because a device compares one day of its own
  behaviour with it.

The result is a ``cluster`` model (``cluster.npz`` + ``model.json``,
``models.clusters.save_cluster_model``) registered in the model registry under
the target (fleet, a group, or one per device with ``--per-device``) and
bundled/published through the same path as the other kinds
(``fleet.registry.publish_record``). A cluster model is a snapshot, not a
challenger: it is registered as a candidate with a note and published as it is
(the forest/LSTM champion of the same target stays champion).

scikit-learn is imported inside ``fit_clusters`` only.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from models.clusters import (
    DEFAULT_METRICS, DEFAULT_STATS, ClusterModel, feature_names, rms_distances, rows_to_columns,
    save_cluster_model, window_profiles,
)

log = logging.getLogger(__name__)

Columns = tuple[np.ndarray, Mapping[str, np.ndarray]]


class ClusteringError(ValueError):
    """Too few devices or profiles to cluster; the message is for the operator."""


@dataclass(frozen=True)
class ClusterParams:
    k: int = 0                          # 0: choose by silhouette in [2, k_max]
    k_max: int = 8
    min_cluster_size: int = 3           # auto k: a "cluster" smaller than this is outliers, not a role
    window_s: float = 86400.0           # one profile per window
    min_coverage: float = 0.5           # a window needs samples over this share of window_s
    metrics: tuple[str, ...] = DEFAULT_METRICS
    stats: tuple[str, ...] = DEFAULT_STATS
    min_presence: float = 0.9           # a feature must be computable for this share of devices
    quantile: float = 0.95              # radius = quantile of member window distances ...
    margin: float = 1.5                 # ... times this
    min_radius: float = 0.25            # never tighter than this (RMS z units)
    dbscan_min_samples: int = 3
    eps: float = 0.0                    # 0: eps_factor x median k-NN distance
    eps_factor: float = 2.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 0 or self.k == 1 or self.k_max < 2:
            raise ValueError("k must be 0 (auto) or >= 2, and k_max >= 2")
        if not 0 < self.quantile <= 1 or self.margin <= 0 or self.window_s <= 0:
            raise ValueError("quantile in (0, 1], margin > 0 and window_s > 0 are required")


@dataclass(frozen=True)
class ProfileSet:
    """Profiles of every device: the per-window ones and the per-device medians."""

    device_ids: tuple[str, ...]
    names: tuple[str, ...]
    windows: tuple[np.ndarray, ...]     # per device: (n_windows, d)
    window_ends_s: tuple[np.ndarray, ...]

    @property
    def device_matrix(self) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # an all-NaN column stays NaN
            return np.vstack([np.nanmedian(w, axis=0) for w in self.windows])


@dataclass
class ClusterResult:
    model: ClusterModel
    device_ids: tuple[str, ...]
    labels: np.ndarray                  # K-Means cluster per device
    outlier: np.ndarray                 # bool per device (DBSCAN noise)
    distances: np.ndarray               # per device: RMS distance of its median profile to its centroid
    silhouette: float | None
    silhouettes: dict[int, float]       # k -> silhouette tried
    eps: float
    params: ClusterParams
    dropped_features: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    profiles: np.ndarray | None = None  # per device: median profile over the model's features (NaN = lacks it)

    def device_model(self, device_id: str, version: int) -> ClusterModel:
        """The model for one device: its cluster assigned, and without the features it cannot compute
        (a device without a temperature sensor would refuse a bundle naming system.temperature)."""
        assigned = self.model.assignments.get(device_id)
        model = with_version(self.model, version, assigned, {device_id: assigned} if assigned is not None else {})
        if self.profiles is None or device_id not in self.device_ids:
            return model
        have = np.isfinite(self.profiles[self.device_ids.index(device_id)])
        return model if have.all() or not have.any() else drop_features(model, have)

    def clusters(self) -> list[dict[str, Any]]:
        out = []
        for c in range(self.model.k):
            members = [d for d, lab in zip(self.device_ids, self.labels) if lab == c]
            out.append({"cluster": c, "size": len(members), "radius": float(self.model.radius[c]),
                        "members": members,
                        "outliers": [d for d, lab, o in zip(self.device_ids, self.labels, self.outlier)
                                     if lab == c and o]})
        return out

    def outliers(self) -> list[dict[str, Any]]:
        return [{"device_id": d, "nearest_cluster": int(lab), "distance": float(dist),
                 "radius": float(self.model.radius[lab])}
                for d, lab, o, dist in zip(self.device_ids, self.labels, self.outlier, self.distances) if o]

    def as_dict(self) -> dict[str, Any]:
        return {"k": self.model.k, "silhouette": self.silhouette,
                "silhouettes": {str(k): v for k, v in self.silhouettes.items()}, "eps": self.eps,
                "devices": len(self.device_ids), "features": list(self.model.feature_names),
                "dropped_features": list(self.dropped_features), "clusters": self.clusters(),
                "outliers": self.outliers(),
                "assignments": {d: int(lab) for d, lab in zip(self.device_ids, self.labels)},
                "distances": {d: float(x) for d, x in zip(self.device_ids, self.distances)}, **self.info}


# -- profiles ------------------------------------------------------------------------------------
def build_profiles(histories: Mapping[str, Columns], params: ClusterParams,
                   until_s: float | None = None) -> ProfileSet:
    """Window profiles per device from columns (ts_s, {metric: values}); devices without one are left out."""
    names = feature_names(params.metrics, params.stats)
    ids, windows, ends = [], [], []
    for device_id in sorted(histories):
        ts, cols = histories[device_id]
        ts = np.asarray(ts, dtype=float)
        if until_s is not None:
            keep = ts < until_s
            ts, cols = ts[keep], {m: np.asarray(c)[keep] for m, c in cols.items()}
        e, P = window_profiles(ts, cols, names, params.window_s, params.min_coverage)
        if len(P) == 0:
            log.info("device %s: no complete %.0f s window; left out", device_id, params.window_s)
            continue
        ids.append(device_id)
        windows.append(P)
        ends.append(e)
    return ProfileSet(tuple(ids), names, tuple(windows), tuple(ends))


def store_histories(store: Any, device_ids: Sequence[str], metrics: Sequence[str], *,
                    since_s: float | None = None, until_s: float | None = None) -> dict[str, Columns]:
    """Collected telemetry of each device as columns (rates derived where only counters were sent)."""
    from fleet.dataset import load_rows

    out = {}
    for device_id in device_ids:
        rows = load_rows(store, device_id, since_s, until_s, "collected")
        if rows:
            out[device_id] = rows_to_columns(rows, metrics)
    return out


# -- fitting -------------------------------------------------------------------------------------
def _select_features(X: np.ndarray, names: Sequence[str], min_presence: float) -> np.ndarray:
    present = np.isfinite(X).mean(axis=0) >= min_presence
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        spread = np.nanstd(X, axis=0)
    return present & np.isfinite(spread) & (spread > 1e-9)


def fit_clusters(profiles: ProfileSet, params: ClusterParams = ClusterParams()) -> ClusterResult:
    """K-Means + DBSCAN over device profiles, radii from window profiles (see the module docstring)."""
    from sklearn.cluster import DBSCAN, KMeans
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import NearestNeighbors

    n = len(profiles.device_ids)
    if n < 3:
        raise ClusteringError(f"{n} devices with a complete profile window; clustering needs at least 3")
    X_all = profiles.device_matrix
    keep = _select_features(X_all, profiles.names, params.min_presence)
    if not keep.any():
        raise ClusteringError("no profile feature is present (and varies) across the devices")
    names = tuple(nm for nm, k in zip(profiles.names, keep) if k)
    dropped = tuple(nm for nm, k in zip(profiles.names, keep) if not k)
    X = X_all[:, keep]
    mean = np.nanmean(X, axis=0)
    scale = np.nanstd(X, axis=0)
    scale[~(scale > 1e-9)] = 1.0
    Z = (X - mean) / scale
    Z = np.where(np.isfinite(Z), Z, 0.0)             # a missing feature sits at the fleet mean
    d = Z.shape[1]
    Zr = Z / math.sqrt(d)                            # Euclidean on Zr == RMS distance on Z

    silhouettes: dict[int, float] = {}
    if params.k:
        if params.k >= n:
            raise ClusteringError(f"k={params.k} needs more than {n} devices")
        k = params.k
    else:
        best = best_any = None
        for kk in range(2, min(params.k_max, n - 1) + 1):
            km = KMeans(n_clusters=kk, n_init=10, random_state=params.seed).fit(Zr)
            if len(set(km.labels_)) < 2:
                continue
            s = float(silhouette_score(Zr, km.labels_))
            silhouettes[kk] = s
            if best_any is None or s > best_any[1] + 1e-12:
                best_any = (kk, s)
            # a split that isolates one or two odd devices scores well but finds no role: DBSCAN reports those
            if np.bincount(km.labels_).min() >= params.min_cluster_size and (best is None or s > best[1] + 1e-12):
                best = (kk, s)
        best = best or best_any
        if best is None:
            raise ClusteringError("no k in [2, k_max] gives two non-empty clusters")
        k = best[0]
    km = KMeans(n_clusters=k, n_init=10, random_state=params.seed).fit(Zr)
    labels = km.labels_.astype(int)
    sil = silhouettes.get(k)
    if sil is None and len(set(labels)) > 1:
        sil = float(silhouette_score(Zr, labels))

    min_samples = max(2, min(params.dbscan_min_samples, n - 1))
    if params.eps > 0:
        eps = float(params.eps)
    else:
        nn = NearestNeighbors(n_neighbors=min_samples + 1).fit(Zr)
        dist, _ = nn.kneighbors(Zr)
        eps = float(params.eps_factor * np.median(dist[:, -1]))
    db = DBSCAN(eps=max(eps, 1e-9), min_samples=min_samples).fit(Zr)
    outlier = db.labels_ == -1

    centroids = np.zeros((k, d))
    radius = np.zeros(k)
    sizes = np.zeros(k, dtype=int)
    for c in range(k):
        members = labels == c
        core = members & ~outlier
        use = core if core.any() else members
        centroids[c] = Z[use].mean(axis=0)
        sizes[c] = int(members.sum())
        W = np.vstack([profiles.windows[i][:, keep] for i in np.flatnonzero(use)])
        dist_w = rms_distances((W - mean) / scale, centroids[c][None, :])[:, 0]
        dist_w = dist_w[np.isfinite(dist_w)]
        q = float(np.quantile(dist_w, params.quantile)) if len(dist_w) else params.min_radius
        radius[c] = max(q * params.margin, params.min_radius)
    device_dist = rms_distances(Z, centroids)[np.arange(n), labels]
    model = ClusterModel(feature_names=names, mean=mean, scale=scale, centroids=centroids, radius=radius,
                         sizes=sizes, window_s=params.window_s, quantile=params.quantile,
                         assignments={dev: int(lab) for dev, lab in zip(profiles.device_ids, labels)},
                         meta={"min_coverage": params.min_coverage, "margin": params.margin})
    log.info("clusters: k=%d (silhouette %s), %d devices, %d outliers (eps %.3g)", k,
             "-" if sil is None else f"{sil:.3f}", n, int(outlier.sum()), eps)
    return ClusterResult(model, profiles.device_ids, labels, outlier, device_dist, sil, silhouettes, eps, params,
                         dropped, profiles=X)


def drop_features(model: ClusterModel, keep: np.ndarray) -> ClusterModel:
    """The same clusters over a subset of the features (distances are RMS over the features present,
    so the radii stay in the same unit)."""
    from dataclasses import replace

    keep = np.asarray(keep, dtype=bool)
    return replace(model, feature_names=tuple(n for n, k in zip(model.feature_names, keep) if k),
                   mean=model.mean[keep], scale=model.scale[keep], centroids=model.centroids[:, keep])


def with_version(model: ClusterModel, version: int, assigned: int | None = None,
                 assignments: Mapping[str, int] | None = None) -> ClusterModel:
    from dataclasses import replace

    return replace(model, version=int(version), assigned=assigned,
                   assignments=dict(model.assignments if assignments is None else assignments))


# -- registry and publishing --------------------------------------------------------------------
def register_result(store: Any, config: Any, target: Any, result: ClusterResult, *, interval_s: float,
                    device_id: str | None = None, now_s: float | None = None) -> Any:
    """Write the model under the registry's version directory and register it (status candidate)."""
    from fleet.registry import Registry, version_dir

    registry = Registry(store)
    version = registry.next_version(target)
    vdir = version_dir(config, target, version)
    vdir.mkdir(parents=True, exist_ok=True)
    if device_id is not None:
        model = result.device_model(device_id, version)
    else:
        model = with_version(result.model, version)
    save_cluster_model(model, vdir / "cluster", {"target": target.label, "interval_s": interval_s})
    metrics = {"kinds": ["cluster"], "k": result.model.k, "silhouette": result.silhouette,
               "devices": len(result.device_ids), "outliers": [o["device_id"] for o in result.outliers()],
               "sizes": [int(s) for s in result.model.sizes], "radius": [float(r) for r in result.model.radius]}
    params = {"interval_s": interval_s, "cluster": {k: (list(v) if isinstance(v, tuple) else v)
                                                   for k, v in asdict(result.params).items()}}
    return registry.register(target, version, kinds=["cluster"], artefact_dir=vdir, params=params,
                             metrics=metrics, data={"devices": list(result.device_ids)},
                             note="cluster model" + (f" (cluster {model.assigned})" if device_id else ""),
                             now_s=now_s)


def median_interval_s(histories: Mapping[str, Columns]) -> float:
    gaps = np.concatenate([np.diff(np.sort(np.asarray(ts, dtype=float))) for ts, _ in histories.values()]
                          or [np.zeros(0)])
    gaps = gaps[gaps > 0]
    return float(np.median(gaps)) if len(gaps) else 1.0


def targets_for(result: ClusterResult, target: Any, per_device: bool) -> list[tuple[Any, str | None]]:
    from models.bundle import Target

    if not per_device:
        return [(target, None)]
    return [(Target("device", d), d) for d in result.device_ids]


def run(store: Any, config: Any, target: Any, params: ClusterParams, *, since_s: float | None = None,
        until_s: float | None = None, register: bool = False, publish: bool = False, per_device: bool = False,
        export_dir: str | Path | None = None) -> tuple[ClusterResult, list[dict[str, Any]]]:
    """The command's work: profiles from the store -> fit -> export / register / publish."""
    from fleet.dataset import target_devices
    from fleet.registry import Registry, publish_record

    devices = target_devices(store, config, target)
    histories = store_histories(store, devices, params.metrics, since_s=since_s, until_s=until_s)
    result = fit_clusters(build_profiles(histories, params, until_s), params)
    interval_s = median_interval_s(histories)
    done: list[dict[str, Any]] = []
    if export_dir is not None:
        out = Path(export_dir)
        for tgt, dev in targets_for(result, target, per_device):
            sub = out / tgt.slug if per_device else out
            model = result.device_model(dev, 1) if dev else with_version(result.model, 1)
            save_cluster_model(model, sub, {"target": tgt.label, "interval_s": interval_s})
            done.append({"target": tgt.label, "exported": str(sub)})
    if register or publish:
        registry = Registry(store)
        for tgt, dev in targets_for(result, target, per_device):
            rec = register_result(store, config, tgt, result, interval_s=interval_s, device_id=dev)
            entry: dict[str, Any] = {"target": tgt.label, "version": rec.version, "dir": str(rec.kind_dir("cluster"))}
            if publish:
                topic, what = publish_record(config, registry, rec)
                entry["published"] = topic
            done.append(entry)
    return result, done


# -- command line --------------------------------------------------------------------------------
def _render(result: ClusterResult, done: Sequence[Mapping[str, Any]]) -> str:
    lines = [f"k={result.model.k}" + (f" (silhouette {result.silhouette:.3f})" if result.silhouette is not None
                                      else "") + f", {len(result.device_ids)} devices, "
             f"{int(result.outlier.sum())} outliers (DBSCAN eps {result.eps:.3g})"]
    for c in result.clusters():
        members = ", ".join(c["members"][:8]) + (f", ... (+{len(c['members']) - 8})" if len(c["members"]) > 8 else "")
        lines.append(f"  cluster {c['cluster']}: {c['size']:4d} devices, radius {c['radius']:.3g}  {members}")
    outs = result.outliers()
    if outs:
        lines.append("outliers (in no dense group):")
        for o in outs:
            lines.append(f"  {o['device_id']:20s} nearest cluster {o['nearest_cluster']}, distance "
                         f"{o['distance']:.3g} (radius {o['radius']:.3g})")
    else:
        lines.append("outliers: none")
    for e in done:
        lines.append("  " + ", ".join(f"{k} {v}" for k, v in e.items()))
    return "\n".join(lines)


def cmd_clusters(args: argparse.Namespace) -> int:
    from fleet.commands import EXIT_OK, _config, _open, _setup_logging, _time_arg
    from models.bundle import Target, check_target

    config = _config(args)
    _setup_logging(args)
    target = check_target({"type": "group", "id": args.group}) if args.group else Target("fleet", "all")
    params = ClusterParams(k=args.k, k_max=args.k_max, window_s=args.window_s, quantile=args.quantile,
                           margin=args.margin, dbscan_min_samples=args.min_samples, eps=args.eps, seed=args.seed)
    store = _open(config)
    try:
        result, done = run(store, config, target, params, since_s=_time_arg(args.since),
                           until_s=_time_arg(args.until), register=args.register, publish=args.publish,
                           per_device=args.per_device, export_dir=args.export)
    finally:
        store.close()
    if args.json:
        print(json.dumps({**result.as_dict(), "target": target.label, "done": list(done)}, default=str))
    else:
        print(_render(result, done))
    return EXIT_OK


def register(subparsers: Any) -> dict[str, Any]:
    """Add ``clusters`` to ``subparsers``; returns {name: handler} (fleet/cli.py merges it)."""
    from fleet.commands import _guard

    p = subparsers.add_parser("clusters", help="cluster devices by behaviour; list clusters, sizes and outliers")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--group", metavar="NAME", help="only this group's devices (default: the whole fleet)")
    g.add_argument("--fleet", action="store_true", help="every device in the store (the default)")
    p.add_argument("--k", type=int, default=0, metavar="N", help="number of clusters (default: best silhouette)")
    p.add_argument("--k-max", type=int, default=8, metavar="N", help="largest k tried (default 8)")
    p.add_argument("--window-s", type=float, default=86400.0, metavar="S", help="profile window (default 86400)")
    p.add_argument("--quantile", type=float, default=0.95, help="radius quantile of member distances (0.95)")
    p.add_argument("--margin", type=float, default=1.5, help="radius = quantile x margin (1.5)")
    p.add_argument("--min-samples", type=int, default=3, metavar="N", help="DBSCAN min_samples (3)")
    p.add_argument("--eps", type=float, default=0.0, help="DBSCAN eps (default: from the fleet's spread)")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--since", metavar="T", help="oldest sample (ISO 8601, epoch s or an age: 14d)")
    p.add_argument("--until", metavar="T", help="newest sample (exclusive)")
    p.add_argument("--export", metavar="DIR", help="write the cluster model directory (per device: DIR/<device>)")
    p.add_argument("--register", action="store_true", help="register the model in the registry")
    p.add_argument("--publish", action="store_true", help="register, sign and publish it (retained)")
    p.add_argument("--per-device", action="store_true",
                   help="one model per device (target device:ID, its own cluster) instead of one for the target")
    p.add_argument("--json", action="store_true", help="print JSON")

    def run_guarded(args: argparse.Namespace) -> int:
        try:
            return cmd_clusters(args)
        except ClusteringError as exc:
            print(f"edge-fleet clusters: {exc}", file=sys.stderr)
            return 1
    return {"clusters": _guard("clusters", run_guarded)}
