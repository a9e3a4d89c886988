"""The fleet store on a real SQLite file and a real PostgreSQL server (tests/pg.py).

Every behaviour is checked on both backends through the same interface:
deduplication by message id and by sample key, twin state ordering, anomaly
episodes and the follow sequence, counters, labels, the registry tables, and
reading the origin's ``device_shadow_history`` as a training source.
"""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from fleet.config import config_from_dict
from fleet.registry import Registry
from fleet.store import COLLECTOR_MIGRATIONS, Incoming, StoreError, flatten_numeric, open_store, redact, unwrap_reported
from models.bundle import Target
from tests.pg import postgres_server, postgres_url  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fleet.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    s = open_store(url)
    yield s
    s.close()


def telemetry(mid: str, device: str, rows: list[tuple[float, dict]]) -> Incoming:
    return Incoming(mid, device, "telemetry", rows[-1][0], {"kind": "telemetry"}, tuple(rows))


def anomaly(mid: str, device: str, event_id: str, ts: float, severity: str, ended: str | None = None) -> Incoming:
    doc = {"messageId": mid, "deviceId": device, "kind": "anomaly", "id": event_id, "severity": severity,
           "metric": "system.cpuUsage", "value": 97.0, "startedAt": "2024-01-01T00:00:00Z", "endedAt": ended,
           "detector": "forest", "modelVersion": 3}
    return Incoming(mid, device, "anomaly", ts, doc)


def test_messages_are_stored_once_by_id_and_samples_once_by_key(store) -> None:
    rows = [(1000.0 + i, {"system.cpuUsage": float(i)}) for i in range(10)]
    first = store.ingest([telemetry("m1", "pi-01", rows[:6])])
    assert (first.stored, first.duplicates, first.samples) == (1, 0, 6)
    # the same message again (QoS 1 redelivery) and a new message overlapping it by 2 samples
    again = store.ingest([telemetry("m1", "pi-01", rows[:6]), telemetry("m2", "pi-01", rows[4:])])
    assert (again.stored, again.duplicates, again.samples) == (1, 1, 4)
    assert [ts for ts, _ in store.samples("pi-01")] == [ts for ts, _ in rows]
    assert store.samples("pi-01")[3] == rows[3]
    assert [ts for ts, _ in store.samples("pi-01", since_s=1003, until_s=1006)] == [1003.0, 1004.0, 1005.0]
    assert [ts for ts, _ in store.samples("pi-01", limit=2)] == [1008.0, 1009.0]
    assert store.sample_range("pi-01") == (10, 1000.0, 1009.0)
    assert store.message_count() == 2 and store.message_count("telemetry") == 2
    assert [d["device_id"] for d in store.devices()] == ["pi-01"] and store.devices()[0]["samples"] == 10


def test_a_batch_is_one_transaction(store) -> None:
    good = telemetry("ok", "pi-01", [(1.0, {"a": 1.0})])
    broken = Incoming("bad", "pi-01", "no-such-kind", 1.0, {})
    with pytest.raises(AttributeError):
        store.ingest([good, broken])
    assert store.message_count() == 0 and store.samples("pi-01") == []


def test_twin_keeps_the_latest_state_whatever_the_arrival_order(store) -> None:
    def twin(mid: str, ts: float, cpu: float) -> Incoming:
        return Incoming(mid, "pi-01", "twin", ts, {"state": {"reported": {"system.cpuUsage": cpu,
                                                                         "models": [{"kind": "forest", "version": 2}]}}})
    store.ingest([twin("t2", 20.0, 2.0)])
    store.ingest([twin("t1", 10.0, 1.0)])          # older, arrives later: ignored
    assert store.twin("pi-01")["system.cpuUsage"] == 2.0
    store.ingest([twin("t3", 30.0, 3.0)])
    assert store.twin("pi-01") == {"system.cpuUsage": 3.0, "models": [{"kind": "forest", "version": 2}]}
    assert set(store.twins()) == {"pi-01"} and store.twin("nobody") is None


