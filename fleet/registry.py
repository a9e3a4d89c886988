"""The model registry: every trained version per target, champion/challenger, publishing.

One row per (target, version) in the fleet store: status (candidate, champion,
retired), parent version (the champion it was trained to replace), the data it
saw (range, held-out start, row counts, devices), its parameters and its
held-out metrics, the last comparison with the champion, where its artefacts
live on disk (``<artefact_dir>/<target slug>/v<N>/<kind>/``) and when its bundle
was published.

Versions only grow per target, because a device refuses a bundle whose version
is not above the highest it has accepted for that target. That is why a
rollback does not re-publish the old version: it clones the old champion's
artefacts into a NEW version (parent = the old one, note "rollback to vN") and
publishes that.

Champion vs challenger (``compare``): both are scored on the same held-out
rows; each criterion is better, worse or the same within its margin:

    forecast_mase       lower is better, relative margin  (promote.mase_margin)
    coverage_error      lower is better: mean |realised - nominal| of the 80/95 % intervals
    clean_anomaly_rate  lower is better: rows flagged outside labelled anomalies
    precision           higher is better: flagged rows inside labelled anomalies / flagged rows

The challenger is promoted when it is better on at least one criterion and
worse on none (a criterion the champion lacks counts as better, one the
challenger lacks as worse). A first model is promoted when its clean anomaly
rate is at most ``promote.max_clean_anomaly_rate`` and its forecast scores are
finite.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from fleet.config import FleetConfig, PromoteSection
from fleet.store import Store
from models.bundle import Target, parse_target

log = logging.getLogger(__name__)

TRAINED_KINDS = ("forest", "lstm")   # what ``edge-fleet train`` produces: one model family

STATUSES = ("candidate", "champion", "retired")
KIND_DIRS = ("forest", "lstm")
BUNDLE_FILE = "bundle.tar"

MIGRATIONS = [
    """
    CREATE TABLE model_registry (
        id {pk}, target TEXT NOT NULL, version INTEGER NOT NULL, status TEXT NOT NULL,
        parent_version INTEGER, kinds TEXT NOT NULL, created_s {real} NOT NULL,
        status_changed_s {real} NOT NULL, promoted_s {real},
        data_from_s {real}, data_to_s {real}, holdout_from_s {real}, n_train INTEGER, n_holdout INTEGER,
        devices {json} NOT NULL, params {json} NOT NULL, metrics {json} NOT NULL, comparison {json},
        artefact_dir TEXT NOT NULL, bundle_path TEXT, published_s {real}, note TEXT NOT NULL,
        UNIQUE (target, version));
    CREATE INDEX model_registry_status ON model_registry (target, status)
    """,
]

_COLUMNS = ("id, target, version, status, parent_version, kinds, created_s, status_changed_s, promoted_s, "
            "data_from_s, data_to_s, holdout_from_s, n_train, n_holdout, devices, params, metrics, comparison, "
            "artefact_dir, bundle_path, published_s, note")


class RegistryError(ValueError):
    """A registry operation is not possible (unknown version, nothing to roll back to...)."""


@dataclass(frozen=True)
class ModelRecord:
    id: int
    target: str
    version: int
    status: str
    parent_version: int | None
    kinds: tuple[str, ...]
    created_s: float
    status_changed_s: float
    promoted_s: float | None
    data_from_s: float | None
    data_to_s: float | None
    holdout_from_s: float | None
    n_train: int | None
    n_holdout: int | None
    devices: tuple[str, ...]
    params: Mapping[str, Any]
    metrics: Mapping[str, Any]
    comparison: Mapping[str, Any] | None
    artefact_dir: str
    bundle_path: str | None
    published_s: float | None
    note: str

    @property
    def target_obj(self) -> Target:
        return parse_target(self.target)

    def kind_dir(self, kind: str) -> Path:
        return Path(self.artefact_dir) / kind

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        d["devices"] = list(self.devices)
        return d


def _record(store: Store, row: Sequence[Any]) -> ModelRecord:
    comparison = store.unjson(row[17]) if row[17] is not None else None
    return ModelRecord(
        id=int(row[0]), target=row[1], version=int(row[2]), status=row[3],
        parent_version=None if row[4] is None else int(row[4]), kinds=tuple(json.loads(row[5])),
        created_s=float(row[6]), status_changed_s=float(row[7]), promoted_s=row[8], data_from_s=row[9],
        data_to_s=row[10], holdout_from_s=row[11], n_train=row[12], n_holdout=row[13],
        devices=tuple(store.unjson(row[14])), params=store.unjson(row[15]), metrics=store.unjson(row[16]),
        comparison=comparison, artefact_dir=row[18], bundle_path=row[19], published_s=row[20], note=row[21])


class Registry:
    def __init__(self, store: Store) -> None:
        self.store = store
        store.migrate("registry", MIGRATIONS)

    def _rows(self, where: str = "", params: Sequence[Any] = (), order: str = "target, version") -> list[ModelRecord]:
        text = f"SELECT {_COLUMNS} FROM model_registry"
        if where:
            text += f" WHERE {where}"
        return [_record(self.store, r) for r in self.store.query(f"{text} ORDER BY {order}", params)]

    def next_version(self, target: Target) -> int:
        """Above every version registered for the target and every version a device reports for it
        (a bundle built by hand with ``edge-fleet bundle`` raised the devices' high-water mark too)."""
        row = self.store.one("SELECT COALESCE(MAX(version), 0) FROM model_registry WHERE target = ?",
                             (target.label,))
        return max(int(row[0]), reported_version(self.store, target)) + 1

    def register(self, target: Target, version: int, *, kinds: Sequence[str], artefact_dir: str | Path,
                 params: Mapping[str, Any], metrics: Mapping[str, Any], parent_version: int | None = None,
                 data: Mapping[str, Any] | None = None, status: str = "candidate", note: str = "",
                 now_s: float | None = None) -> ModelRecord:
        if status not in STATUSES:
            raise RegistryError(f"status must be one of {STATUSES}")
        now = time.time() if now_s is None else now_s
        data = dict(data or {})
        s = self.store
        with s.transaction():
            s.execute(
                "INSERT INTO model_registry (target, version, status, parent_version, kinds, created_s, "
                "status_changed_s, promoted_s, data_from_s, data_to_s, holdout_from_s, n_train, n_holdout, devices, "
                "params, metrics, artefact_dir, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (target.label, int(version), status, parent_version, json.dumps(list(kinds)), now, now,
                 now if status == "champion" else None, data.get("data_from_s"), data.get("data_to_s"),
                 data.get("holdout_from_s"), data.get("n_train"), data.get("n_holdout"),
                 s.json(list(data.get("devices", []))), s.json(dict(params)), s.json(_clean(metrics)),
                 str(artefact_dir), note))
        record = self.get(target, version)
        assert record is not None
        return record

    def get(self, target: Target | str, version: int) -> ModelRecord | None:
        label = target.label if isinstance(target, Target) else parse_target(target).label
        rows = self._rows("target = ? AND version = ?", (label, int(version)))
        return rows[0] if rows else None

    def require(self, target: Target | str, version: int) -> ModelRecord:
        rec = self.get(target, version)
        if rec is None:
            label = target.label if isinstance(target, Target) else target
            raise RegistryError(f"no model version {version} for {label}")
        return rec

    def champion(self, target: Target, kinds: Sequence[str] | None = TRAINED_KINDS) -> ModelRecord | None:
        """The champion among versions holding one of ``kinds`` (None: any kind). Each family of
        models (forest + LSTM from ``train``, maintenance, cluster) has its own champion per target."""
        rows = self._rows("target = ? AND status = 'champion'", (target.label,), "version DESC")
        rows = [r for r in rows if _has_kind(r, kinds)]
        return rows[0] if rows else None

    def list(self, target: Target | None = None, status: str | None = None) -> list[ModelRecord]:
        where, params = [], []
        if target is not None:
            where.append("target = ?")
            params.append(target.label)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        return self._rows(" AND ".join(where), params)

    def targets(self) -> list[str]:
        return [r[0] for r in self.store.query("SELECT DISTINCT target FROM model_registry ORDER BY target")]

    def last_trained_s(self, target: Target, kinds: Sequence[str] | None = TRAINED_KINDS) -> float | None:
        created = [r.created_s for r in self.list(target) if _has_kind(r, kinds)]
        return max(created) if created else None

    def set_comparison(self, target: Target, version: int, comparison: Mapping[str, Any]) -> None:
        with self.store.transaction():
            self.store.execute("UPDATE model_registry SET comparison = ? WHERE target = ? AND version = ?",
                               (self.store.json(_clean(comparison)), target.label, int(version)))

    def promote(self, target: Target, version: int, now_s: float | None = None) -> ModelRecord:
        """Make ``version`` the champion; the previous champion is retired (one transaction)."""
        now = time.time() if now_s is None else now_s
        rec = self.require(target, version)
        if rec.status == "champion":
            return rec
        s = self.store
        # only the champion of the same family steps down (a cluster model never retires the forest)
        previous = [r.version for r in self._rows("target = ? AND status = 'champion'", (target.label,))
                    if set(r.kinds) & set(rec.kinds)]
        with s.transaction():
            for v in previous:
                s.execute("UPDATE model_registry SET status = 'retired', status_changed_s = ? "
                          "WHERE target = ? AND version = ?", (now, target.label, v))
            s.execute("UPDATE model_registry SET status = 'champion', status_changed_s = ?, promoted_s = ? "
                      "WHERE target = ? AND version = ?", (now, now, target.label, int(version)))
        log.info("%s: v%d is the champion", target.label, version)
        return self.require(target, version)

    def previous_champion(self, target: Target, kinds: Sequence[str] | None = TRAINED_KINDS) -> ModelRecord | None:
        rows = self._rows("target = ? AND status = 'retired' AND promoted_s IS NOT NULL", (target.label,),
                          "promoted_s DESC, version DESC")
        rows = [r for r in rows if _has_kind(r, kinds)]
        return rows[0] if rows else None

    def mark_published(self, target: Target, version: int, bundle_path: str | Path,
                       now_s: float | None = None) -> None:
        now = time.time() if now_s is None else now_s
        with self.store.transaction():
            self.store.execute("UPDATE model_registry SET bundle_path = ?, published_s = ? "
                               "WHERE target = ? AND version = ?", (str(bundle_path), now, target.label, int(version)))


