"""Device side of model updates: real ed25519 keys, real tar bundles, real SQLite, a real forest.

Every refusal is checked for its reason and for leaving the installed model
untouched; the crash test kills a real installing process with SIGKILL at random
moments and checks that the pointer always names a complete, hash-matching model.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from agent.updates import (
    HealthCheck, HealthParams, ModelUpdater, UpdaterParams, current_model_dir, read_pointer, verify_installed,
)
from fleet.keys import generate, load_signing_key
from models.bundle import BundleLimits, Target, build_bundle, canonical_json, pack, sha256_hex, sign
from models.forest import load_forest_model
from tests.fakes import FakeClock

REPO = Path(__file__).resolve().parents[1]
DEVICE = "pi-01"
GROUPS = ("lab", "eu")
FEATURES = ["system.cpuUsage", "system.memoryPercent", "system.load1"]
SAMPLED = set(FEATURES) | {"system.diskPercent", "network.bytesReceivedPerSec"}
TOPIC = "devices/pi-01/models"


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def forest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Isolation Forest trained with scikit-learn (small), exported to the compact format."""
    from models.training.forest import ForestParams, train_forest_from_matrix

    rng = np.random.default_rng(7)
    X = np.column_stack([rng.normal(20, 3, 600), rng.normal(40, 2, 600), rng.normal(0.5, 0.1, 600)])
    out = tmp_path_factory.mktemp("forest") / "model"
    train_forest_from_matrix(X, FEATURES, ForestParams(n_estimators=15, min_samples=50), out, version=1)
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("keys")
    _, trusted_pub, _ = generate(d, "fleet")
    _, other_pub, _ = generate(d, "stranger")
    return {"trusted": load_signing_key(d / "fleet.key").private_key, "trusted_pub": trusted_pub,
            "stranger": load_signing_key(d / "stranger.key").private_key}


def forest_files(forest_dir: Path, version: int, **meta_changes: object) -> dict[str, bytes]:
    meta = json.loads((forest_dir / "model.json").read_text())
    meta.update(version=version, **meta_changes)
    return {"forest/forest.npz": (forest_dir / "forest.npz").read_bytes(),
            "forest/model.json": json.dumps(meta).encode()}


class Env:
    """One device: state dir, database file, clock; ``updater()`` opens it like a (re)started agent."""

    def __init__(self, tmp: Path, keys: dict, forest_dir: Path) -> None:
        self.state = tmp / "state"
        self.db = tmp / "agent.db"
        self.keys = keys
        self.forest_dir = forest_dir
        self.clock = FakeClock()
        self.conns: list[sqlite3.Connection] = []

    def updater(self, params: UpdaterParams = UpdaterParams(), available: object = SAMPLED) -> ModelUpdater:
        conn = sqlite3.connect(self.db, isolation_level=None)
        self.conns.append(conn)
        return ModelUpdater(self.state, conn, [self.keys["trusted_pub"]], DEVICE, GROUPS,
                            available_metrics=available, params=params, clock=self.clock,
                            loaders={"forest": load_forest_model})

    def bundle(self, version: int, target: str = "device:pi-01", key: str = "trusted", features=FEATURES,
               expires_in_s: float | None = None, files: dict[str, bytes] | None = None, **meta: object) -> bytes:
        kind, _, ident = target.partition(":")
        return build_bundle(private_key=self.keys[key], files=files or forest_files(self.forest_dir, version, **meta),
                            version=version, target=Target(kind, ident or "all"), feature_names=features,
                            interval_s=1.0, created_at_s=self.clock.time() - 60,
                            expires_at_s=None if expires_in_s is None else self.clock.time() + expires_in_s)

    def close(self) -> None:
        for c in self.conns:
            c.close()


@pytest.fixture
def env(tmp_path: Path, keys: dict, forest_dir: Path):
    e = Env(tmp_path, keys, forest_dir)
    yield e
    e.close()


def members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return [(m, tf.extractfile(m).read()) for m in tf.getmembers()]


def retar(items: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for info, blob in items:
            info = tarfile.TarInfo(info.name) if isinstance(info, str) else info
            info.size = len(blob) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(blob) if info.isreg() else None)
    return buf.getvalue()


