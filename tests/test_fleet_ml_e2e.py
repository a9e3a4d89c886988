"""Issue 10 end to end around one real Mosquitto: simulate -> collect -> train -> publish -> device scores.

A small simulated fleet (ending now) is published over MQTT the way its devices
would send it (``fleet.simulate.publish_mqtt``, the ``edge-fleet simulate --mqtt``
path); the real collector stores it. From the fleet store the fleet trains the
predictive-maintenance model (registered for target ``fleet``) and fits the
behaviour clusters (``fleet.clusters.run --per-device --register --publish``);
both are signed and published retained. One device, with the real transport
(MqttReporter) and model manager on a real SQLite store and a FakeClock at its
last simulated sample, receives and installs both bundles; its
MaintenanceComponent and ClusterWatch tick once and report failureRisk24h and
clusterDistance, which must equal what the installed models compute from the
same day of samples.
"""
from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import config as agent_config
from agent.cluster_watch import ClusterWatch, ClusterWatchParams
from agent.daemon import Context
from agent.maintenance import MaintenanceComponent, MaintenanceParams as DeviceMaintenanceParams
from agent.model_manager import ManagerParams, ModelManager
from agent.sampling import Sample
from agent.store import Store as AgentStore
from agent.transport import MqttParams, MqttReporter
from fleet.clusters import ClusterParams, run as run_clusters
from fleet.collect import Collector
from fleet.config import config_from_dict
from fleet.keys import generate
from fleet.maintenance import (
    MaintenanceParams, build_dataset, histories_from_store, register_model, split, train,
)
from fleet.registry import Registry
from fleet.simulate import SimParams, publish_mqtt, simulate_fleet
from fleet.store import open_store
from models.bundle import Target
from models.clusters import assess, load_cluster_model, window_profiles
from models.maintenance import load_maintenance_model, window_features
from tests.conftest import wait_until
from tests.fakes import FakeClock

pytestmark = pytest.mark.timeout(120)
DAY_S = 86400.0


