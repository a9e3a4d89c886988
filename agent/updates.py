"""Model updates on the device: verify a signed bundle, install it atomically, roll it back.

No MQTT here: ``ModelUpdater.offer(bytes, source_topic)`` returns a ``Decision``
(with an event dict for the caller to publish) and the caller feeds the health
check. The daemon wires topics and reloading.

Checks, in order (the first failure is the reason): size limit, tar structure
and names, signature by a trusted key (the manifest's key id selects it),
sha256 and size of every artefact (plus inert content: no pickle, no object
arrays), target applies to this device, version, precedence, features the agent
samples, expiry; then each kind's loader (if given) must accept the extracted
directory before anything is switched.

Versions and precedence. A version orders bundles of ONE target and kind: it
must be strictly greater than the highest version ever accepted for that
(kind, target), which is kept in SQLite so a retained message replayed after a
restart (or a rolled-back version) is refused. Versions of different targets are
never compared; precedence decides instead: device > group (in the order of
``groups``) > fleet > local. A fleet bundle never replaces a device-specific model of
the same kind, whatever its number; a device bundle v1 replaces a fleet model v90.

Local models (``install_local``): what the device trained itself (bootstrap
forest, on-device LSTM) is installed the same way - extracted, loader-checked,
switched atomically, on trial - under target ``local:<device id>`` with an
unsigned manifest the device writes. It has the lowest precedence: any received
bundle replaces it, and it never replaces a received model. A manifest that
arrives from outside can never claim the local target.

Decisions taken by another process (``edge-agent models ...``) leave their
event in ``model_event_queue``; the daemon publishes and deletes them.

Layout (one directory per kind, the pointer is the only thing that switches)::

    <state_dir>/models/.lock                      flock: daemon and CLI never interleave
    <state_dir>/models/<kind>/current.json        pointer: {"version", "dir", "target", "state",
                                                   "manifest_sha256", ..., "previous": {...}}
    <state_dir>/models/<kind>/v<N>-<target>/      artefacts + bundle.manifest.json/.sig
    <state_dir>/models/<kind>/tmp-<hex>/          extraction in progress (removed on start)

The version directory carries the target (``v7-device-pi01``, ``v7-fleet``)
because two targets may use the same number. Install = write into tmp, fsync the
files and the directory, rename to the version directory, fsync the parent, then
replace current.json (tmp + fsync + rename + fsync). A kill at any moment leaves
the old or the new pointer, each naming a complete directory; the start-up
reconciliation removes leftovers, completes an interrupted rollback, checks the
current directory's hashes (falling back to the previous version if they do not
match) and raises the SQLite high-water mark to what the pointer shows. A
multi-kind bundle switches kind by kind; if interrupted between two kinds, the
retained message re-offered after restart completes the missing kinds.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import sqlite3
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping, Protocol, Sequence

from agent.store import immediate_transaction, migrate
from models.bundle import (
    INSTALLED_MANIFEST, INSTALLED_SIGNATURE, LOCAL_TARGET, BundleError, BundleLimits, Manifest, Target,
    TrustedKey, VerifiedBundle, check_artefact_name, check_not_expired, check_target, missing_features,
    load_trusted_keys, make_manifest, manifest_from_dict, sha256_hex, verify_bundle,
)

from models.atomic import fsync_dir as _fsync_dir, write_file as _write_file

log = logging.getLogger(__name__)

COMPONENT = "models"
POINTER = "current.json"
MIGRATIONS = [
    """
    CREATE TABLE model_versions (
        kind TEXT NOT NULL, target_type TEXT NOT NULL, target_id TEXT NOT NULL,
        version INTEGER NOT NULL, updated_at_s REAL NOT NULL,
        PRIMARY KEY (kind, target_type, target_id));
    CREATE TABLE model_rejected (
        kind TEXT NOT NULL, target_type TEXT NOT NULL, target_id TEXT NOT NULL,
        version INTEGER NOT NULL, reason TEXT NOT NULL, ts_s REAL NOT NULL,
        PRIMARY KEY (kind, target_type, target_id, version));
    CREATE TABLE model_offers (
        source TEXT PRIMARY KEY, bundle_sha256 TEXT NOT NULL, accepted INTEGER NOT NULL,
        reason TEXT NOT NULL, ts_s REAL NOT NULL)
    """,
    # events of decisions taken by another process (edge-agent models ...): the daemon publishes them
    """
    CREATE TABLE model_event_queue (id INTEGER PRIMARY KEY, event TEXT NOT NULL, ts_s REAL NOT NULL)
    """,
]
LOCAL_SOURCE = "local"
META_FILE = "model.json"

class Clock(Protocol):
    def time(self) -> float: ...


class UpdateError(RuntimeError):
    """A local operation (rollback, show) cannot be done; the message is for the operator."""


@dataclass(frozen=True)
class HealthParams:
    samples: int = 300                 # observations after an install before it is confirmed
    anomaly_rate_factor: float = 3.0   # fail above factor x the previous model's anomaly rate ...
    anomaly_rate_floor: float = 0.05   # ... but never below this rate
    inference_budget_s: float = 0.1    # fail when the median inference time is above this


@dataclass(frozen=True)
class UpdaterParams:
    limits: BundleLimits = field(default_factory=BundleLimits)
    health: HealthParams = field(default_factory=HealthParams)


# -- pointer files (also what the daemon reads to find the current model) -----------------
def models_root(state_dir: str | Path) -> Path:
    return Path(state_dir) / "models"


def read_pointer(state_dir: str | Path, kind: str) -> dict[str, Any] | None:
    """The current.json of ``kind`` or None; written atomically, so it is whole or absent."""
    path = models_root(state_dir) / kind / POINTER
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("model pointer %s unreadable: %s", path, exc)
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("dir"), str) else None


def current_model_dir(state_dir: str | Path, kind: str) -> Path | None:
    """Directory of the installed model of ``kind`` (for the detector/forecaster loaders)."""
    ptr = read_pointer(state_dir, kind)
    return None if ptr is None else models_root(state_dir) / kind / ptr["dir"]


def list_installed(state_dir: str | Path) -> list[dict[str, Any]]:
    """Installed models from the pointer files only: no database, no writes (for ``status``)."""
    root = models_root(state_dir)
    out: list[dict[str, Any]] = []
    if not root.is_dir():
        return out
    for kdir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        ptr = read_pointer(state_dir, kdir.name)
        if ptr is None:
            continue
        prev = ptr.get("previous") or {}
        out.append({"kind": kdir.name, "version": int(ptr["version"]), "target": ptr.get("target"),
                    "state": ptr.get("state"), "installed_at_s": ptr.get("installed_at_s"),
                    "anomaly_rate": ptr.get("anomaly_rate"), "previous_version": prev.get("version"),
                    "dir": str(kdir / ptr["dir"])})
    return out


def _write_json_atomic(path: Path, doc: Mapping[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        _write_file(tmp, json.dumps(doc, indent=2, sort_keys=True).encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


_NO_LIMITS = BundleLimits(max_file_bytes=2**62, max_members=2**31)  # installed = already checked


def verify_installed(state_dir: str | Path, kind: str, entry: Mapping[str, Any]) -> list[str]:
    """Problems with an installed version directory (empty list = its hashes match the manifest)."""
    d = models_root(state_dir) / kind / str(entry.get("dir", ""))
    try:
        mbytes = (d / INSTALLED_MANIFEST).read_bytes()
    except OSError as exc:
        return [f"{d}: manifest unreadable ({exc.strerror})"]
    if sha256_hex(mbytes) != entry.get("manifest_sha256"):
        return [f"{d}: manifest sha256 differs from the pointer"]
    try:
        manifest = manifest_from_dict(json.loads(mbytes), _NO_LIMITS, allow_local=True)
    except (ValueError, BundleError) as exc:
        return [f"{d}: manifest invalid ({exc})"]
    problems = []
    for a in manifest.artefacts_of(kind):
        try:
            blob = (d / a.name).read_bytes()
        except OSError as exc:
            problems.append(f"{a.name}: unreadable ({exc.strerror})")
            continue
        if len(blob) != a.size_bytes or sha256_hex(blob) != a.sha256:
            problems.append(f"{a.name}: sha256/size mismatch")
    return problems


# -- health check -----------------------------------------------------------------------
class HealthCheck:
    """Pure state machine over the first N observations of a new model.

    Fails at once on a non-finite score, as soon as the anomaly count can no
    longer stay under the allowed rate, or (at the end) when the median inference
    time is over budget - the median so one GC pause does not roll a model back.
    """

    def __init__(self, params: HealthParams, baseline_anomaly_rate: float | None) -> None:
        self.params = params
        base = baseline_anomaly_rate if baseline_anomaly_rate is not None and math.isfinite(baseline_anomaly_rate) else 0.0
        self.allowed_rate = max(params.anomaly_rate_factor * base, params.anomaly_rate_floor)
        self.samples = 0
        self.anomalies = 0
        self.over_budget = 0
        self._inference_s: list[float] = []
        self.state = "running"
        self.reason = ""

    @property
    def anomaly_rate(self) -> float:
        return self.anomalies / self.samples if self.samples else 0.0

    def _fail(self, reason: str) -> str:
        self.state, self.reason = "failed", reason
        return self.state

    def observe(self, score_finite: bool, is_anomaly: bool, inference_s: float) -> str:
        """Returns "running", "passed" or "failed" (the last two once, then sticky)."""
        if self.state != "running":
            return self.state
        n = self.params.samples
        self.samples += 1
        self.anomalies += bool(is_anomaly)
        self._inference_s.append(float(inference_s))
        self.over_budget += inference_s > self.params.inference_budget_s
        if not score_finite:
            return self._fail(f"non-finite score after {self.samples} samples")
        allowed = self.allowed_rate * n
        if self.anomalies > allowed:
            return self._fail(f"anomaly rate {self.anomalies}/{self.samples} exceeds the allowed "
                              f"{self.allowed_rate:.3f} over {n} samples")
        if self.over_budget > n // 2:
            return self._fail(f"inference over the {self.params.inference_budget_s * 1e3:g} ms budget "
                              f"in {self.over_budget} of {self.samples} samples")
        if self.samples >= n:
            median = statistics.median(self._inference_s)
            if median > self.params.inference_budget_s:
                return self._fail(f"median inference {median * 1e3:.1f} ms over the "
                                  f"{self.params.inference_budget_s * 1e3:g} ms budget")
            self.state = "passed"
        return self.state


class HealthMonitor:
    """A HealthCheck bound to one installed model; its verdict confirms or rolls back."""

    def __init__(self, updater: "ModelUpdater", kind: str, version: int, target: dict, check: HealthCheck) -> None:
        self.updater, self.kind, self.version, self.target, self.check = updater, kind, version, target, check
        self.done = False

    def observe(self, score_finite: bool, is_anomaly: bool, inference_s: float) -> dict | None:
        """None while undecided; then once, the event dict (action "confirm" or "rollback")."""
        if self.done:
            return None
        state = self.check.observe(score_finite, is_anomaly, inference_s)
        if state == "running":
            return None
        self.done = True
        if state == "passed":
            return self.updater._confirm(self)
        return self.updater._health_failed(self)


# -- decisions --------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str
    kinds: tuple[str, ...]
    version: int | None
    target: dict | None
    event: dict
    stage: str = ""          # which check refused: size, parse, signature, hash, content, target, version, ...
    repeat: bool = False     # refusal of bytes already reported from this source: the caller need not publish
    health: Mapping[str, HealthMonitor] = field(default_factory=dict)


MetricsSource = Collection[str] | Callable[[], Collection[str]]


class ModelUpdater:
    """Receives bundle bytes, decides, installs; one per process, main-loop thread only.

    ``available_metrics``: metric names the agent samples (or a callable giving
    them); None skips the feature check. ``loaders``: optional {kind: callable(dir)}
    that must load an extracted model without raising before it is switched in
    (any exception refuses the bundle - it is foreign code at a trust boundary).
    """

    def __init__(self, state_dir: str | Path, conn: sqlite3.Connection, trusted_keys: Sequence[str | Path],
                 device_id: str, groups: Sequence[str] = (), available_metrics: MetricsSource | None = None,
                 params: UpdaterParams = UpdaterParams(), clock: Clock | None = None,
                 loaders: Mapping[str, Callable[[Path], Any]] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.root = models_root(state_dir)
        self.conn = conn
        self.device_id = device_id
        self.groups = tuple(groups)
        self.params = params
        self.clock = clock or time
        self.loaders = dict(loaders or {})
        self._available = available_metrics
        self.trusted: dict[str, TrustedKey] = load_trusted_keys(trusted_keys)   # no crypto import needed
        self.startup_events: list[dict] = []
        self.root.mkdir(parents=True, exist_ok=True)
        migrate(conn, COMPONENT, MIGRATIONS)
        with self._lock():
            self._reconcile()

    # -- infrastructure -------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate_transaction(self.conn)

    def _now(self) -> float:
        return float(self.clock.time())

    def _event(self, action: str, reason: str, version: int | None, target: dict | None,
               kinds: Sequence[str], **extra: Any) -> dict:
        return {"kind": "model", "action": action, "reason": reason, "version": version, "target": target,
                "kinds": list(kinds), "ts_s": self._now(), **extra}

    def _rank(self, target: Target | Mapping[str, Any]) -> int | None:
        """0 = most specific. None = the target does not include this device."""
        t = target if isinstance(target, Target) else Target(str(target.get("type")), str(target.get("id")))
        if t.type == "device":
            return 0 if t.id == self.device_id else None
        if t.type == "group":
            return 1 + self.groups.index(t.id) if t.id in self.groups else None
        if t.type == "fleet":
            return 1 + len(self.groups)
        if t.type == LOCAL_TARGET:   # trained on this device: below anything received
            return 2 + len(self.groups) if t.id == self.device_id else None
        return None

    def _highwater(self, kind: str, target: Target) -> int | None:
        row = self.conn.execute("SELECT version FROM model_versions WHERE kind=? AND target_type=? AND target_id=?",
                                (kind, target.type, target.id)).fetchone()
        return None if row is None else int(row[0])

    def _raise_highwater(self, conn: sqlite3.Connection, kind: str, target: Target, version: int) -> None:
        conn.execute(
            "INSERT INTO model_versions (kind, target_type, target_id, version, updated_at_s) VALUES (?,?,?,?,?) "
            "ON CONFLICT(kind, target_type, target_id) DO UPDATE SET version = excluded.version, "
            "updated_at_s = excluded.updated_at_s WHERE excluded.version > model_versions.version",
            (kind, target.type, target.id, version, self._now()))

    def _rejected_reason(self, kind: str, target: Target, version: int) -> str | None:
        row = self.conn.execute("SELECT reason FROM model_rejected WHERE kind=? AND target_type=? AND target_id=? "
                                "AND version=?", (kind, target.type, target.id, version)).fetchone()
        return None if row is None else str(row[0])

    def _pointer(self, kind: str) -> dict[str, Any] | None:
        return read_pointer(self.state_dir, kind)

    def _kind_dirs(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink())

    def _prune(self, kind: str) -> None:
        """Remove everything in the kind directory but the current and previous versions."""
        kdir = self.root / kind
        if not kdir.is_dir():
            return
        ptr = self._pointer(kind)
        keep = {POINTER}
        if ptr:
            keep.add(ptr["dir"])
            if ptr.get("previous"):
                keep.add(ptr["previous"]["dir"])
        for p in kdir.iterdir():
            if p.name in keep:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()

    # -- start-up -------------------------------------------------------------------------
    def _reconcile(self) -> None:
        """Finish what a crash interrupted; the pointer files are the truth for what is installed."""
        for kdir in self._kind_dirs():
            kind = kdir.name
            ptr = self._pointer(kind)
            if ptr is not None:
                target = check_target(ptr["target"], allow_local=True)
                why = self._rejected_reason(kind, target, int(ptr["version"]))
                if why is not None:
                    log.warning("completing the interrupted rollback of %s v%s", kind, ptr["version"])
                    self._switch_back(kind, ptr)
                else:
                    problems = verify_installed(self.state_dir, kind, ptr)
                    if problems:
                        log.error("installed %s v%s is damaged: %s", kind, ptr["version"], "; ".join(problems))
                        reason = f"installed files damaged: {problems[0]}"
                        self._mark_rejected(kind, target, int(ptr["version"]), reason)
                        restored = self._switch_back(kind, ptr)
                        self.startup_events.append(self._event(
                            "rollback", reason, int(ptr["version"]), ptr["target"], [kind],
                            restored_version=restored))
                    else:
                        with self._tx() as conn:
                            self._raise_highwater(conn, kind, target, int(ptr["version"]))
            self._prune(kind)

    # -- offers ---------------------------------------------------------------------------
    def available_metrics(self) -> Collection[str] | None:
        src = self._available
        return src() if callable(src) else src

    def offer(self, bundle_bytes: bytes, source_topic: str = "") -> Decision:
        """Check a received bundle and install it if every check passes."""
        with self._lock():
            return self._offer(bytes(bundle_bytes), source_topic)

    def install_file(self, path: str | Path) -> Decision:
        """``edge-agent models install FILE``: the same checks as a bundle from MQTT."""
        p = Path(path)
        limit = self.params.limits.max_bundle_bytes
        try:
            with open(p, "rb") as f:
                data = f.read(limit + 1)  # never read more than one byte past the limit
        except OSError as exc:
            raise UpdateError(f"cannot read {p}: {exc.strerror}") from None
        return self.offer(data, f"file:{p.resolve()}")

    # -- models trained on this device ------------------------------------------------------
    def install_local(self, kind: str, model_dir: str | Path, version: int | None = None,
                      interval_s: float | None = None) -> Decision:
        """Install a model this device trained itself (bootstrap forest, on-device LSTM).

        No signature: this process produced it. Target ``local:<device id>``, the lowest
        precedence: any received bundle replaces it, and it never replaces a received model
        (refused with the reason). Otherwise it goes the way of a bundle: copied, checked by
        the kind's loader, switched in atomically with the previous version kept, and put on
        trial. ``version`` defaults to the local high-water mark + 1; the installed copy of
        model.json is rewritten to carry it, so loaders report the version the pointer shows.
        """
        with self._lock():
            return self._install_local(kind, Path(model_dir), version, interval_s)

    def next_local_version(self, kind: str) -> int:
        """The version ``install_local(kind, dir)`` will give the next local model (for model.json)."""
        return (self._highwater(kind, Target(LOCAL_TARGET, self.device_id)) or 0) + 1

    def _read_local_dir(self, kind: str, model_dir: Path) -> tuple[dict[str, bytes], dict[str, Any]]:
        limits = self.params.limits
        if not model_dir.is_dir() or model_dir.is_symlink():
            raise BundleError(f"{model_dir}: not a model directory", "parse")
        files: dict[str, bytes] = {}
        for p in sorted(model_dir.iterdir()):
            path = f"{kind}/{p.name}"
            check_artefact_name(path, limits)              # kind name, file types, no pickle
            if p.is_symlink() or not p.is_file():
                raise BundleError(f"{p}: not a regular file", "parse")
            if p.stat().st_size > limits.max_file_bytes:
                raise BundleError(f"{p}: too large ({p.stat().st_size} bytes > {limits.max_file_bytes})", "size")
            files[path] = p.read_bytes()
        raw_meta = files.get(f"{kind}/{META_FILE}")
        if raw_meta is None:
            raise BundleError(f"{model_dir}: no {META_FILE}", "parse")
        try:
            meta = json.loads(raw_meta)
        except ValueError:
            raise BundleError(f"{model_dir}/{META_FILE} is not valid JSON", "parse") from None
        if not isinstance(meta, dict) or meta.get("kind", kind) != kind:
            raise BundleError(f"{model_dir}/{META_FILE}: kind {meta.get('kind') if isinstance(meta, dict) else None!r} "
                              f"is not {kind!r}", "parse")
        return files, meta

    def _install_local(self, kind: str, model_dir: Path, version: int | None, interval_s: float | None) -> Decision:
        target = Target(LOCAL_TARGET, self.device_id)
        try:
            files, meta = self._read_local_dir(kind, model_dir)
            ptr = self._pointer(kind)
            if ptr is not None and ptr["target"].get("type") != LOCAL_TARGET:
                cur = check_target(ptr["target"], allow_local=True)
                raise BundleError(f"a received {kind} model is installed (v{ptr['version']} for {cur.label}); "
                                  "a model trained on this device never replaces a received one", "precedence")
            hw = self._highwater(kind, target)
            if version is None:
                version = (hw or 0) + 1
            elif hw is not None and version <= hw:
                word = "same version" if version == hw else "downgrade"
                raise BundleError(f"{word}: local {kind} v{version} <= v{hw} already installed here", "version")
            if meta.get("version") != version:
                files[f"{kind}/{META_FILE}"] = json.dumps({**meta, "version": version}, indent=2,
                                                          sort_keys=True).encode("utf-8")
            features = meta.get("feature_names") or meta.get("inputs") or []
            interval = interval_s or meta.get("interval_s") or meta.get("step_s") or 1.0
            mbytes = make_manifest(kinds=[kind], version=version, target=target, feature_names=features,
                                   interval_s=float(interval), created_at_s=self._now(), key_id="", files=files,
                                   limits=self.params.limits, allow_local=True)
            manifest = manifest_from_dict(json.loads(mbytes), self.params.limits, allow_local=True)
            self._check_features(manifest, files)
            vb = VerifiedBundle(manifest, mbytes, b"", files, "")
            health = self._install(vb, {kind: ptr}, LOCAL_SOURCE)
        except BundleError as exc:
            log.warning("local %s model from %s refused: %s", kind, model_dir, exc.reason)
            event = self._event("reject", exc.reason, version, target.as_dict(), [kind], stage=exc.stage,
                                source=LOCAL_SOURCE)
            return Decision(False, exc.reason, (kind,), version, target.as_dict(), event, stage=exc.stage)
        reason = f"installed {kind} v{version} trained on this device"
        log.info("%s", reason)
        event = self._event("accept", reason, version, target.as_dict(), [kind], source=LOCAL_SOURCE,
                            previous={kind: (ptr or {}).get("version")})
        return Decision(True, reason, (kind,), version, target.as_dict(), event, health=health)

    # -- events for the daemon to publish -------------------------------------------------
    def queue_event(self, event: Mapping[str, Any]) -> None:
        """Keep an event of a decision taken outside the daemon (the CLI) for the daemon to publish."""
        with self._tx() as conn:
            conn.execute("INSERT INTO model_event_queue (event, ts_s) VALUES (?, ?)",
                         (json.dumps(dict(event), sort_keys=True), self._now()))

    def queued_events(self, limit: int = 100) -> list[tuple[int, dict]]:
        rows = self.conn.execute("SELECT id, event FROM model_event_queue ORDER BY id LIMIT ?", (limit,)).fetchall()
        out = []
        for row_id, text in rows:
            try:
                out.append((int(row_id), json.loads(text)))
            except ValueError:
                out.append((int(row_id), {}))
        return out

    def drop_queued_events(self, ids: Sequence[int]) -> None:
        if ids:
            with self._tx() as conn:
                conn.executemany("DELETE FROM model_event_queue WHERE id = ?", [(i,) for i in ids])

    def _offer(self, data: bytes, source: str) -> Decision:
        limits = self.params.limits
        bundle_sha = sha256_hex(data) if len(data) <= 4 * limits.max_bundle_bytes else f"oversized:{len(data)}"
        manifest: Manifest | None = None
        try:
            try:
                vb = verify_bundle(data, self.trusted, limits)   # size, parse, signature, hashes, content
            except BundleError as exc:
                if exc.stage == "signature" and not self.trusted:
                    raise BundleError(f"{exc.reason} (no trusted keys configured: [models] trusted_keys)",
                                      "signature") from None
                raise
            manifest = vb.manifest
            plans = self._plan(vb)                                 # target, version, precedence
            missing = self._check_features(manifest, vb.files)
            check_not_expired(manifest, self._now())
            health = self._install(vb, plans, source)
        except BundleError as exc:
            return self._refused(exc, manifest, bundle_sha, source)
        installed = [k for k in manifest.kinds if k in plans]
        reason = f"installed {','.join(installed)} v{manifest.version} for {manifest.target.label}"
        if missing:
            reason += f" (not sampled here, scored without: {', '.join(missing)})"
        log.info("model bundle accepted from %s: %s", source or "?", reason)
        event = self._event("accept", reason, manifest.version, manifest.target.as_dict(), installed,
                            source=source, bundle_sha256=bundle_sha, key_id=manifest.key_id,
                            **({"missing_features": missing} if missing else {}),
                            previous={k: (plans[k] or {}).get("version") for k in installed})
        self._record_offer(source, bundle_sha, True, reason)
        return Decision(True, reason, tuple(installed), manifest.version, manifest.target.as_dict(), event,
                        health=health)

    def _refused(self, exc: BundleError, manifest: Manifest | None, bundle_sha: str, source: str) -> Decision:
        reason = exc.reason
        prev = self.conn.execute("SELECT bundle_sha256, accepted, reason FROM model_offers WHERE source=?",
                                 (source,)).fetchone()
        # the same bytes from the same source were already reported (accepted, or refused for the same
        # reason): a retained message redelivered on every reconnect must not flood the fleet with events
        repeat = prev is not None and prev[0] == bundle_sha and (bool(prev[1]) or prev[2] == reason)
        # the installed model's own bundle (its retained message after a restart or after a replay
        # was refused) changes nothing: not worth an event
        repeat = repeat or reason.startswith("already installed")
        (log.debug if repeat else log.warning)("model bundle refused from %s: %s", source or "?", reason)
        kinds = list(manifest.kinds) if manifest else []
        version = manifest.version if manifest else None
        target = manifest.target.as_dict() if manifest else None
        event = self._event("reject", reason, version, target, kinds, stage=exc.stage, source=source,
                            bundle_sha256=bundle_sha)
        self._record_offer(source, bundle_sha, False, reason)
        return Decision(False, reason, tuple(kinds), version, target, event, stage=exc.stage, repeat=repeat)

    def _record_offer(self, source: str, bundle_sha: str, accepted: bool, reason: str) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO model_offers (source, bundle_sha256, accepted, reason, ts_s) VALUES (?,?,?,?,?) "
                         "ON CONFLICT(source) DO UPDATE SET bundle_sha256=excluded.bundle_sha256, "
                         "accepted=excluded.accepted, reason=excluded.reason, ts_s=excluded.ts_s",
                         (source, bundle_sha, int(accepted), reason, self._now()))

    def _plan(self, vb: VerifiedBundle) -> dict[str, dict | None]:
        """{kind to install: current pointer or None}; refuses stale, replayed or out-ranked bundles."""
        m = vb.manifest
        rank = self._rank(m.target)
        if rank is None:
            raise BundleError(f"target {m.target.label} does not include this device "
                              f"({self.device_id}, groups {list(self.groups)})", "target")
        plans: dict[str, dict | None] = {}
        already = []
        for kind in m.kinds:
            why = self._rejected_reason(kind, m.target, m.version)
            if why is not None:
                raise BundleError(f"{kind} v{m.version} for {m.target.label} was rolled back: {why}", "version")
            ptr = self._pointer(kind)
            if (ptr is not None and ptr["target"] == m.target.as_dict() and int(ptr["version"]) == m.version
                    and ptr.get("manifest_sha256") == vb.manifest_sha256):
                already.append(kind)
                continue
            hw = self._highwater(kind, m.target)
            if hw is not None and m.version == hw:
                raise BundleError(f"same version: {kind} v{m.version} for {m.target.label} was already accepted",
                                  "version")
            if hw is not None and m.version < hw:
                raise BundleError(f"downgrade: {kind} v{m.version} < v{hw} already accepted for {m.target.label}",
                                  "version")
            if ptr is not None:
                cur_rank = self._rank(ptr["target"])
                if cur_rank is not None and cur_rank < rank:
                    cur = check_target(ptr["target"], allow_local=True)
                    raise BundleError(f"superseded: the installed {kind} model v{ptr['version']} for {cur.label} "
                                      f"takes precedence over {m.target.label}", "precedence")
            plans[kind] = ptr
        if not plans:
            raise BundleError(f"already installed: {','.join(already)} v{m.version} for {m.target.label}", "version")
        return plans

    def _check_features(self, manifest: Manifest, files: Mapping[str, bytes]) -> list[str]:
        """The features the model will do without here (models.bundle.missing_features decides)."""
        available = self.available_metrics()
        if available is None:
            return []
        forest_meta = None
        if "forest" in manifest.kinds and f"forest/{META_FILE}" in files:
            try:
                forest_meta = json.loads(files[f"forest/{META_FILE}"])
            except ValueError:
                forest_meta = None  # the loader refuses it with a clearer reason
        # the accept line (and the model event's reason) names what is missing: one info line
        return missing_features(manifest.kinds, manifest.feature_names, set(available), forest_meta)

    # -- installing -----------------------------------------------------------------------
    def _extract(self, vb: VerifiedBundle, kind: str) -> Path:
        kdir = self.root / kind
        kdir.mkdir(parents=True, exist_ok=True)
        tmp = kdir / f"tmp-{uuid.uuid4().hex}"
        tmp.mkdir(mode=0o755)
        try:
            for a in vb.manifest.artefacts_of(kind):
                _write_file(tmp / a.name, vb.files[a.path])
            _write_file(tmp / INSTALLED_MANIFEST, vb.manifest_bytes)
            if vb.signature:   # a local model is not signed
                _write_file(tmp / INSTALLED_SIGNATURE, vb.signature)
            _fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def _install(self, vb: VerifiedBundle, plans: Mapping[str, dict | None], source: str) -> dict[str, HealthMonitor]:
        m = vb.manifest
        dirname = f"v{m.version}-{m.target.slug}"
        tmps: dict[str, Path] = {}
        try:
            for kind in plans:
                tmps[kind] = self._extract(vb, kind)
                loader = self.loaders.get(kind)
                if loader is not None:
                    try:
                        loader(tmps[kind])
                    except Exception as exc:  # noqa: BLE001 - any failure of foreign loader code refuses
                        detail = str(exc).replace(str(tmps[kind]) + os.sep, "").replace(str(tmps[kind]), kind)
                        raise BundleError(f"invalid {kind} model: {type(exc).__name__}: {detail}",
                                          "validate") from None
            for kind, tmp in tmps.items():
                final = self.root / kind / dirname
                ptr = plans[kind]
                if ptr is not None and dirname in (ptr["dir"], (ptr.get("previous") or {}).get("dir")):
                    raise BundleError(f"{kind}/{dirname} is in use", "install")
                if final.exists():  # left by an interrupted install; not referenced by the pointer
                    shutil.rmtree(final)
                os.rename(tmp, final)
                _fsync_dir(final.parent)
        except OSError as exc:
            raise BundleError(f"install failed: {exc.strerror or exc}", "install") from None
        finally:
            for tmp in tmps.values():
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._switch_in(vb, plans, dirname, source)
        except OSError as exc:  # disk full or read-only while writing a pointer
            raise BundleError(f"install failed: {exc.strerror or exc}", "install") from None
        monitors: dict[str, HealthMonitor] = {}
        for kind in plans:
            self._prune(kind)
            monitors[kind] = self._monitor_for(kind, self._pointer(kind) or {}, None)
        return monitors

    def _switch_in(self, vb: VerifiedBundle, plans: Mapping[str, dict | None], dirname: str, source: str) -> None:
        m = vb.manifest
        now = self._now()
        for kind, ptr in plans.items():
            previous = None
            if ptr is not None:
                previous = {k: v for k, v in ptr.items() if k != "previous"}
            entry = {
                "kind": kind, "version": m.version, "dir": dirname, "target": m.target.as_dict(),
                "manifest_sha256": vb.manifest_sha256, "bundle_sha256": vb.bundle_sha256, "key_id": m.key_id,
                "feature_names": list(m.feature_names), "interval_s": m.interval_s,
                "installed_at_s": now, "source": source, "state": "trial", "anomaly_rate": None,
                "previous": previous,
            }
            _write_json_atomic(self.root / kind / POINTER, entry)
        with self._tx() as conn:
            for kind in plans:
                self._raise_highwater(conn, kind, m.target, m.version)

    # -- health, confirm, rollback --------------------------------------------------------
    def _monitor_for(self, kind: str, ptr: Mapping[str, Any], baseline: float | None) -> HealthMonitor:
        if baseline is None:
            baseline = (ptr.get("previous") or {}).get("anomaly_rate")
        return HealthMonitor(self, kind, int(ptr["version"]), dict(ptr["target"]),
                             HealthCheck(self.params.health, baseline))

    def health_monitor(self, kind: str, baseline_anomaly_rate: float | None = None) -> HealthMonitor | None:
        """A monitor for a model still on trial (after a restart, or installed by the CLI)."""
        ptr = self._pointer(kind)
        if ptr is None or ptr.get("state") != "trial":
            return None
        return self._monitor_for(kind, ptr, baseline_anomaly_rate)

    def _is_current(self, mon: HealthMonitor) -> dict | None:
        ptr = self._pointer(mon.kind)
        if ptr is None or int(ptr["version"]) != mon.version or ptr["target"] != mon.target:
            return None
        return ptr

    def _confirm(self, mon: HealthMonitor) -> dict | None:
        with self._lock():
            ptr = self._is_current(mon)
            if ptr is None:
                return None  # replaced meanwhile: the verdict is about a model no longer in use
            ptr = {**ptr, "state": "confirmed", "anomaly_rate": mon.check.anomaly_rate,
                   "confirmed_at_s": self._now()}
            _write_json_atomic(self.root / mon.kind / POINTER, ptr)
        reason = (f"health check passed after {mon.check.samples} samples "
                  f"(anomaly rate {mon.check.anomaly_rate:.3f})")
        log.info("%s v%d: %s", mon.kind, mon.version, reason)
        return self._event("confirm", reason, mon.version, mon.target, [mon.kind])

    def _health_failed(self, mon: HealthMonitor) -> dict | None:
        if self._is_current(mon) is None:
            return None
        return self.rollback(mon.kind, f"health check failed: {mon.check.reason}")

    def _mark_rejected(self, kind: str, target: Target, version: int, reason: str) -> None:
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO model_rejected (kind, target_type, target_id, version, reason, ts_s) "
                         "VALUES (?,?,?,?,?,?)", (kind, target.type, target.id, version, reason, self._now()))
            self._raise_highwater(conn, kind, target, version)

    def _switch_back(self, kind: str, ptr: Mapping[str, Any]) -> int | None:
        """Point ``kind`` at its previous version (if intact) or at nothing; returns the version restored."""
        path = self.root / kind / POINTER
        prev = ptr.get("previous")
        if prev and not verify_installed(self.state_dir, kind, prev):
            _write_json_atomic(path, {**prev, "previous": None})
            restored = int(prev["version"])
        else:
            if prev:
                log.error("previous %s v%s is damaged too; no %s model installed", kind, prev.get("version"), kind)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            _fsync_dir(path.parent)
            restored = None
        self._prune(kind)
        return restored

    def rollback(self, kind: str, reason: str = "manual rollback") -> dict:
        """Restore the previous version (or none) and refuse the current one from now on."""
        with self._lock():
            ptr = self._pointer(kind)
            if ptr is None:
                raise UpdateError(f"no {kind} model installed")
            target = check_target(ptr["target"], allow_local=True)
            version = int(ptr["version"])
            self._mark_rejected(kind, target, version, reason)   # first: a crash here is completed at start-up
            restored = self._switch_back(kind, ptr)
        log.warning("%s v%d rolled back (%s); now %s", kind, version, reason,
                    f"v{restored}" if restored is not None else "no model")
        return self._event("rollback", reason, version, target.as_dict(), [kind], restored_version=restored)

    # -- listing --------------------------------------------------------------------------
    def kinds(self) -> list[str]:
        return [p.name for p in self._kind_dirs() if (p / POINTER).exists()]

    def list_models(self) -> list[dict[str, Any]]:
        return list_installed(self.state_dir)

    def show(self, kind: str) -> dict[str, Any]:
        ptr = self._pointer(kind)
        rejected = [dict(zip(("target_type", "target_id", "version", "reason", "ts_s"), r)) for r in self.conn.execute(
            "SELECT target_type, target_id, version, reason, ts_s FROM model_rejected WHERE kind=? ORDER BY ts_s",
            (kind,))]
        highwater = [dict(zip(("target_type", "target_id", "version"), r)) for r in self.conn.execute(
            "SELECT target_type, target_id, version FROM model_versions WHERE kind=? ORDER BY target_type, target_id",
            (kind,))]
        if ptr is None and not rejected and not highwater:
            raise UpdateError(f"no {kind} model installed")
        doc: dict[str, Any] = {"kind": kind, "current": ptr, "accepted_versions": highwater, "rejected": rejected}
        if ptr is not None:
            doc["integrity"] = verify_installed(self.state_dir, kind, ptr) or "ok"
            with contextlib.suppress(OSError, ValueError):
                doc["manifest"] = json.loads((self.root / kind / ptr["dir"] / INSTALLED_MANIFEST).read_bytes())
        return doc