def signed_manifest(env: Env, files: dict[str, bytes], version: int = 2, listed: dict[str, bytes] | None = None,
                    **over: object) -> tuple[bytes, bytes]:
    """A manifest listing ``listed`` (default ``files``), signed by the trusted key, built by hand."""
    from models.bundle import key_id_of
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pub = env.keys["trusted"].public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    listed = files if listed is None else listed
    doc = {"format_version": 1, "kinds": sorted({p.split("/")[0] for p in listed}), "version": version,
           "target": {"type": "device", "id": DEVICE}, "feature_names": FEATURES, "interval_s": 1.0,
           "created_at": "2023-11-14T00:00:00Z", "key_id": key_id_of(pub),
           "artefacts": [{"path": p, "kind": p.split("/")[0], "sha256": sha256_hex(b), "size_bytes": len(b)}
                         for p, b in sorted(listed.items())]}
    doc.update(over)
    mbytes = canonical_json(doc)
    return mbytes, sign(mbytes, env.keys["trusted"])


def assert_unchanged(u: ModelUpdater, version: int) -> None:
    [m] = u.list_models()
    assert (m["kind"], m["version"]) == ("forest", version)
    ptr = read_pointer(u.state_dir, "forest")
    assert verify_installed(u.state_dir, "forest", ptr) == []


def assert_rejected(d, *words: str) -> None:
    assert not d.accepted, d
    for w in words:
        assert w in d.reason, (w, d.reason)
    assert d.event["kind"] == "model" and d.event["action"] == "reject" and d.event["reason"] == d.reason


# -- acceptance -------------------------------------------------------------------------
def test_good_bundle_is_installed_atomically_and_loads(env: Env) -> None:
    u = env.updater()
    data = env.bundle(1)
    d = u.offer(data, TOPIC)
    assert d.accepted and d.kinds == ("forest",) and d.version == 1
    assert d.target == {"type": "device", "id": DEVICE}
    ev = d.event
    assert (ev["kind"], ev["action"], ev["version"], ev["target"]) == ("model", "accept", 1, d.target)
    assert ev["bundle_sha256"] == sha256_hex(data) and ev["source"] == TOPIC
    model_dir = current_model_dir(env.state, "forest")
    assert model_dir == env.state / "models" / "forest" / "v1-device-pi-01"
    model = load_forest_model(model_dir)
    assert model.feature_names == tuple(FEATURES)
    assert math.isfinite(model.forest.score_one(np.array([20.0, 40.0, 0.5])))
    ptr = read_pointer(env.state, "forest")
    assert ptr["state"] == "trial" and ptr["previous"] is None
    assert verify_installed(env.state, "forest", ptr) == []
    assert sorted(p.name for p in (env.state / "models" / "forest").iterdir()) == ["current.json", "v1-device-pi-01"]
    assert set(d.health) == {"forest"}
    assert [m["version"] for m in u.list_models()] == [1]

    d2 = u.offer(env.bundle(2), TOPIC)
    assert d2.accepted and d2.event["previous"] == {"forest": 1}
    ptr = read_pointer(env.state, "forest")
    assert ptr["version"] == 2 and ptr["previous"]["version"] == 1
    assert (env.state / "models" / "forest" / "v1-device-pi-01").is_dir()  # kept for rollback

    d3 = u.offer(env.bundle(3), TOPIC)
    assert d3.accepted
    kept = sorted(p.name for p in (env.state / "models" / "forest").iterdir())
    assert kept == ["current.json", "v2-device-pi-01", "v3-device-pi-01"]


def test_multi_kind_bundle_installs_each_kind(env: Env) -> None:
    u = env.updater()
    meta = {"kind": "lstm", "version": 1, "inputs": ["system.cpuUsage", "time:tod_sin"], "targets": ["system.cpuUsage"]}
    tflite = b"\x1c\x00\x00\x00TFL3" + bytes(200)
    files = {**forest_files(env.forest_dir, 1), "lstm/forecaster.tflite": tflite,
             "lstm/model.json": json.dumps(meta).encode()}
    d = u.offer(env.bundle(1, files=files, features=FEATURES + ["time:tod_sin"]), TOPIC)
    assert d.accepted and d.kinds == ("forest", "lstm")
    assert (current_model_dir(env.state, "lstm") / "forecaster.tflite").read_bytes() == tflite
    assert sorted(m["kind"] for m in u.list_models()) == ["forest", "lstm"]


# -- refusals (each leaves v1 installed) ------------------------------------------------
@pytest.fixture
def installed(env: Env) -> ModelUpdater:
    u = env.updater()
    assert u.offer(env.bundle(1), TOPIC).accepted
    return u