def reported_version(store: Store, target: Target) -> int:
    """The highest model version devices mention for ``target``: installed (twin "models") or named
    in any model event (installed, activated, rejected, rolled back).

    Why the events too: a device refuses every version at or below its high-water mark, and a
    rolled-back version for good, while its twin shows only the current model (or none, when the
    twin was not collected); a version a device ever saw must never be numbered again.
    """
    best = 0
    for reported in store.twins().values():
        for m in reported.get("models") or []:
            if isinstance(m, Mapping) and m.get("target") == target.label and _is_version(m.get("version")):
                best = max(best, m["version"])
    for event in store.model_events():  # (previousVersion may be another target's: not counted)
        if event.get("target") == target.label and _is_version(event.get("version")):
            best = max(best, event["version"])
    return best


def _is_version(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _clean(obj: Any) -> Any:
    """JSON has no NaN: non-finite floats become None."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return _clean(obj.item())
    return obj


# -- champion vs challenger (pure) ----------------------------------------------------------------
@dataclass(frozen=True)
class Criterion:
    name: str
    lower_is_better: bool
    margin: float
    relative: bool


def criteria(p: PromoteSection) -> tuple[Criterion, ...]:
    return (Criterion("forecast_mase", True, p.mase_margin, True),
            Criterion("coverage_error", True, p.coverage_margin, False),
            Criterion("clean_anomaly_rate", True, p.anomaly_rate_margin, False),
            Criterion("precision", False, p.precision_margin, False))


def _num(m: Mapping[str, Any] | None, key: str) -> float | None:
    if not m:
        return None
    v = m.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def verdict(c: Criterion, candidate: float | None, champion: float | None) -> str:
    """better | worse | same | new (only the candidate has it) | missing (only the champion) | n/a."""
    if candidate is None and champion is None:
        return "n/a"
    if champion is None:
        return "new"
    if candidate is None:
        return "missing"
    gain = (champion - candidate) if c.lower_is_better else (candidate - champion)
    if c.relative:
        base = abs(champion)
        gain = gain / base if base > 0 else (0.0 if gain == 0 else math.copysign(math.inf, gain))
    if gain > c.margin:
        return "better"
    if gain < -c.margin:
        return "worse"
    return "same"


def compare(candidate: Mapping[str, Any], champion: Mapping[str, Any] | None, p: PromoteSection,
            champion_version: int | None = None) -> dict[str, Any]:
    """The promotion decision: {"promote": bool, "reason": str, "criteria": [...], "champion_version"}."""
    rows = []
    for c in criteria(p):
        cand, champ = _num(candidate, c.name), _num(champion, c.name)
        rows.append({"name": c.name, "candidate": cand, "champion": champ, "margin": c.margin,
                     "relative": c.relative, "verdict": verdict(c, cand, champ) if champion is not None else "n/a"})
    if champion is None:
        problems = []
        rate = _num(candidate, "clean_anomaly_rate")
        if "forest" in candidate.get("kinds", []) and (rate is None or rate > p.max_clean_anomaly_rate):
            problems.append(f"clean anomaly rate {rate} > promote.max_clean_anomaly_rate {p.max_clean_anomaly_rate}")
        if "lstm" in candidate.get("kinds", []) and _num(candidate, "forecast_mase") is None:
            problems.append("the forecaster has no finite MASE on the held-out data")
        promote = not problems
        reason = "first model for this target" if promote else "; ".join(problems)
    else:
        better = [r["name"] for r in rows if r["verdict"] in ("better", "new")]
        worse = [r["name"] for r in rows if r["verdict"] in ("worse", "missing")]
        promote = bool(better) and not worse
        if promote:
            reason = f"better on {', '.join(better)}, worse on nothing"
        elif worse:
            reason = f"worse than the champion on {', '.join(worse)}"
        else:
            reason = "not better than the champion by the configured margins"
    return {"promote": promote, "reason": reason, "criteria": rows, "champion_version": champion_version}


# -- artefacts and publishing ----------------------------------------------------------------------
def version_dir(config: FleetConfig, target: Target, version: int) -> Path:
    return config.artefact_dir / target.slug / f"v{version}"


def clone_artefacts(src: ModelRecord, dst_dir: Path, version: int) -> list[str]:
    """Copy a version's model directories, rewriting the version inside each model.json."""
    kinds = []
    for kind in src.kinds:
        s = src.kind_dir(kind)
        d = dst_dir / kind
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(s, d)
        meta_path = d / "model.json"
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta["version"] = int(version)
        meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
        kinds.append(kind)
    return kinds


def build_bundle_file(config: FleetConfig, record: ModelRecord) -> Path:
    from fleet.bundle_cli import make_bundle

    out = Path(record.artefact_dir) / BUNDLE_FILE
    key = config.signing_key
    if not key.exists():
        raise RegistryError(f"no signing key at {key}: create one with `edge-fleet keygen --out {key.parent}` "
                            "(and give devices the .pub) or set fleet.signing_key")
    make_bundle(key_path=key, version=record.version, target=record.target, out=out,
                inputs=[record.kind_dir(k) for k in record.kinds], interval_s=float(record.params["interval_s"]),
                expires_in=config.promote.expires_in or None, force=True)
    return out


def publish_record(config: FleetConfig, registry: Registry, record: ModelRecord) -> tuple[str, str]:
    """Sign the version's bundle and publish it retained on the target's model topic."""
    from fleet.publish import BrokerParams, publish_bundle

    path = build_bundle_file(config, record)
    m = config.mqtt
    broker = BrokerParams(host=m.host, port=m.port, username=m.username, password=m.password, tls_ca=m.tls_ca,
                          tls_cert=m.tls_cert, tls_key=m.tls_key, protocol=m.protocol)
    topic, what = publish_bundle(path, record.target_obj, broker, topic_prefix=m.topic_prefix)
    registry.mark_published(record.target_obj, record.version, path)
    log.info("%s: published v%d on %s (%s)", record.target, record.version, topic, what)
    return topic, what


def _has_kind(rec: ModelRecord, kinds: Sequence[str] | None) -> bool:
    return kinds is None or bool(set(rec.kinds) & set(kinds))


def promote_version(config: FleetConfig, registry: Registry, target: Target, version: int, *,
                    publish: bool = True) -> tuple[ModelRecord, tuple[str, str] | None]:
    """``models promote``: make a version champion (no comparison: the operator decided) and publish it.

    A version at or below one already published for the target would be refused by
    the devices, so an older version goes out as a clone under a new version number."""
    rec = registry.require(target, version)
    published = [r.version for r in registry.list(target) if r.published_s is not None]
    if publish and published and version <= max(published):
        rec = clone_version(config, registry, rec, note=f"re-promotion of v{version}")
    rec = registry.promote(target, rec.version)
    sent = publish_record(config, registry, rec) if publish else None
    return rec, sent


def clone_version(config: FleetConfig, registry: Registry, src: ModelRecord, note: str) -> ModelRecord:
    target = src.target_obj
    version = registry.next_version(target)
    vdir = version_dir(config, target, version)
    vdir.mkdir(parents=True, exist_ok=True)
    kinds = clone_artefacts(src, vdir, version)
    data = {"data_from_s": src.data_from_s, "data_to_s": src.data_to_s, "holdout_from_s": src.holdout_from_s,
            "n_train": src.n_train, "n_holdout": src.n_holdout, "devices": list(src.devices)}
    return registry.register(target, version, kinds=kinds, artefact_dir=vdir, params=src.params,
                             metrics=src.metrics, parent_version=src.version, data=data, note=note)


def rollback(config: FleetConfig, registry: Registry, target: Target, to_version: int | None = None, *,
             publish: bool = True) -> tuple[ModelRecord, tuple[str, str] | None]:
    """Go back to the previous champion (or ``to_version``) as a new, higher version."""
    current = registry.champion(target)
    src = registry.require(target, to_version) if to_version is not None else registry.previous_champion(target)
    if src is None:
        raise RegistryError(f"{target.label}: no previous champion to roll back to")
    if current is not None and src.version == current.version:
        raise RegistryError(f"{target.label}: v{src.version} is the champion already")
    rec = clone_version(config, registry, src, note=f"rollback to v{src.version}"
                        + (f" from v{current.version}" if current else ""))
    rec = registry.promote(target, rec.version)
    sent = publish_record(config, registry, rec) if publish else None
    return rec, sent
