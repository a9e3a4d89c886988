"""Model bundles pushed over a real Mosquitto to a real daemon (MqttReporter + ModelManager).

The daemon runs in a thread on the real clocks with a fake psutil source (a
constant machine: cpu 12 %, memory 40 %, load 0.5), sampling every 50 ms. A
small scorer component stands in for the detector: it subscribes to the forest
model, scores every sample with the installed one and feeds the health check.
Bundles are real (sklearn-trained forests, ed25519 keys, ``edge-fleet bundle``
and ``edge-fleet publish``); events are read back from the broker.
"""
from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from agent import config
from agent.daemon import Daemon
from agent.model_manager import ManagerParams, ModelManager
from agent.sampling import SystemClock
from agent.topics import TopicParams, resolve
from agent.transport import MqttParams, MqttReporter
from fleet import cli as fleet_cli
from fleet.keys import load_signing_key
from fleet.publish import Target, topic_for
from models.bundle import Target as BundleTarget, build_bundle, canonical_json, key_id_of, sha256_hex, sign
from models.forest import load_forest_model
from tests.conftest import MqttSink, wait_until
from tests.fakes import FakeSource

pytestmark = pytest.mark.timeout(120)

DEVICE = "pi-01"
GROUP = "lab"
FEATURES = ["system.cpuUsage", "system.memoryPercent", "system.load1"]
DEVICE_TOPIC = f"devices/{DEVICE}/models"
EVENTS = f"devices/{DEVICE}/model-events"
HEALTH_SAMPLES = 15


# -- models and keys ----------------------------------------------------------------------
def _train(out: Path, centre: tuple[float, float, float], spread: tuple[float, float, float]) -> Path:
    from models.training.forest import ForestParams, train_forest_from_matrix

    rng = np.random.default_rng(3)
    X = np.column_stack([rng.normal(c, s, 400) for c, s in zip(centre, spread)])
    train_forest_from_matrix(X, FEATURES, ForestParams(n_estimators=20, min_samples=50), out, version=1)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        # trained around what the fake machine reports: its samples look normal
        "good": _train(d / "good", (12.0, 40.0, 0.5), (4.0, 3.0, 0.2)),
        # trained on a busy machine: every sample of the quiet fake machine is an outlier
        "bad": _train(d / "bad", (85.0, 90.0, 3.0), (2.0, 1.0, 0.2)),
    }


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("keys")
    assert fleet_cli.main(["keygen", "--out", str(d), "--name", "fleet"]) == 0
    assert fleet_cli.main(["keygen", "--out", str(d), "--name", "stranger"]) == 0
    return {"dir": d, "key": d / "fleet.key", "pub": d / "fleet.pub",
            "fleet": load_signing_key(d / "fleet.key").private_key,
            "stranger": load_signing_key(d / "stranger.key").private_key}


def files_of(model_dir: Path, version: int) -> dict[str, bytes]:
    meta = json.loads((model_dir / "model.json").read_text())
    return {"forest/forest.npz": (model_dir / "forest.npz").read_bytes(),
            "forest/model.json": json.dumps(dict(meta, version=version)).encode()}


def bundle_bytes(keys: dict, model_dir: Path, version: int, target: BundleTarget = BundleTarget("device", DEVICE),
                 key: str = "fleet", features: list[str] = FEATURES, files: dict[str, bytes] | None = None) -> bytes:
    return build_bundle(private_key=keys[key], files=files or files_of(model_dir, version), version=version,
                        target=target, feature_names=features, interval_s=0.05, created_at_s=time.time() - 60)


def cli_bundle(keys: dict, model_dir: Path, version: int, tmp: Path, target: str = f"device:{DEVICE}") -> Path:
    """``edge-fleet bundle`` on a copy of the model directory carrying ``version``."""
    src = tmp / f"src-v{version}"
    shutil.copytree(model_dir, src)
    meta = json.loads((src / "model.json").read_text())
    (src / "model.json").write_text(json.dumps(dict(meta, version=version)))
    out = tmp / f"forest-v{version}.bundle"
    assert fleet_cli.main(["bundle", "--key", str(keys["key"]), "--version", str(version), "--target", target,
                           "--interval-s", "0.05", "--out", str(out), str(src)]) == 0
    return out