def test_bad_signature(env: Env, installed: ModelUpdater) -> None:
    items = members(env.bundle(2))
    items = [(i, bytes([b[0] ^ 1]) + b[1:]) if i.name == "manifest.sig" else (i, b) for i, b in items]
    assert_rejected(installed.offer(retar(items), TOPIC), "bad signature")
    # a manifest changed after signing (version bumped) fails the same way
    items = members(env.bundle(2))
    items = [(i, b.replace(b'"version":2', b'"version":9')) if i.name == "manifest.json" else (i, b)
             for i, b in items]
    d = installed.offer(retar(items), TOPIC)
    assert_rejected(d, "bad signature")
    assert d.stage == "signature" and d.version is None  # nothing unverified is echoed back
    assert_unchanged(installed, 1)


def test_unknown_key(env: Env, installed: ModelUpdater) -> None:
    assert_rejected(installed.offer(env.bundle(2, key="stranger"), TOPIC), "unknown key")
    assert_unchanged(installed, 1)


def test_tampered_artefact(env: Env, installed: ModelUpdater) -> None:
    items = members(env.bundle(2))
    items = [(i, b[:-1] + bytes([b[-1] ^ 0xFF])) if i.name == "forest/forest.npz" else (i, b) for i, b in items]
    assert_rejected(installed.offer(retar(items), TOPIC), "forest/forest.npz", "sha256 mismatch")
    assert_unchanged(installed, 1)


def test_downgrade_and_same_version(env: Env, installed: ModelUpdater) -> None:
    assert installed.offer(env.bundle(3), TOPIC).accepted
    assert_rejected(installed.offer(env.bundle(2), TOPIC), "downgrade", "v2 < v3")
    # same number, different content (re-signed): refused, not installed
    d = installed.offer(env.bundle(3, thresholds_note="other"), TOPIC)
    assert_rejected(d, "same version")
    # the very bundle already installed (ed25519 is deterministic: same bytes): refused as such
    ptr = read_pointer(env.state, "forest")
    assert_rejected(installed.offer(env.bundle(3), TOPIC), "already installed")
    assert read_pointer(env.state, "forest")["manifest_sha256"] == ptr["manifest_sha256"]


def _bytes_of_current(env: Env) -> bytes:
    """Re-pack the installed version from its stored manifest + signature (what the retained message holds)."""
    d = current_model_dir(env.state, "forest")
    manifest = json.loads((d / "bundle.manifest.json").read_bytes())
    files = {a["path"]: (d / a["path"].split("/")[1]).read_bytes() for a in manifest["artefacts"]}
    return pack((d / "bundle.manifest.json").read_bytes(), (d / "bundle.manifest.sig").read_bytes(), files)


def test_replay_after_restart_is_ignored(env: Env, installed: ModelUpdater) -> None:
    old = env.bundle(2)
    assert installed.offer(old, TOPIC).accepted
    assert installed.offer(env.bundle(3), TOPIC).accepted
    env.close()
    restarted = env.updater()  # new instance, same database file and state dir
    assert_rejected(restarted.offer(old, TOPIC), "downgrade")
    assert_rejected(restarted.offer(_bytes_of_current(env), TOPIC), "already installed")
    assert_unchanged(restarted, 3)


def test_wrong_features(env: Env, installed: ModelUpdater) -> None:
    # a forest without training medians cannot stand in for a metric this device lacks
    d = installed.offer(env.bundle(2, features=FEATURES + ["system.temperature|mean10"], baseline=None), TOPIC)
    assert_rejected(d, "features not sampled", "system.temperature", "no training medians")
    assert d.stage == "features"
    assert_unchanged(installed, 1)


def test_expired(env: Env, installed: ModelUpdater) -> None:
    data = env.bundle(2, expires_in_s=3600)
    env.clock.advance(3601)
    d = installed.offer(data, TOPIC)
    assert_rejected(d, "expired")
    assert_unchanged(installed, 1)


def test_oversized(env: Env) -> None:
    u = env.updater(UpdaterParams(limits=BundleLimits(max_bundle_bytes=4096)))
    data = env.bundle(1)
    assert len(data) > 4096
    d = u.offer(data, TOPIC)
    assert_rejected(d, "too large", str(len(data)))
    assert d.stage == "size" and u.list_models() == []
    path = env.state.parent / "big.tar"
    path.write_bytes(data)
    assert_rejected(u.install_file(path), "too large")


@pytest.mark.parametrize("name,words", [("../x.json", ("unsafe member path", "..")),
                                        ("forest/../../x.json", ("unsafe member path",)),
                                        ("/etc/x.json", ("absolute",))])
