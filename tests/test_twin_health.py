"""The twin's health, end to end: the real daemon wiring (build_components) reports to a real
mosquitto, the real fleet collector stores it, and the fleet page's data calls the device healthy.

The bug this guards: the daemon built its Reporter without ``health``, so every twin said
``"health": {}`` and the fleet page showed a healthy device as unhealthy.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent import config as agent_config
from agent.daemon import Daemon, build_components
from agent.health import Problem, twin_health
from agent.sampling import SystemClock
from fleet.collect import Collector
from fleet.config import config_from_dict
from fleet.serve import device_status, fleet_summary
from fleet.store import open_store
from tests.conftest import wait_until
from tests.fakes import FakeSource

pytestmark = pytest.mark.timeout(120)
DEVICE = "pi-health"


def test_twin_health_has_the_status_verdict() -> None:
    assert twin_health([]) == {"status": "healthy", "problems": []}
    bad = twin_health([Problem("no_samples", "no samples recorded yet")])
    assert bad["status"] == "unhealthy" and bad["problems"][0]["code"] == "no_samples"


def test_the_real_daemon_twin_reaches_the_fleet_page_as_healthy(tmp_path: Path, mqtt_broker: Any) -> None:
    fleet_cfg = config_from_dict({
        "fleet": {"state_dir": str(tmp_path / "fleet")},
        "mqtt": {"host": mqtt_broker.host, "port": mqtt_broker.port, "client_id": "health-collector"},
        "collect": {"flush_interval_s": 0.1},
    }, {})
    collector = Collector(open_store(fleet_cfg.store_url), fleet_cfg)
    stop = threading.Event()
    collecting = threading.Thread(target=collector.run, args=(stop,), daemon=True)
    collecting.start()
    assert collector.connected.wait(15)

    cfg = agent_config.parse({
        "agent": {"device_id": DEVICE, "state_dir": str(tmp_path / "device"), "interval_s": 0.2},
        "store": {"commit_interval_s": 0.5},
        "mqtt": {"host": mqtt_broker.host, "port": mqtt_broker.port, "reconnect_min_s": 0.2,
                 "reconnect_max_s": 1.0},
        "detect": {"forest_bootstrap": False},
        "forecast": {"enabled": False}, "clusters": {"enabled": False}, "maintenance": {"enabled": False},
    }, {})
    daemon = Daemon(cfg, source=FakeSource(SystemClock()))
    daemon.components = build_components(cfg, daemon)  # the wiring `edge-agent run` uses
    running = threading.Thread(target=daemon.run, daemon=True)
    running.start()
    fleet = open_store(fleet_cfg.store_url)
    try:
        # the first twin goes out 5 s after start; allow a loaded machine plenty more
        assert wait_until(lambda: (fleet.twin(DEVICE) or {}).get("health"), 60), fleet.twin(DEVICE)
        reported = fleet.twin(DEVICE)
        assert reported["health"] == {"status": "healthy", "problems": []}, reported["health"]
        summary = fleet_summary(fleet, time.time(), 180.0)
        row = next(d for d in summary["devices"] if d["device_id"] == DEVICE)
        assert row["health"] == "healthy" and row["online"]
        assert device_status(fleet, DEVICE, time.time(), 180.0)["health"] == {"ok": True, "problems": []}
    finally:
        daemon.request_stop()
        running.join(15)
        stop.set()
        collecting.join(10)
        fleet.close()
    assert not running.is_alive() and daemon.component_errors == 0
    assert collector.stats.bad == {}
