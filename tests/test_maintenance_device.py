"""The device component: real SQLite store, fake clock, a fleet-trained model -> twin + failure_risk event."""
import json

import numpy as np

from agent import config
from agent.daemon import Context
from agent.maintenance import MaintenanceComponent, MaintenanceParams
from agent.sampling import Sample
from agent.store import Store
from models.maintenance import load_maintenance_model, window_features
from tests.fakes import FakeClock
from tests.maintenance_helpers import small_fleet, trained


def test_component_reports_risk_and_opens_a_failure_risk_event(tmp_path):
    model_dir, _, _ = trained(tmp_path / "model")
    model = load_maintenance_model(model_dir)
    fleet = small_fleet()
    # the hour before some gradual failure where the model is most alarmed (computed, not assumed)
    best = None
    for f in fleet.failures:
        if not f.gradual:
            continue
        d = fleet.device(f.device_id)
        for at in np.arange(f.ts_s - 6 * 3600, f.ts_s, 3600.0):
            x = window_features(d.ts_s, d.values, at, model.feature_names,
                                [(e["ts_s"], e["severity"]) for e in d.events if e["kind"] == "anomaly"])
            r = float(model.risk(x[None])[0])
            if best is None or r > best[0]:
                best = (r, d, at)
    risk_expected, dev, at = best
    assert risk_expected >= model.thresholds["warning"]

    cfg = config.parse({"agent": {"device_id": dev.device_id, "state_dir": str(tmp_path / "state")}}, {})
    store = Store(cfg.db_path)
    keep = (dev.ts_s <= at) & (dev.ts_s > at - 86400)
    names = list(dev.values)
    for ts, row in zip(dev.ts_s[keep], np.column_stack([dev.values[k] for k in names])[keep]):
        store.add_sample(Sample(float(ts), {k: float(v) for k, v in zip(names, row) if v == v}))
    store.flush()
    clock = FakeClock(wall_s=float(at))
    sent = []
    ctx = Context(config=cfg, store=store, clock=clock, emit=lambda k, p, pr: sent.append((k, p)), daemon=None)
    comp = MaintenanceComponent(MaintenanceParams(model_dir=str(model_dir)))
    comp.start(ctx)
    for ev in (e for e in dev.events if e["kind"] == "anomaly" and e["ts_s"] <= at):   # the device's own episodes
        comp.events.record({"id": f"a{ev['ts_s']}", "kind": "anomaly", "severity": ev["severity"],
                            "state": "closed", "start_ts_s": ev["ts_s"], "end_ts_s": ev["end_ts_s"]}, ev["ts_s"])
    comp.tick(clock.monotonic())

    twin = comp.twin()
    assert abs(twin["failureRisk24h"] - risk_expected) <= 1e-4
    assert twin["failureRiskTop"] and twin["failureRiskSeverity"] in ("warning", "critical")
    rows = store.conn.execute("SELECT kind, severity, state, doc FROM events WHERE kind = 'failure_risk'").fetchall()
    assert len(rows) == 1 and rows[0][2] == "open" and rows[0][1] == twin["failureRiskSeverity"]
    assert json.loads(rows[0][3])["features"] == [t["feature"] for t in twin["failureRiskTop"]]
    kinds = [(k, p["detector"], p["severity"]) for k, p in sent]
    assert kinds == [("anomaly", "failure_risk", twin["failureRiskSeverity"])]

    # not again before score_every_s; then a healthy hour closes the episode after close_after scores
    clock.advance(60)
    comp.tick(clock.monotonic())
    assert comp.scores == 1
    # the calmest day of the simulated fleet (lowest risk, no anomaly episodes), replayed as if it were now
    calm = None
    for d in fleet.devices:
        for t in np.arange(d.ts_s[0] + 2 * 86400, d.ts_s[-1], 6 * 3600.0):
            r = float(model.risk(window_features(d.ts_s, d.values, t, model.feature_names, [])[None])[0])
            if calm is None or r < calm[0]:
                calm = (r, d, t)
    risk_calm, calm_dev, calm_at = calm
    assert risk_calm < model.thresholds["warning"]
    store.conn.execute("DELETE FROM samples")
    store.conn.execute("DELETE FROM events WHERE kind = 'anomaly'")
    for k in range(2):
        clock.advance(3600)
        shift = clock.time() - calm_at
        day = (calm_dev.ts_s <= calm_at) & (calm_dev.ts_s > calm_at - 86400)
        store.conn.execute("DELETE FROM samples")
        calm_names = list(calm_dev.values)
        for ts, row in zip(calm_dev.ts_s[day], np.column_stack([calm_dev.values[n] for n in calm_names])[day]):
            store.add_sample(Sample(float(ts + shift), {n: float(v) for n, v in zip(calm_names, row) if v == v}))
        store.flush()
        comp.tick(clock.monotonic())
    state = store.conn.execute("SELECT state FROM events WHERE kind = 'failure_risk'").fetchone()[0]
    assert comp.scores == 3 and comp.twin()["failureRiskSeverity"] == "normal" and state == "closed"
    assert comp.status()["maintenance"]["model_version"] == 3
    store.close()