def test_path_traversal_names(env: Env, installed: ModelUpdater, name: str, words: tuple[str, ...]) -> None:
    files = forest_files(env.forest_dir, 2)
    mbytes, sig = signed_manifest(env, files)
    items = [(tarfile.TarInfo("manifest.json"), mbytes), (tarfile.TarInfo("manifest.sig"), sig),
             *[(tarfile.TarInfo(p), b) for p, b in files.items()], (tarfile.TarInfo(name), b"{}")]
    assert_rejected(installed.offer(retar(items), TOPIC), *words)
    assert not (env.state / "x.json").exists() and not Path("/etc/x.json").exists()
    assert_unchanged(installed, 1)


@pytest.mark.parametrize("link_type,words", [(tarfile.SYMTYPE, "symlink"), (tarfile.LNKTYPE, "hardlink"),
                                             (tarfile.CHRTYPE, "not a regular file")])
def test_link_and_device_members(env: Env, installed: ModelUpdater, link_type: bytes, words: str) -> None:
    files = forest_files(env.forest_dir, 2)
    mbytes, sig = signed_manifest(env, files)
    link = tarfile.TarInfo("forest/evil.json")
    link.type = link_type
    link.linkname = "/etc/passwd"
    items = [(tarfile.TarInfo("manifest.json"), mbytes), (tarfile.TarInfo("manifest.sig"), sig),
             *[(tarfile.TarInfo(p), b) for p, b in files.items()], (link, b"")]
    assert_rejected(installed.offer(retar(items), TOPIC), words)
    assert_unchanged(installed, 1)


def test_pickle_member_refused(env: Env, installed: ModelUpdater) -> None:
    import pickle

    payload = pickle.dumps({"x": 1})
    files = {**forest_files(env.forest_dir, 2), "forest/model.pkl": payload}
    mbytes, sig = signed_manifest(env, files)       # even listed and validly signed
    items = [(tarfile.TarInfo("manifest.json"), mbytes), (tarfile.TarInfo("manifest.sig"), sig),
             *[(tarfile.TarInfo(p), b) for p, b in files.items()]]
    assert_rejected(installed.offer(retar(items), TOPIC), "pickle", "forest/model.pkl")
    # a pickle hidden under an allowed name is caught by content
    files = {**forest_files(env.forest_dir, 2), "forest/extra.json": payload}
    mbytes, sig = signed_manifest(env, files)
    items = [(tarfile.TarInfo("manifest.json"), mbytes), (tarfile.TarInfo("manifest.sig"), sig),
             *[(tarfile.TarInfo(p), b) for p, b in files.items()]]
    assert_rejected(installed.offer(retar(items), TOPIC), "pickle")
    assert_unchanged(installed, 1)


def test_npz_with_object_array_refused(env: Env, installed: ModelUpdater) -> None:
    buf = io.BytesIO()
    np.savez(buf, ok=np.arange(3.0), evil=np.array([{"a": 1}, None], dtype=object))
    files = {**forest_files(env.forest_dir, 2), "forest/forest.npz": buf.getvalue()}
    mbytes, sig = signed_manifest(env, files)
    items = [(tarfile.TarInfo("manifest.json"), mbytes), (tarfile.TarInfo("manifest.sig"), sig),
             *[(tarfile.TarInfo(p), b) for p, b in files.items()]]
    d = installed.offer(retar(items), TOPIC)
    assert_rejected(d, "forest/forest.npz", "object", "pickle")
    assert d.stage == "content"
    assert_unchanged(installed, 1)


def test_member_not_in_manifest(env: Env, installed: ModelUpdater) -> None:
    files = forest_files(env.forest_dir, 2)
    mbytes, sig = signed_manifest(env, files)
    items = [(tarfile.TarInfo("manifest.json"), mbytes), (tarfile.TarInfo("manifest.sig"), sig),
             *[(tarfile.TarInfo(p), b) for p, b in files.items()], (tarfile.TarInfo("forest/extra.json"), b"{}")]
    assert_rejected(installed.offer(retar(items), TOPIC), "forest/extra.json", "not listed in the manifest")
    assert_unchanged(installed, 1)


def test_invalid_model_refused_by_loader_before_switch(env: Env, installed: ModelUpdater) -> None:
    d = installed.offer(env.bundle(2, feature_names=["only_one"]), TOPIC)  # model.json inconsistent with the forest
    assert_rejected(d, "invalid forest model")
    assert d.stage == "validate"
    assert_unchanged(installed, 1)
    assert sorted(p.name for p in (env.state / "models" / "forest").iterdir()) == ["current.json", "v1-device-pi-01"]


