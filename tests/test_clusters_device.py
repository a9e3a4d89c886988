"""The device side: ClusterWatch with a real SQLite store, the real model manager and a fake clock."""
from __future__ import annotations

import json

import numpy as np
import pytest

from agent.cluster_watch import EVENT_KIND, ClusterWatch, ClusterWatchParams
from agent.config import parse
from agent.daemon import Context
from agent.model_manager import ManagerParams, ModelManager
from agent.sampling import Sample
from agent.store import Store
from models.clusters import assess, save_cluster_model, window_profiles
from tests.clusters_helpers import small_fleet, small_result
from tests.fakes import FakeClock

HOUR = 3600.0


class Env:
    """One device: config, store, clock, emitted messages, the model manager and the watcher."""

    def __init__(self, tmp_path, device_id: str, params: ClusterWatchParams, trusted_keys: tuple[str, ...] = ()) -> None:
        self.config = parse({"agent": {"device_id": device_id, "state_dir": str(tmp_path / "state")},
                             "models": {"trusted_keys": list(trusted_keys)}})
        self.store = Store(self.config.db_path)
        self.clock = FakeClock(wall_s=small_fleet().params.start_ts_s)
        self.sent: list[tuple[str, dict, int]] = []
        self.ctx = Context(config=self.config, store=self.store, clock=self.clock,
                           emit=lambda k, p, pr: self.sent.append((k, p, pr)), daemon=None)
        self.manager = ModelManager(ManagerParams(trusted_keys=trusted_keys))
        self.watch = ClusterWatch(params)
        self.manager.start(self.ctx)
        self.watch.start(self.ctx)

    def feed(self, ts_s: np.ndarray, values: dict[str, np.ndarray], upto_s: float) -> None:
        """Store the samples with ts <= upto_s not stored yet, as the daemon would, and move the clock."""
        done = getattr(self, "_done_s", -np.inf)
        for i in np.flatnonzero((ts_s > done) & (ts_s <= upto_s)):
            s = Sample(float(ts_s[i]), {m: float(v[i]) for m, v in values.items() if np.isfinite(v[i])})
            self.store.add_sample(s)
            self.manager.on_sample(s)
        self.store.flush()
        self._done_s = upto_s
        self.clock.advance(upto_s - self.clock.wall_s)

    def events(self) -> list[dict]:
        return [json.loads(r[0]) | {"_kind": r[1]} for r in
                self.store.conn.execute("SELECT doc, kind FROM events ORDER BY updated_at")]


def install(env: Env, tmp_path, device_id: str):
    model = small_result().model
    d = save_cluster_model(model, tmp_path / "cluster-model", {"interval_s": 600.0})
    decision = env.manager.install_local("cluster", d)
    assert decision.accepted, decision.reason
    assert env.watch.model is not None                    # the manager told the watcher
    return env.watch.model


def test_a_device_like_its_peers_stays_inside(tmp_path):
    fleet = small_fleet()
    dev = fleet.devices[0]
    env = Env(tmp_path, dev.device_id, ClusterWatchParams(check_every_s=HOUR))
    first = dev.ts_s[0]
    env.feed(dev.ts_s, dev.values, first + 6 * HOUR)
    model = install(env, tmp_path, dev.device_id)
    env.watch.tick(env.clock.monotonic())
    assert env.watch.last is None and "h of samples" in env.watch.last_note      # 6 h < half a day
    assert env.watch.twin()["clusterDistance"] is None
    for h in range(24, 48):
        env.feed(dev.ts_s, dev.values, first + h * HOUR)
        env.watch.tick(env.clock.monotonic())
    twin = env.watch.twin()
    assert twin["clusterId"] == model.assignments[dev.device_id]
    assert twin["clusterRadius"] == pytest.approx(model.radius[twin["clusterId"]], abs=1e-4)
    assert 0 <= twin["clusterDistance"] < twin["clusterRadius"]
    # the device computed what the fleet computes from the same day of samples
    upto = env.clock.wall_s
    keep = (dev.ts_s > upto - 86400) & (dev.ts_s <= upto)
    _, P = window_profiles(dev.ts_s[keep], {m: v[keep] for m, v in dev.values.items()}, model.feature_names, 86400)
    assert twin["clusterDistance"] == pytest.approx(assess(model, P[-1], twin["clusterId"]).distance, abs=1e-4)
    assert env.watch.checks == 24
    assert not [e for e in env.events() if e["_kind"] == EVENT_KIND]
    assert env.watch.status()["clusters"]["deviation_open"] is None