def test_anomaly_episodes_show_the_latest_message_and_follow_sees_every_message(store) -> None:
    store.ingest([anomaly("a1", "pi-01", "ep1", 10.0, "warning"), anomaly("b1", "pi-02", "ep9", 11.0, "critical")])
    seq = store.last_anomaly_seq()
    store.ingest([anomaly("a2", "pi-01", "ep1", 20.0, "critical", ended="2024-01-01T00:05:00Z")])
    episodes = store.anomaly_episodes()
    assert sorted((e["deviceId"], e["id"], e["severity"]) for e in episodes) == \
        [("pi-01", "ep1", "critical"), ("pi-02", "ep9", "critical")]
    assert [e["id"] for e in store.anomaly_episodes(device_id="pi-01")] == ["ep1"]
    assert store.anomaly_episodes(severities=["warning"]) == []
    assert [m["messageId"] for m in store.anomaly_messages_after(0)] == ["a1", "b1", "a2"]
    assert [m["messageId"] for m in store.anomaly_messages_after(seq)] == ["a2"]
    assert store.anomaly_messages_after(seq, device_id="pi-02") == []


def test_counters_labels_and_forecasts(store) -> None:
    store.bump({"bad.json": 2, "stored": 5})
    store.bump({"bad.json": 1, "zero": 0})
    assert store.counters() == {"bad.json": 3, "stored": 5}
    store.add_label("pi-01", 100.0, 200.0)
    store.add_label("pi-01", 500.0, 600.0, "fan failure")
    assert store.labels("pi-01", since_s=150, until_s=550) == [(100.0, 200.0, "anomaly"), (500.0, 600.0, "fan failure")]
    assert store.labels("pi-01", since_s=201, until_s=499) == []
    with pytest.raises(ValueError):
        store.add_label("pi-01", 5.0, 1.0)
    doc = {"metric": "system.cpuUsage", "origin": "2024-01-01T00:00:00Z", "stepSeconds": 60, "values": [1, 2],
           "intervals": {"80": {"lower": [0, 1], "upper": [2, 3]}}, "model": "lstm", "modelVersion": 4}
    store.ingest([Incoming("f1", "pi-01", "forecast", 5.0, doc)])
    assert store.forecasts("pi-01") == [doc]
    assert store.forecasts("pi-01", since_s=1_800_000_000) == []