def test_target_of_another_device_or_group(env: Env, installed: ModelUpdater) -> None:
    assert_rejected(installed.offer(env.bundle(5, target="device:pi-99"), TOPIC), "does not include this device")
    assert_rejected(installed.offer(env.bundle(5, target="group:factory"), TOPIC), "does not include this device")
    assert_unchanged(installed, 1)


def test_repeated_refusal_is_flagged_for_the_publisher(env: Env, installed: ModelUpdater) -> None:
    stale = env.bundle(1, target="group:lab", key="stranger")
    first = installed.offer(stale, "fleet/lab/models")
    again = installed.offer(stale, "fleet/lab/models")
    assert not first.repeat and again.repeat and again.reason == first.reason
    env.close()
    restarted = env.updater()
    assert restarted.offer(stale, "fleet/lab/models").repeat     # remembered across restarts
    # the retained message of the installed model, redelivered on reconnect: refused quietly
    d = restarted.offer(env.bundle(1), TOPIC)
    assert not d.accepted and "already installed" in d.reason and d.repeat
    fresh = restarted.offer(env.bundle(2), TOPIC)
    assert fresh.accepted and not fresh.repeat


# -- precedence -------------------------------------------------------------------------
def test_precedence_device_over_group_over_fleet(env: Env) -> None:
    u = env.updater()
    assert u.offer(env.bundle(50, target="fleet"), "fleet/all/models").accepted
    assert u.offer(env.bundle(1, target="group:eu"), "fleet/eu/models").accepted      # group beats fleet v50
    assert u.offer(env.bundle(1, target="group:lab"), "fleet/lab/models").accepted    # 'lab' is listed first
    d = u.offer(env.bundle(2, target="group:eu"), "fleet/eu/models")
    assert_rejected(d, "superseded", "group:lab")
    d = u.offer(env.bundle(51, target="fleet"), "fleet/all/models")
    assert_rejected(d, "superseded")
    assert d.stage == "precedence"
    assert u.offer(env.bundle(1, target="device:pi-01"), TOPIC).accepted              # device beats all
    assert_rejected(u.offer(env.bundle(2, target="group:lab"), "fleet/lab/models"), "superseded", "device:pi-01")
    assert_rejected(u.offer(env.bundle(99, target="fleet"), "fleet/all/models"), "superseded", "device:pi-01")
    ptr = read_pointer(env.state, "forest")
    assert (ptr["target"], ptr["version"]) == ({"type": "device", "id": DEVICE}, 1)
    assert ptr["previous"]["target"] == {"type": "group", "id": "lab"}
    # rolling the device model back restores the group model it replaced
    ev = u.rollback("forest", "operator")
    assert ev["restored_version"] == 1 and read_pointer(env.state, "forest")["target"]["type"] == "group"
    # versions are per target: a device v1 is a downgrade of nothing but its own history
    assert_rejected(u.offer(env.bundle(1, target="device:pi-01"), TOPIC), "rolled back", "operator")
    assert u.offer(env.bundle(2, target="device:pi-01"), TOPIC).accepted


# -- health check and rollback ----------------------------------------------------------
def run_health(env: Env, monitor, n: int, rng: np.random.Generator) -> dict | None:
    """Score fresh normal samples with the currently installed model, as the daemon would."""
    model = load_forest_model(current_model_dir(env.state, "forest"))
    for _ in range(n):
        x = np.array([rng.normal(20, 3), rng.normal(40, 2), rng.normal(0.5, 0.1)])
        t0 = time.perf_counter()
        score = model.forest.score_one(x)
        dt = time.perf_counter() - t0
        ev = monitor.observe(math.isfinite(score), score >= model.thresholds["warning"], dt)
        if ev is not None:
            return ev
    return None