def hand_signed(keys: dict, files: dict[str, bytes], version: int) -> bytes:
    """A manifest listing ``files`` signed by the trusted key, packed without the builder's checks."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pub = keys["fleet"].public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    doc = {"format_version": 1, "kinds": ["forest"], "version": version,
           "target": {"type": "device", "id": DEVICE}, "feature_names": FEATURES, "interval_s": 0.05,
           "created_at": "2024-01-01T00:00:00Z", "key_id": key_id_of(pub),
           "artefacts": [{"path": p, "kind": "forest", "sha256": sha256_hex(b), "size_bytes": len(b)}
                         for p, b in sorted(files.items())]}
    mbytes = canonical_json(doc)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, blob in [("manifest.json", mbytes), ("manifest.sig", sign(mbytes, keys["fleet"])),
                           *sorted(files.items())]:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


# -- the device ---------------------------------------------------------------------------
class ForestScorer:
    """Stands in for the detector: scores each sample with the current forest, feeds the health check."""

    name = "scorer"

    def __init__(self) -> None:
        self.model = None
        self.loaded: list[int | None] = []

    def start(self, ctx: Any) -> None:
        self.manager = ctx.extras["models"]
        self.manager.subscribe("forest", self._load)

    def _load(self, model_dir: Path | None, pointer: dict | None) -> None:
        self.model = load_forest_model(model_dir) if model_dir is not None else None
        self.loaded.append(None if pointer is None else pointer["version"])

    def on_sample(self, sample: Any) -> None:
        if self.model is None:
            return
        x = np.array([sample.values.get(n, math.nan) for n in self.model.feature_names])
        t0 = time.perf_counter()
        a = self.model.forest.score_one(x)
        self.manager.observe("forest", math.isfinite(a), a >= self.model.thresholds["warning"],
                             time.perf_counter() - t0)


class Device:
    """One start of the agent: daemon thread with reporter, model manager and scorer."""

    def __init__(self, state: Path, broker: Any, pub: Path) -> None:
        cfg = config.parse({"agent": {"device_id": DEVICE, "state_dir": str(state), "interval_s": 0.05,
                                      "groups": [GROUP]},
                            "store": {"commit_interval_s": 1.0}}, {})
        self.manager = ModelManager(ManagerParams(trusted_keys=(str(pub),), health_samples=HEALTH_SAMPLES,
                                                  poll_interval_s=0.5))
        self.reporter = MqttReporter(MqttParams(host=broker.host, port=broker.port, reconnect_min_s=0.2,
                                                reconnect_max_s=1.0),
                                     device_id=DEVICE, groups=(GROUP,), model_handler=self.manager.handle_bundle)
        self.scorer = ForestScorer()
        self.daemon = Daemon(cfg, source=FakeSource(SystemClock()),
                             components=[self.reporter, self.manager, self.scorer])
        self.thread = threading.Thread(target=self.daemon.run, daemon=True)
        self.thread.start()
        assert wait_until(lambda: self.reporter.connected, 10), self.reporter.last_error

    def versions(self) -> list[tuple[int, str]]:
        return [(m["version"], m["health"]) for m in self.manager.status()["models"]]

    def stop(self) -> None:
        self.daemon.request_stop()
        self.thread.join(15)
        assert not self.thread.is_alive()


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[list[Device]]:
    started: list[Device] = []
    yield started
    for d in started:
        if d.thread.is_alive():
            d.stop()


def events(sink: MqttSink) -> list[dict]:
    return sink.json_messages(EVENTS)


def next_event(sink: MqttSink, after: int, timeout_s: float = 10.0) -> dict:
    assert wait_until(lambda: len(events(sink)) > after, timeout_s), f"no model event after {events(sink)}"
    return events(sink)[after]


# -- tests --------------------------------------------------------------------------------
def test_pushed_bundle_is_installed_then_a_bad_one_is_rolled_back(tmp_path, mqtt_broker, mqtt_sink, models, keys,
                                                                   devices, capsys) -> None:
    sink = mqtt_sink(mqtt_broker, [f"devices/{DEVICE}/#"])
    dev = Device(tmp_path / "state", mqtt_broker, keys["pub"])
    devices.append(dev)
    assert dev.scorer.loaded == [None]                      # told at once: no model yet

    v1 = cli_bundle(keys, models["good"], 1, tmp_path)
    rc = fleet_cli.main(["publish", str(v1), "--device", DEVICE, "--host", mqtt_broker.host,
                         "--port", str(mqtt_broker.port)])
    assert rc == 0 and f"published to {DEVICE_TOPIC} (retained, QoS 1)" in capsys.readouterr().out
    ev = next_event(sink, 0)
    assert (ev["event"], ev["action"], ev["modelKind"], ev["version"], ev["target"]) == \
        ("installed", "accept", "forest", 1, f"device:{DEVICE}")
    assert ev["deviceId"] == DEVICE and ev["messageId"] and ev["source"] == DEVICE_TOPIC
    assert wait_until(lambda: dev.scorer.loaded[-1] == 1, 5)   # the detector swapped to the new model
    ev = next_event(sink, 1)                                 # ... which passes its health check
    assert (ev["event"], ev["version"]) == ("activated", 1) and "health check passed" in ev["reason"]
    [m] = dev.manager.status()["models"]
    assert (m["kind"], m["version"], m["target"], m["source"], m["health"]) == \
        ("forest", 1, f"device:{DEVICE}", DEVICE_TOPIC, "confirmed")
    assert m["installed_at"].endswith("Z") and m["anomaly_rate"] == 0.0

    v2 = cli_bundle(keys, models["bad"], 2, tmp_path)        # flags every sample of this machine
    assert fleet_cli.main(["publish", str(v2), "--device", DEVICE, "--host", mqtt_broker.host,
                           "--port", str(mqtt_broker.port)]) == 0
    ev = next_event(sink, 2)
    assert (ev["event"], ev["version"], ev["previousVersion"]) == ("installed", 2, 1)
    ev = next_event(sink, 3)
    assert (ev["event"], ev["action"], ev["version"], ev["restoredVersion"]) == \
        ("health_check_failed", "rollback", 2, 1)
    assert "anomaly rate" in ev["reason"]
    assert wait_until(lambda: dev.scorer.loaded[-2:] == [2, 1], 5), dev.scorer.loaded
    assert dev.versions() == [(1, "confirmed")]
    dev.stop()
    assert dev.daemon.component_errors == 0


def test_refusals_are_reported_and_the_agent_keeps_running(tmp_path, mqtt_broker, mqtt_sink, models, keys,
                                                           devices) -> None:
    sink = mqtt_sink(mqtt_broker, [EVENTS])
    pub = mqtt_sink(mqtt_broker, ["unused/#"])
    dev = Device(tmp_path / "state", mqtt_broker, keys["pub"])
    devices.append(dev)
    pub.publish(DEVICE_TOPIC, bundle_bytes(keys, models["good"], 3), retain=True)
    assert next_event(sink, 0)["event"] == "installed"
    assert next_event(sink, 1)["event"] == "activated"      # healthy: confirmed after a few samples

    good = bundle_bytes(keys, models["good"], 4)
    with tarfile.open(fileobj=io.BytesIO(good)) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    sig = bytearray(members["manifest.sig"])
    sig[0] ^= 1
    bad_signature = io.BytesIO()
    with tarfile.open(fileobj=bad_signature, mode="w") as tf:
        for name, blob in [("manifest.json", members["manifest.json"]), ("manifest.sig", bytes(sig)),
                           *[(n, b) for n, b in members.items() if n.startswith("forest/")]]:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    cases = [
        (bad_signature.getvalue(), "signature", ("bad signature",)),
        (bundle_bytes(keys, models["good"], 4, key="stranger"), "signature", ("unknown key",)),
        (bundle_bytes(keys, models["good"], 2), "version", ("downgrade", "v2 < v3")),
        (bundle_bytes(keys, models["good"], 3, files={**files_of(models["good"], 3),
                                                      "forest/notes.json": b"{}"}), "version", ("same version",)),
        (bundle_bytes(keys, models["good"], 4, features=["sensor.humidity", "sensor.humidity|mean10"]), "features",
         ("features not sampled", "sensor.humidity")),
        (hand_signed(keys, {**files_of(models["good"], 4), "forest/model.pkl": b"\x80\x04K\x01."}, 4), "parse",
         ("pickle",)),
        (b"this is not a tar archive" * 20, "parse", ("not a valid bundle",)),
    ]
    for i, (payload, stage, words) in enumerate(cases, start=2):
        pub.publish(DEVICE_TOPIC, payload, retain=True)
        ev = next_event(sink, i)
        assert (ev["event"], ev["action"], ev["stage"]) == ("rejected", "reject", stage), ev
        for w in words:
            assert w in ev["reason"], (w, ev["reason"])
    samples_before = dev.daemon.samples_taken
    pub.publish(DEVICE_TOPIC, b"", retain=True)             # clearing the retained bundle: no event
    pub.publish(f"fleet/{GROUP}/models", b"garbage", retain=False)
    ev = next_event(sink, len(cases) + 2)                    # only the garbage is reported
    assert ev["event"] == "rejected" and ev["source"] == f"fleet/{GROUP}/models"
    assert wait_until(lambda: dev.daemon.samples_taken > samples_before + 10, 5)   # still sampling
    assert dev.versions()[0][0] == 3 and dev.scorer.loaded == [None, 3]
    dev.stop()
    assert len(events(sink)) == len(cases) + 3 and dev.daemon.component_errors == 0


def test_old_retained_bundle_replayed_while_the_agent_was_down_is_refused(tmp_path, mqtt_broker, mqtt_sink,
                                                                          models, keys, devices) -> None:
    sink = mqtt_sink(mqtt_broker, [EVENTS])
    pub = mqtt_sink(mqtt_broker, ["unused/#"])
    v1, v2 = bundle_bytes(keys, models["good"], 1), bundle_bytes(keys, models["good"], 2)
    first = Device(tmp_path / "state", mqtt_broker, keys["pub"])
    devices.append(first)
    pub.publish(DEVICE_TOPIC, v1, retain=True)
    assert next_event(sink, 0)["version"] == 1
    pub.publish(DEVICE_TOPIC, v2, retain=True)
    assert next_event(sink, 1)["version"] == 2
    first.stop()

    def refusals() -> list[dict]:
        return [e for e in events(sink) if e["action"] == "reject"]

    pub.publish(DEVICE_TOPIC, v1, retain=True)              # an old, validly signed message replayed
    second = Device(tmp_path / "state", mqtt_broker, keys["pub"])
    devices.append(second)
    assert wait_until(lambda: len(refusals()) == 1, 10)
    [ev] = refusals()
    assert (ev["event"], ev["version"]) == ("rejected", 1) and "downgrade" in ev["reason"]
    assert second.versions()[0][0] == 2 and second.scorer.loaded == [2]
    second.stop()

    pub.publish(DEVICE_TOPIC, v2, retain=True)              # the installed bundle, redelivered: quiet
    third = Device(tmp_path / "state", mqtt_broker, keys["pub"])
    devices.append(third)
    assert wait_until(lambda: third.manager.status()["model_updates"]["rejected"] == 1, 10)
    assert wait_until(lambda: third.daemon.samples_taken > 20, 5)
    third.stop()
    assert len(refusals()) == 1 and third.versions()[0][0] == 2
    others = [(e["event"], e["version"]) for e in events(sink) if e["action"] != "reject"]
    assert ("installed", 1) in others and ("installed", 2) in others and others.count(("activated", 2)) == 1


# -- edge-fleet publish ---------------------------------------------------------------------
def test_publish_topics_match_what_the_agent_subscribes_to() -> None:
    topics = resolve(DEVICE, (GROUP,), TopicParams(prefix="site/north/{device_id}"))
    assert topic_for(Target("device", DEVICE), "site/north/{device_id}") == topics.inbound_models[0]
    assert topic_for(Target("group", GROUP)) in topics.inbound_models
    assert topic_for(Target("fleet", "all")) == "fleet/all/models" in topics.inbound_models


def test_publish_clear_mismatch_and_unreachable_broker(tmp_path, mqtt_broker, mqtt_sink, models, keys,
                                                       capsys) -> None:
    base = ["--host", mqtt_broker.host, "--port", str(mqtt_broker.port)]
    bundle = cli_bundle(keys, models["good"], 5, tmp_path, target=f"group:{GROUP}")
    assert fleet_cli.main(["publish", str(bundle), "--group", GROUP, "--pub", str(keys["pub"]), *base]) == 0
    first = mqtt_sink(mqtt_broker, [f"fleet/{GROUP}/models"])
    [msg] = first.wait_count(f"fleet/{GROUP}/models", 1)
    assert msg.retain and msg.payload == bundle.read_bytes()

    capsys.readouterr()
    assert fleet_cli.main(["publish", str(bundle), "--device", DEVICE, *base]) == 1     # wrong destination
    err = capsys.readouterr().err
    assert "bundle target is group:lab but the destination is device:pi-01" in err and err.count("\n") == 1

    assert fleet_cli.main(["publish", "--clear", "--group", GROUP, *base]) == 0
    later = mqtt_sink(mqtt_broker, [f"fleet/{GROUP}/models"])
    time.sleep(0.5)
    assert later.messages() == []                                    # no retained bundle any more

    capsys.readouterr()
    port = mqtt_broker.port
    mqtt_broker.stop()
    assert fleet_cli.main(["publish", str(bundle), "--group", GROUP, "--host", mqtt_broker.host,
                           "--port", str(port), "--timeout-s", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edge-fleet publish: cannot connect to") and err.count("\n") == 1
    assert fleet_cli.main(["publish", str(bundle), "--group", GROUP, "--fleet", *base]) == 2   # usage


# -- the manager on fake clocks (no broker) ---------------------------------------------------
class Script:
    """Calls ``actions[n](manager)`` at sample n (0 = at start, before any sample); records emits and loads."""

    name = "script"

    def __init__(self, actions: dict[int, Any], stop_at: int) -> None:
        self.actions, self.stop_at = actions, stop_at
        self.emitted: list[dict] = []
        self.loaded: list[int | None] = []
        self.changes = 0
        self.n = 0

    def start(self, ctx: Any) -> None:
        self.ctx = ctx
        ctx.extras["models"].on_change(self._changed)
        ctx.daemon.set_emitter(lambda kind, payload, priority: self.emitted.append(payload))
        self.manager = ctx.extras["models"]
        self.manager.subscribe("forest", lambda d, ptr: self.loaded.append(ptr and ptr["version"]))
        if 0 in self.actions:
            self.actions[0](self.manager)

    def _changed(self) -> None:
        self.changes += 1

    def on_sample(self, sample: Any) -> None:
        self.n += 1
        if self.n in self.actions:
            self.actions[self.n](self.manager)
        if self.n >= self.stop_at:
            self.ctx.daemon.request_stop()


def run_fake(tmp_path: Path, keys: dict, script: Script, trusted: tuple[str, ...] | None = None) -> ModelManager:
    from tests.fakes import FakeClock

    clock = FakeClock(wall_s=time.time())
    cfg = config.parse({"agent": {"device_id": DEVICE, "state_dir": str(tmp_path / "state"), "groups": [GROUP]}}, {})
    manager = ModelManager(ManagerParams(trusted_keys=trusted if trusted is not None else (str(keys["pub"]),),
                                         health_samples=HEALTH_SAMPLES))
    daemon = Daemon(cfg, source=FakeSource(clock), clock=clock, sleep=clock.sleep, components=[manager, script])
    assert daemon.run() == 0 and daemon.component_errors == 0
    return manager


def test_bundle_before_the_first_sample_waits_for_it_and_empty_payloads_are_ignored(tmp_path, models,
                                                                                     keys) -> None:
    rates = FEATURES + ["network.bytesReceivedPerSec"]           # a rate: absent from the first sample
    data = bundle_bytes(keys, models["good"], 1, features=rates)
    script = Script({0: lambda m: m.handle_bundle(DEVICE_TOPIC, data),
                     2: lambda m: m.handle_bundle(DEVICE_TOPIC, b"")}, stop_at=5)
    manager = run_fake(tmp_path, keys, script)
    assert [(e["event"], e["version"]) for e in script.emitted] == [("installed", 1)]
    assert script.loaded == [None, 1]
    status = manager.status()
    assert status["model_updates"]["empty_ignored"] == 1 and status["model_updates"]["pending"] == 0
    [m] = status["models"]
    assert (m["version"], m["health"], m["trial_samples"]) == (1, "trial", "0/15")   # nothing scored it yet


def test_local_model_through_the_manager_then_a_fleet_bundle_replaces_it(tmp_path, models, keys) -> None:
    decisions: list[Any] = []
    fleet_bundle = bundle_bytes(keys, models["good"], 7, target=BundleTarget("fleet", "all"))
    script = Script({1: lambda m: decisions.append(m.install_local("forest", models["good"])),
                     2: lambda m: m.handle_bundle("fleet/all/models", fleet_bundle),
                     3: lambda m: decisions.append(m.install_local("forest", models["good"]))}, stop_at=4)
    run_fake(tmp_path, keys, script, trusted=(str(keys["pub"]), str(tmp_path / "missing.pub")))
    assert [d.accepted for d in decisions] == [True, False]
    assert "never replaces a received one" in decisions[1].reason
    assert [(e["event"], e["version"], e["target"]) for e in script.emitted] == [
        ("installed", 1, f"local:{DEVICE}"), ("installed", 7, "fleet"), ("rejected", None, f"local:{DEVICE}")]
    assert script.emitted[0]["source"] == "local" and script.emitted[1]["previousVersion"] == 1
    assert script.loaded == [None, 1, 7] and script.changes == 2      # the twin can be re-sent at once