def test_simulated_fleet_collected_trained_published_and_a_device_reports_risk_and_cluster_distance(
        tmp_path: Path, mqtt_broker: Any) -> None:
    # -- 1. a small fleet whose history ends now, with enough failures to learn from
    days, step = 6.0, 300.0
    sim = simulate_fleet(SimParams(devices=8, days=days, seed=11, step_s=step, failure_rate_per_device_day=0.15,
                                   start_ts_s=float(np.floor(time.time() - days * DAY_S)), use_nab=False))
    assert sum(1 for f in sim.failures if f.gradual) >= 1
    expected_rows = {d.device_id: len(d.ts_s) for d in sim.devices}

    key, pub, _ = generate(tmp_path / "keys", "fleet")
    cfg = config_from_dict({
        "fleet": {"state_dir": str(tmp_path / "fleet"), "signing_key": str(key)},
        "mqtt": {"host": mqtt_broker.host, "port": mqtt_broker.port, "client_id": "ml-e2e-collector"},
        "collect": {"flush_interval_s": 0.1},
    }, {})
    stop = threading.Event()
    collector = Collector(open_store(cfg.store_url), cfg)
    collecting = threading.Thread(target=collector.run, args=(stop,), daemon=True)
    collecting.start()
    fleet = open_store(cfg.store_url)
    try:
        assert collector.connected.wait(10)
        # -- 2. the devices' messages over MQTT; the collector stores every sample
        sent = publish_mqtt(sim, mqtt_broker.host, mqtt_broker.port)
        assert sent > len(sim.devices)

        def stored() -> dict[str, int]:
            return {d: fleet.sample_range(d)[0] for d in expected_rows}

        assert wait_until(lambda: stored() == expected_rows, 40), (stored(), expected_rows)
        assert collector.stats.bad == {}
    finally:
        stop.set()
        collecting.join(10)

    # -- 3. the fleet trains the maintenance model from its store, registers and publishes it (target fleet)
    mp = MaintenanceParams(n_estimators=20, max_depth=6, holdout_device_share=0.0)
    ds = build_dataset(histories_from_store(fleet), p=mp)
    masks = split(ds, mp)
    forest, meta = train(ds, mp, masks)
    m_rec = register_model(cfg, fleet, forest, meta, ds, masks, publish=True)
    assert m_rec.published_s is not None and m_rec.kinds == ("maintenance",)
    assert int(ds.y.sum()) >= mp.min_positive_rows

    # -- 4. the clusters from the same store, one model per device, each published to its device's topic
    result, done = run_clusters(fleet, cfg, Target("fleet", "all"), ClusterParams(), per_device=True,
                                publish=True)
    dev = sim.devices[0]
    c_rec = Registry(fleet).list(Target("device", dev.device_id))[-1]
    assert c_rec.kinds == ("cluster",) and c_rec.published_s is not None
    assert any(e["target"] == f"device:{dev.device_id}" and e.get("published") for e in done)

    # -- 5. the device: real store, transport and model manager; a FakeClock at its last sample
    at = float(dev.ts_s[-1])
    dcfg = agent_config.parse({"agent": {"device_id": dev.device_id, "state_dir": str(tmp_path / "device"),
                                         "interval_s": step}}, {})
    store = AgentStore(dcfg.db_path)
    clock = FakeClock(wall_s=at)
    emitted: list[tuple[str, dict]] = []
    ctx = Context(config=dcfg, store=store, clock=clock, emit=lambda k, p, pr: emitted.append((k, p)), daemon=None)
    manager = ModelManager(ManagerParams(trusted_keys=(str(pub),)))
    mqtt = MqttReporter(MqttParams(host=mqtt_broker.host, port=mqtt_broker.port, reconnect_min_s=0.2,
                                   reconnect_max_s=1.0, keepalive_s=5),
                        device_id=dev.device_id, model_handler=manager.handle_bundle)
    maint = MaintenanceComponent(DeviceMaintenanceParams())
    watch = ClusterWatch(ClusterWatchParams())
    for comp in (manager, maint, watch):
        comp.start(ctx)
    mqtt.start(ctx)
    try:
        # its last simulated day in its store, as the daemon would have sampled it
        keep = (dev.ts_s > at - DAY_S) & (dev.ts_s <= at)
        day_ts = dev.ts_s[keep]
        day_values = {m: v[keep] for m, v in dev.values.items()}
        for i in range(len(day_ts)):
            s = Sample(float(day_ts[i]), {m: float(v[i]) for m, v in day_values.items() if np.isfinite(v[i])})
            store.add_sample(s)
            manager.on_sample(s)
        store.flush()

        def installed() -> dict[str, int]:
            return {m["kind"]: m["version"] for m in manager.models()}

        def pump() -> bool:
            mqtt.tick(clock.monotonic())
            manager.tick(clock.monotonic())
            return installed() == {"maintenance": m_rec.version, "cluster": c_rec.version}

        assert wait_until(pump, 20), (installed(), manager.counts, manager.last_error, mqtt.last_error)
    finally:
        mqtt.stop()
    assert manager.counts["rejected"] == 0
    assert maint.model is not None and maint.model.version == m_rec.version
    assert watch.model is not None and watch.model.version == c_rec.version

    # -- 6. one tick each: the twin carries the risk and the distance to its cluster
    maint.tick(clock.monotonic())
    watch.tick(clock.monotonic())
    twin = {**maint.twin(), **watch.twin()}
    risk = twin.get("failureRisk24h")
    assert risk is not None and math.isfinite(risk) and 0.0 <= risk <= 1.0, twin
    assert twin.get("clusterDistance") is not None and math.isfinite(twin["clusterDistance"]), (twin, watch.last_note)
    assert twin.get("clusterRadius") is not None and twin["clusterRadius"] > 0

    # the values are what the published models compute from the same day (fleet-side copies)
    model = load_maintenance_model(m_rec.kind_dir("maintenance"))
    x = window_features(day_ts, day_values, at, model.feature_names, [])
    assert risk == pytest.approx(float(model.risk(x[None])[0]), abs=1e-4)
    cmodel = load_cluster_model(c_rec.kind_dir("cluster"))
    assert twin["clusterId"] == cmodel.assignments[dev.device_id] == result.model.assignments[dev.device_id]
    assert twin["clusterRadius"] == pytest.approx(float(cmodel.radius[twin["clusterId"]]), abs=1e-4)
    _, P = window_profiles(day_ts, day_values, cmodel.feature_names, DAY_S)
    assert twin["clusterDistance"] == pytest.approx(assess(cmodel, P[-1], twin["clusterId"]).distance, abs=1e-4)
    store.close()
    fleet.close()