def test_health_check_failure_rolls_back_and_rejects(env: Env) -> None:
    params = UpdaterParams(health=HealthParams(samples=200, anomaly_rate_factor=3.0, anomaly_rate_floor=0.05,
                                               inference_budget_s=0.05))
    u = env.updater(params)
    rng = np.random.default_rng(1)
    good = u.offer(env.bundle(1), TOPIC)
    ev = run_health(env, good.health["forest"], 200, rng)
    assert ev is not None and ev["action"] == "confirm" and ev["version"] == 1
    ptr = read_pointer(env.state, "forest")
    assert ptr["state"] == "confirmed" and ptr["anomaly_rate"] < 0.05

    meta = json.loads((env.forest_dir / "model.json").read_text())
    flags_all = dict(meta["thresholds"], warning=0.0)          # every score >= 0: flags everything
    bad_bytes = env.bundle(2, thresholds=flags_all)
    bad = u.offer(bad_bytes, TOPIC)
    assert bad.accepted and read_pointer(env.state, "forest")["version"] == 2
    ev = run_health(env, bad.health["forest"], 200, rng)
    assert ev is not None and ev["action"] == "rollback" and ev["kind"] == "model"
    assert ev["version"] == 2 and ev["restored_version"] == 1 and "anomaly rate" in ev["reason"]
    assert bad.health["forest"].check.samples < 200                  # decided early
    ptr = read_pointer(env.state, "forest")
    assert (ptr["version"], ptr["state"]) == (1, "confirmed")
    assert load_forest_model(current_model_dir(env.state, "forest")).version == 1
    # the retained message comes back (reconnect, restart): not re-accepted
    env.close()
    restarted = env.updater(params)
    d = restarted.offer(bad_bytes, TOPIC)
    assert_rejected(d, "rolled back", "health check failed")
    assert restarted.show("forest")["rejected"][0]["version"] == 2
    assert_unchanged(restarted, 1)


def test_health_check_state_machine() -> None:
    p = HealthParams(samples=10, anomaly_rate_factor=2.0, anomaly_rate_floor=0.1, inference_budget_s=0.01)
    nan = HealthCheck(p, 0.0)
    assert nan.observe(True, False, 0.001) == "running"
    assert nan.observe(False, False, 0.001) == "failed" and "non-finite" in nan.reason
    ok = HealthCheck(p, 0.3)                                  # allowed rate = max(2 x 0.3, 0.1) = 0.6
    states = [ok.observe(True, i % 2 == 0, 0.001) for i in range(10)]
    assert states[-1] == "passed" and set(states[:-1]) == {"running"} and ok.anomaly_rate == 0.5
    slow = HealthCheck(p, None)
    states = [slow.observe(True, False, 0.02) for _ in range(6)]
    assert states[-1] == "failed" and "budget" in slow.reason
    pause = HealthCheck(p, None)                              # one long GC pause is not a failure
    assert [pause.observe(True, False, 0.5 if i == 3 else 0.001) for i in range(10)][-1] == "passed"


def test_restart_during_trial_resumes_health_check_and_manual_rollback(env: Env) -> None:
    u = env.updater()
    assert u.offer(env.bundle(1), TOPIC).accepted
    assert u.offer(env.bundle(2), TOPIC).accepted
    env.close()
    u2 = env.updater()
    mon = u2.health_monitor("forest")
    assert mon is not None and mon.version == 2
    ev = u2.rollback("forest")
    assert ev["action"] == "rollback" and ev["restored_version"] == 1 and ev["reason"] == "manual rollback"
    ev = u2.rollback("forest")
    assert ev["restored_version"] is None and u2.list_models() == []      # no model: the agent falls back
    from agent.updates import UpdateError
    with pytest.raises(UpdateError, match="no forest model installed"):
        u2.rollback("forest")
    assert mon.observe(False, False, 0.0) is None                        # verdict on a replaced model: no-op


def test_damaged_install_falls_back_on_start(env: Env) -> None:
    u = env.updater()
    assert u.offer(env.bundle(1), TOPIC).accepted
    assert u.offer(env.bundle(2), TOPIC).accepted
    npz = current_model_dir(env.state, "forest") / "forest.npz"
    npz.write_bytes(npz.read_bytes()[:-10])                              # SD-card corruption
    env.close()
    u2 = env.updater()
    assert [m["version"] for m in u2.list_models()] == [1]
    assert u2.startup_events and u2.startup_events[0]["action"] == "rollback"


def test_install_file_for_the_cli(env: Env) -> None:
    u = env.updater()
    path = env.state.parent / "b.tar"
    path.write_bytes(env.bundle(4))
    d = u.install_file(path)
    assert d.accepted and d.event["source"] == f"file:{path.resolve()}"
    shown = u.show("forest")
    assert shown["integrity"] == "ok" and shown["manifest"]["version"] == 4
    assert shown["accepted_versions"] == [{"target_type": "device", "target_id": DEVICE, "version": 4}]


# -- models trained on the device (install_local) ---------------------------------------
LOCAL = {"type": "local", "id": DEVICE}