def test_a_device_that_behaves_like_another_role_raises_cluster_deviation(tmp_path):
    fleet = small_fleet()
    res = small_result()
    dev = fleet.devices[0]
    other = next(d for d in fleet.devices if res.model.assignments[d.device_id] != res.model.assignments[dev.device_id])
    env = Env(tmp_path, dev.device_id, ClusterWatchParams(check_every_s=HOUR, stay_beyond_checks=3))
    first = dev.ts_s[0]
    env.feed(dev.ts_s, dev.values, first + 24 * HOUR)      # a normal day
    install(env, tmp_path, dev.device_id)
    env.watch.tick(env.clock.monotonic())
    assert not env.watch.last.beyond
    # from now on it reports what a device of the other cluster reports
    beyond_run = 0
    opened_at = None
    for h in range(25, 25 + 30):
        env.feed(other.ts_s, other.values, first + h * HOUR)
        env.watch.tick(env.clock.monotonic())
        beyond_run = beyond_run + 1 if env.watch.last.beyond else 0
        if opened_at is None and [e for e in env.events() if e["_kind"] == EVENT_KIND]:
            opened_at = h
            assert beyond_run == 3                         # it stayed beyond for 3 checks first
    assert opened_at is not None
    ev = [e for e in env.events() if e["_kind"] == EVENT_KIND][0]
    assert ev["state"] == "open" and ev["detector"] == "cluster" and ev["severity"] in ("warning", "critical")
    assert ev["distance"] > ev["radius"] and ev["cluster"] == res.model.assignments[dev.device_id]
    msgs = [p for k, p, _ in env.sent if k == "anomaly" and p.get("eventKind") == EVENT_KIND]
    assert msgs and msgs[0]["id"] == ev["id"] and msgs[0]["detector"] == "cluster"
    assert msgs[0]["metrics"][0] in res.model.feature_names and msgs[0]["explanation"]
    twin = env.watch.twin()
    assert twin["clusterDistance"] > twin["clusterRadius"]
    assert twin["clusterNearest"] == res.model.assignments[other.device_id]
    # back to its own behaviour: the deviation closes after close_after_checks checks inside
    for h in range(25 + 30, 25 + 30 + 40):
        env.feed(dev.ts_s, dev.values, first + h * HOUR)
        env.watch.tick(env.clock.monotonic())
    ev = [e for e in env.events() if e["_kind"] == EVENT_KIND][0]
    assert ev["state"] == "closed" and ev["end_ts_s"] is not None
    assert env.watch.status()["clusters"]["deviation_open"] is None


def test_disabled_does_nothing(tmp_path):
    env = Env(tmp_path, "sim-00", ClusterWatchParams(enabled=False))
    env.watch.tick(env.clock.monotonic())
    assert env.watch.twin() == {} and env.watch.status()["clusters"]["note"] == "disabled"


def test_a_signed_cluster_bundle_from_the_fleet_is_installed_and_used(tmp_path):
    from fleet.bundle_cli import keygen, make_bundle
    from fleet.clusters import with_version

    fleet = small_fleet()
    res = small_result()
    dev = fleet.devices[1]
    key, pub, _ = keygen(tmp_path / "keys", "signing")
    model_dir = save_cluster_model(with_version(res.model, 4, res.model.assignments[dev.device_id]),
                                   tmp_path / "export" / "cluster", {"interval_s": 600.0})
    bundle = tmp_path / "cluster.bundle"
    make_bundle(key_path=key, version=4, target=f"device:{dev.device_id}", out=bundle, inputs=[model_dir])

    env = Env(tmp_path, dev.device_id, ClusterWatchParams(), trusted_keys=(str(pub),))
    env.feed(dev.ts_s, dev.values, dev.ts_s[0] + 30 * HOUR)
    env.manager.handle_bundle(f"devices/{dev.device_id}/models", bundle.read_bytes())
    events = [p for k, p, _ in env.sent if k == "model"]
    assert events and events[-1]["event"] == "installed" and events[-1]["modelKind"] == "cluster"
    assert env.watch.model is not None and env.watch.model.version == 4
    env.watch.tick(env.clock.monotonic())
    twin = env.watch.twin()
    assert twin["clusterId"] == res.model.assignments[dev.device_id]
    assert twin["clusterDistance"] < twin["clusterRadius"]
    assert any(m["kind"] == "cluster" and m["version"] == 4 for m in env.manager.models())