def test_migrations_run_once_and_reopening_keeps_data(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with open_store(url) as s:
        s.ingest([telemetry("m1", "d", [(1.0, {"a": 1.0})])])
        Registry(s)
    with open_store(url) as s:
        assert s.one("SELECT version FROM fleet_schema WHERE component = 'collector'")[0] == len(COLLECTOR_MIGRATIONS)
        assert s.samples("d") == [(1.0, {"a": 1.0})]


def test_registry_tables_work_on_both_backends(store, tmp_path: Path) -> None:
    reg = Registry(store)
    t = Target("device", "pi-01")
    assert reg.next_version(t) == 1 and reg.champion(t) is None
    r1 = reg.register(t, 1, kinds=["forest"], artefact_dir=tmp_path, params={"interval_s": 1.0},
                      metrics={"clean_anomaly_rate": 0.01, "nan": float("nan")},
                      data={"data_from_s": 1.0, "data_to_s": 9.0, "devices": ["pi-01"]})
    assert r1.status == "candidate" and r1.metrics["nan"] is None and r1.devices == ("pi-01",)
    reg.promote(t, 1)
    reg.register(t, 2, kinds=["forest", "lstm"], artefact_dir=tmp_path, params={}, metrics={}, parent_version=1)
    reg.promote(t, 2)
    assert reg.champion(t).version == 2 and reg.require(t, 1).status == "retired"
    assert reg.previous_champion(t).version == 1
    reg.set_comparison(t, 2, {"promote": True})
    reg.mark_published(t, 2, tmp_path / "b.tar")
    r2 = reg.require(t, 2)
    assert r2.comparison == {"promote": True} and r2.published_s is not None and r2.kinds == ("forest", "lstm")
    assert [r.version for r in reg.list(t)] == [1, 2] and reg.targets() == ["device:pi-01"]
    assert reg.next_version(t) == 3


def test_shadow_history_is_a_training_source_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    """The origin's table: uuid device ids, timestamptz, reported_state jsonb in the twin's shapes."""
    device = str(uuid.uuid4())
    with open_store(postgres_url) as s:
        s.execute("CREATE TABLE device_shadow_history (id BIGSERIAL PRIMARY KEY, device_uuid UUID NOT NULL, "
                  "timestamp TIMESTAMPTZ NOT NULL, reported_state JSONB NOT NULL)")
        rows = []
        for i in range(300):
            state = {"system.cpuUsage": 20.0 + (i % 7), "system.memoryUsed": 4e8 + (i % 11) * 1e5, "system.memoryTotal": 1e9,
                     "network": {"bytesReceived": 1000.0 * i}, "health": {"ok": True}, "agentVersion": "0.1"}
            if i % 2:
                state = {"state": {"reported": state}}
            rows.append((device, 1_700_000_000 + 60.0 * i, json.dumps(state)))
        s.executemany("INSERT INTO device_shadow_history (device_uuid, timestamp, reported_state) "
                      "VALUES (?::uuid, to_timestamp(?), ?::jsonb)", rows)
        got = s.shadow_rows(device, since_s=1_700_000_000 + 60.0 * 10, until_s=1_700_000_000 + 60.0 * 20)
        assert [ts for ts, _ in got] == [1_700_000_000 + 60.0 * i for i in range(10, 20)]
        assert got[0][1] == {"system.cpuUsage": 23.0, "system.memoryUsed": 4e8 + 1e6, "system.memoryTotal": 1e9,
                             "network.bytesReceived": 10000.0}
        # train on it: derived memory percent and network rate become features
        from fleet.train import run_training

        cfg = config_from_dict({"fleet": {"state_dir": str(tmp_path)},
                                "train": {"min_samples": 100, "n_estimators": 20, "source": "shadow",
                                          "features": ["system.cpuUsage", "system.memoryPercent",
                                                       "network.bytesReceivedPerSec"]}}, {})
        out = run_training(s, cfg, Target("device", device), use_lstm=False, publish=False,
                           now_s=1_700_000_000 + 60.0 * 300)
        assert out.promoted and out.record.params["source"] == "shadow"
        assert out.record.n_train + out.record.n_holdout == 300
        meta = json.loads((Path(out.record.artefact_dir) / "forest" / "model.json").read_text())
        assert meta["feature_names"] == ["system.cpuUsage", "system.memoryPercent", "network.bytesReceivedPerSec"]
        assert 0 <= out.record.metrics["clean_anomaly_rate"] <= 0.05


def test_shadow_history_in_sqlite_with_epoch_milliseconds(tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path / 'o.db'}") as s:
        s.execute("CREATE TABLE device_shadow_history (device_uuid TEXT, timestamp INTEGER, reported_state TEXT)")
        s.executemany("INSERT INTO device_shadow_history VALUES (?, ?, ?)",
                      [("dev", 1_700_000_000_000 + 1000 * i, json.dumps({"system": {"cpuUsage": i}})) for i in range(5)])
        got = s.shadow_rows("dev", since_s=1_700_000_001)
        assert got == [(1_700_000_000.0 + i, {"system.cpuUsage": float(i)}) for i in range(1, 5)]
        with pytest.raises(StoreError):
            s.shadow_rows("dev", table="no_such_table")
        with pytest.raises(StoreError):
            s.shadow_rows("dev", table="x; DROP TABLE samples")


def test_url_handling_and_the_lazy_driver(tmp_path: Path) -> None:
    assert redact("postgresql://fleet:s3cret@db:5432/fleet") == "postgresql://fleet:***@db:5432/fleet"
    with pytest.raises(StoreError, match="unsupported store URL"):
        open_store("mysql://x/y")
    with pytest.raises(StoreError, match="cannot connect"):
        open_store(f"postgresql://nobody@/x?host={tmp_path}&port=1")
    # without psycopg the fleet imports fine and a postgres URL says what to install
    code = ("import sys; sys.modules['psycopg'] = None\n"
            "import fleet.store, fleet.collect, fleet.train, fleet.registry, fleet.drift, fleet.retrain, "
            "fleet.commands, fleet.alerts\n"
            "try:\n    fleet.store.open_store('postgresql://x@/y')\n"
            "except fleet.store.StoreError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "psycopg" in out.stdout and "pip install" in out.stdout
    # and importing the fleet modules pulls in neither psycopg, sklearn nor tensorflow
    code = ("import sys\nimport fleet.commands, fleet.collect, fleet.train, fleet.drift, fleet.retrain\n"
            "print(sorted(m for m in ('psycopg', 'sklearn', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_shadow_state_shapes() -> None:
    assert unwrap_reported('{"state": {"reported": {"a": 1}}}') == {"a": 1}
    assert unwrap_reported({"reported": {"a": 1}}) == {"a": 1}
    assert unwrap_reported("not json") == {}
    assert flatten_numeric({"a": {"b": 1, "c": "x", "d": True, "e": float("nan")}, "f.g": 2}) == {"a.b": 1.0, "f.g": 2.0}
    assert np.isclose(flatten_numeric({"x": 1e300})["x"], 1e300)


def test_collector_on_postgres_isolates_a_poison_message_and_survives_a_lost_connection(postgres_url: str,
                                                                                         tmp_path: Path) -> None:
    """PostgreSQL refuses \\u0000 in JSONB: that message is counted as bad, its batch mates are stored.
    A killed server connection is reopened and the batch written."""
    from agent import payloads
    from fleet.collect import Collector

    cfg = config_from_dict({"fleet": {"state_dir": str(tmp_path)}, "store": {"url": postgres_url}}, {})
    collector = Collector(open_store(postgres_url), cfg, reopen=lambda: open_store(postgres_url))

    def tele(mid: str, t: float) -> bytes:
        return payloads.encode(payloads.telemetry_batch("pi-01", t, [(t, {"system.cpuUsage": 1.0})], message_id=mid))

    poison = payloads.anomaly_event("pi-01", 2.0, event_id="e1", severity="warning", metrics=["system.cpuUsage"],
                                    value=1.0, expected_low=0.0, expected_high=0.5, deviation=1.0, detector="zscore",
                                    model_version=None, started_ts_s=2.0, explanation="nul \x00 byte")
    collector.submit("devices/pi-01/telemetry", tele("a", 1.0))
    collector.submit("devices/pi-01/anomalies", payloads.encode(poison))
    collector.submit("devices/pi-01/telemetry", tele("c", 3.0))
    collector.pump(0.0)
    assert collector.flush()
    with open_store(postgres_url) as reader:
        assert [ts for ts, _ in reader.samples("pi-01")] == [1.0, 3.0] and reader.anomaly_episodes() == []
        assert reader.counters()["bad.store"] == 1 and collector.stats.bad == {"store": 1}

        pid = collector.store.one("SELECT pg_backend_pid()")[0]
        reader.execute("SELECT pg_terminate_backend(?)", (pid,))
        collector.submit("devices/pi-01/telemetry", tele("d", 4.0))
        collector.pump(0.0)
        for _ in range(3):          # the first write finds the connection dead and reopens it
            if collector.flush():
                break
        assert collector.stats.store_errors >= 1
        assert [ts for ts, _ in reader.samples("pi-01")] == [1.0, 3.0, 4.0]
    collector.store.close()