def test_install_local_versions_loader_and_restart(env: Env) -> None:
    u = env.updater()
    assert u.next_local_version("forest") == 1
    d = u.install_local("forest", env.forest_dir)
    assert d.accepted and d.version == 1 and d.target == LOCAL and d.kinds == ("forest",)
    assert u.next_local_version("forest") == 2
    assert d.event["action"] == "accept" and d.event["source"] == "local" and set(d.health) == {"forest"}
    ptr = read_pointer(env.state, "forest")
    assert (ptr["dir"], ptr["state"], ptr["source"], ptr["key_id"]) == ("v1-local-pi-01", "trial", "local", "")
    assert not (current_model_dir(env.state, "forest") / "bundle.manifest.sig").exists()   # nothing to sign
    d2 = u.install_local("forest", env.forest_dir)              # high-water + 1, model.json follows it
    assert d2.accepted and d2.version == 2 and d2.event["previous"] == {"forest": 1}
    assert load_forest_model(current_model_dir(env.state, "forest")).version == 2
    assert json.loads((env.forest_dir / "model.json").read_text())["version"] == 1   # the source is untouched
    assert_rejected(u.install_local("forest", env.forest_dir, version=2), "same version")
    assert_rejected(u.install_local("forest", env.forest_dir, version=1), "downgrade")
    env.close()
    restarted = env.updater()               # the local manifest passes the start-up integrity check
    assert restarted.startup_events == [] and restarted.show("forest")["integrity"] == "ok"
    assert restarted.install_local("forest", env.forest_dir).version == 3
    mon = restarted.health_monitor("forest")
    assert mon is not None and mon.target == LOCAL


def test_local_model_has_the_lowest_precedence(env: Env) -> None:
    u = env.updater()
    assert u.install_local("forest", env.forest_dir).accepted
    d = u.offer(env.bundle(1, target="fleet"), "fleet/all/models")          # any received bundle replaces it
    assert d.accepted and d.event["previous"] == {"forest": 1}
    ptr = read_pointer(env.state, "forest")
    assert ptr["target"]["type"] == "fleet" and ptr["previous"]["target"] == LOCAL
    d = u.install_local("forest", env.forest_dir)                        # ... and it never replaces one
    assert_rejected(d, "received forest model is installed", "v1 for fleet", "never replaces")
    assert d.stage == "precedence" and read_pointer(env.state, "forest")["target"]["type"] == "fleet"
    ev = u.rollback("forest", "operator")                                # the local model comes back
    assert ev["restored_version"] == 1 and read_pointer(env.state, "forest")["target"] == LOCAL
    assert u.install_local("forest", env.forest_dir).version == 2


def test_install_local_refusals(env: Env, tmp_path: Path) -> None:
    u = env.updater()

    def model_dir(name: str, **meta: object) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "forest.npz").write_bytes((env.forest_dir / "forest.npz").read_bytes())
        (d / "model.json").write_text(json.dumps({**json.loads((env.forest_dir / "model.json").read_text()), **meta}))
        return d

    pickled = model_dir("pickled")
    (pickled / "model.pkl").write_bytes(b"\x80\x04K\x01.")
    assert_rejected(u.install_local("forest", pickled), "pickle")
    linked = model_dir("linked")
    (linked / "extra.json").symlink_to("/etc/hostname")
    assert_rejected(u.install_local("forest", linked), "not a regular file")
    bare = model_dir("bare")
    (bare / "model.json").unlink()
    assert_rejected(u.install_local("forest", bare), "no model.json")
    assert_rejected(u.install_local("lstm", model_dir("other")), "kind 'forest' is not 'lstm'")
    d = u.install_local("forest", model_dir("broken", feature_names=["system.cpuUsage"]))   # loader refuses it
    assert_rejected(d, "invalid forest model")
    assert d.stage == "validate"
    d = u.install_local("forest", model_dir("unsampled", feature_names=FEATURES[:2] + ["system.temperature"],
                                            baseline=None))
    assert_rejected(d, "features not sampled", "system.temperature")
    assert u.list_models() == [] and sorted(p.name for p in (env.state / "models" / "forest").iterdir()) == []


def test_a_received_manifest_may_not_claim_the_local_target(env: Env, installed: ModelUpdater) -> None:
    files = forest_files(env.forest_dir, 2)
    mbytes, sig = signed_manifest(env, files, target=LOCAL)     # validly signed, but "local" is the device's own
    items = [(tarfile.TarInfo("manifest.json"), mbytes), (tarfile.TarInfo("manifest.sig"), sig),
             *[(tarfile.TarInfo(p), b) for p, b in files.items()]]
    assert_rejected(installed.offer(retar(items), TOPIC), "target type must be one of device, group, fleet")
    assert_unchanged(installed, 1)


def test_queued_events_survive_for_the_daemon(env: Env) -> None:
    u = env.updater()
    u.queue_event({"action": "rollback", "reason": "by the CLI", "message_id": "m1"})
    env.close()
    again = env.updater()
    [(row_id, event)] = again.queued_events()
    assert event == {"action": "rollback", "reason": "by the CLI", "message_id": "m1"}
    again.drop_queued_events([row_id])
    assert again.queued_events() == []


# -- crash safety -----------------------------------------------------------------------
CHILD = r"""
import json, sqlite3, sys
from pathlib import Path
import numpy as np
from agent.updates import ModelUpdater, read_pointer
from fleet.keys import load_signing_key
from models.bundle import Target, build_bundle
from models.forest import load_forest_model

state, db, pub, key, forest_dir = sys.argv[1:6]
conn = sqlite3.connect(db, isolation_level=None)
u = ModelUpdater(state, conn, [pub], "pi-01", ["lab"], loaders={"forest": load_forest_model})
ptr = read_pointer(state, "forest")
start = ptr["version"] if ptr else 0
sk = load_signing_key(key).private_key
meta = json.loads((Path(forest_dir) / "model.json").read_text())
npz = (Path(forest_dir) / "forest.npz").read_bytes()
rng = np.random.default_rng(start)
bundles = []
for v in range(start + 1, start + 13):
    import io
    buf = io.BytesIO()
    np.save(buf, rng.normal(size=96_000))          # ~750 kB of weights so the writes take real time
    files = {"forest/forest.npz": npz, "forest/model.json": json.dumps(dict(meta, version=v)).encode(),
             "forest/weights.npy": buf.getvalue()}
    bundles.append(build_bundle(private_key=sk, files=files, version=v, target=Target("device", "pi-01"),
                                feature_names=meta["feature_names"], interval_s=1.0, created_at_s=1.7e9))
print("ready", start, flush=True)
for data in bundles:
    d = u.offer(data, "devices/pi-01/models")
    assert d.accepted, d.reason
print("done", flush=True)
"""


def test_kill_9_during_install_leaves_old_or_new_model(env: Env) -> None:
    u = env.updater()
    assert u.offer(env.bundle(1), TOPIC).accepted
    env.close()
    key = Path(env.keys["trusted_pub"]).with_suffix(".key")
    rng = random.Random(1234)
    killed_mid_run = killed_mid_install = 0
    versions = [1]
    max_sleep_s = 0.25
    for attempt in range(40):
        if attempt >= 12 and killed_mid_run >= 8 and killed_mid_install >= 2:
            break
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(env.state), str(env.db),
                                 str(env.keys["trusted_pub"]), str(key), str(env.forest_dir)],
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert line.startswith("ready"), proc.stderr.read()
        assert int(line.split()[1]) == versions[-1]          # the pointer and its version survived
        time.sleep(rng.uniform(0.0, max_sleep_s))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL or "done" in out, err
        killed_mid_run += "done" not in out
        if "done" in out:           # a fast (or idle) machine finished all installs: aim earlier
            max_sleep_s /= 2
        kdir = env.state / "models" / "forest"
        ptr = read_pointer(env.state, "forest")
        referenced = {"current.json", ".lock", ptr["dir"], (ptr["previous"] or {}).get("dir")}
        killed_mid_install += bool({p.name for p in kdir.iterdir()} - referenced)  # tmp-*, unswitched v*
        # the pointer names a complete model whose files match the signed manifest
        ptr = read_pointer(env.state, "forest")
        assert ptr is not None
        assert verify_installed(env.state, "forest", ptr) == []
        model = load_forest_model(current_model_dir(env.state, "forest"))
        assert model.version == ptr["version"] >= versions[-1]
        versions.append(ptr["version"])
    assert killed_mid_run >= 8, killed_mid_run
    assert killed_mid_install >= 2, killed_mid_install   # the kills really hit the install window
    assert versions[-1] > 1
    # a fresh start cleans leftovers and knows the high-water mark (no replay of older versions)
    u = env.updater()
    kdir = env.state / "models" / "forest"
    ptr = read_pointer(env.state, "forest")
    leftovers = {p.name for p in kdir.iterdir()} - {"current.json", ptr["dir"], (ptr["previous"] or {}).get("dir")}
    assert leftovers == set()
    assert u.show("forest")["accepted_versions"][0]["version"] == ptr["version"]
    assert_rejected(u.offer(env.bundle(1), TOPIC), "downgrade" if ptr["version"] > 1 else "same version")
