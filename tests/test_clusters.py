"""Behaviour profiles, K-Means/DBSCAN on a simulated fleet, the cluster model file, `edge-fleet clusters`."""
from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from fleet.clusters import ClusterParams, ClusteringError, build_profiles, fit_clusters
from models.clusters import (
    NPZ_FILE, ClusterModelError, assess, feature_names, load_cluster_model, profile_from_columns,
    rms_distances, rows_to_columns, save_cluster_model, window_profiles,
)
from tests.clusters_helpers import SMALL, histories, small_fleet, small_result

T0 = 1_700_000_000.0


# -- profiles ------------------------------------------------------------------------------------
def test_profile_stats_match_numpy_on_the_transformed_values():
    rng = np.random.default_rng(0)
    ts = T0 + 300.0 * np.arange(288)                    # one day at 5 min
    cpu = 20 + 10 * np.sin(2 * np.pi * ts / 86400) + rng.normal(0, 1, len(ts))
    rx = np.exp(rng.normal(8, 1, len(ts)))
    rx[5] = np.nan                                      # an absent rate is left out, not zero
    names = feature_names(["system.cpuUsage", "network.bytesReceivedPerSec", "system.temperature"],
                          ["mean", "std", "p05", "p50", "p95", "hstd"])
    p = dict(zip(names, profile_from_columns(ts, {"system.cpuUsage": cpu, "network.bytesReceivedPerSec": rx},
                                             names)))
    assert p["system.cpuUsage|mean"] == pytest.approx(cpu.mean())
    assert p["system.cpuUsage|std"] == pytest.approx(cpu.std())
    assert p["system.cpuUsage|p05"] == pytest.approx(np.percentile(cpu, 5))
    assert p["system.cpuUsage|p95"] == pytest.approx(np.percentile(cpu, 95))
    hourly = [cpu[(np.floor(ts / 3600) % 24) == h].mean() for h in range(24)]
    assert p["system.cpuUsage|hstd"] == pytest.approx(np.std(hourly))
    assert p["system.cpuUsage|hstd"] > 5                 # the daily cycle shows
    lrx = np.log1p(rx[np.isfinite(rx)])
    assert p["network.bytesReceivedPerSec|mean"] == pytest.approx(lrx.mean())
    assert p["network.bytesReceivedPerSec|p50"] == pytest.approx(np.median(lrx))
    assert all(math.isnan(p[f"system.temperature|{s}"]) for s in ("mean", "p95", "hstd"))   # no sensor


def test_too_few_values_or_hours_give_nan():
    ts = T0 + 60.0 * np.arange(30)                      # 30 minutes: one hour bin
    names = feature_names(["system.cpuUsage"], ["mean", "hstd"])
    p = profile_from_columns(ts, {"system.cpuUsage": np.ones(30)}, names)
    assert p[0] == 1.0 and math.isnan(p[1])
    p = profile_from_columns(ts[:5], {"system.cpuUsage": np.ones(5)}, names)
    assert math.isnan(p[0])


def test_window_profiles_count_back_from_the_newest_sample():
    ts = T0 + 600.0 * np.arange(int(3.6 * 144))         # 3.6 days at 10 min
    cpu = np.where(ts >= ts[-1] - 86400, 50.0, 10.0)    # the last day differs
    names = feature_names(["system.cpuUsage"], ["mean"])
    ends, P = window_profiles(ts, {"system.cpuUsage": cpu}, names, 86400.0, min_coverage=0.5)
    assert ends[-1] == ts[-1] and len(P) == 4            # 3 full days + the 0.6-day head (>= 50 %)
    assert P[-1, 0] == pytest.approx(50.0) and P[0, 0] == pytest.approx(10.0)
    ends, P = window_profiles(ts, {"system.cpuUsage": cpu}, names, 86400.0, min_coverage=0.9)
    assert len(P) == 3


def test_rows_to_columns_marks_absent_values_nan():
    ts, cols = rows_to_columns([(1.0, {"a": 2.0}), (2.0, {"b": 3.0})], ["a", "b"])
    assert ts.tolist() == [1.0, 2.0] and cols["a"][0] == 2.0 and math.isnan(cols["a"][1])


def test_rms_distance_leaves_missing_features_out():
    C = np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
    d = rms_distances(np.array([[3.0, 4.0, np.nan]]), C)[0]
    assert d[0] == pytest.approx(math.sqrt(25 / 2)) and d[1] == pytest.approx(0.0)


# -- clustering on a simulated fleet ------------------------------------------------------------
def test_kmeans_finds_the_simulated_roles():
    fleet = small_fleet()
    res = small_result()
    roles = {d.device_id: d.role for d in fleet.devices}
    ari = adjusted_rand_score([roles[d] for d in res.device_ids], res.labels)
    assert ari >= 0.9, (ari, res.silhouettes)
    assert res.model.k == len(SMALL.roles)              # chosen by silhouette, not configured
    assert res.silhouette == max(res.silhouettes.values())
    # every member's own profile is inside its cluster's radius
    assert (res.distances <= res.model.radius[res.labels]).all()


def test_configured_k_and_too_few_devices():
    fleet = small_fleet()
    cp = ClusterParams(k=2)
    res = fit_clusters(build_profiles(histories(fleet), cp), cp)
    assert res.model.k == 2 and res.silhouettes == {}
    two = dict(list(histories(fleet).items())[:2])
    with pytest.raises(ClusteringError, match="at least 3"):
        fit_clusters(build_profiles(two, cp), cp)


def test_dbscan_flags_a_device_that_belongs_to_no_cluster():
    fleet = small_fleet()
    hist = histories(fleet)
    base = fleet.devices[0]
    odd = {m: v.copy() for m, v in base.values.items()}
    odd["system.cpuUsage"] = np.clip(odd["system.cpuUsage"] * 0 + 97.0, 0, 100)   # pegged CPU
    odd["network.bytesSentPerSec"] = odd["network.bytesSentPerSec"] * 300.0
    odd["system.temperature"] = odd["system.temperature"] + 25.0
    hist["odd-1"] = (base.ts_s, odd)
    cp = ClusterParams()
    res = fit_clusters(build_profiles(hist, cp), cp)
    flagged = {o["device_id"] for o in res.outliers()}
    assert "odd-1" in flagged
    assert len(flagged) <= 2                            # the rest of the fleet is not noise
    odd_i = res.device_ids.index("odd-1")
    lab = res.labels[odd_i]
    # K-Means either gives it a cluster of its own or leaves it beyond its cluster's radius
    assert res.model.sizes[lab] == 1 or res.distances[odd_i] > res.model.radius[lab]


# -- the model file ------------------------------------------------------------------------------
def test_export_import_round_trip_is_plain_arrays(tmp_path):
    res = small_result()
    out = save_cluster_model(res.model, tmp_path / "cluster", {"target": "fleet"})
    with zipfile.ZipFile(out / NPZ_FILE) as z:
        assert sorted(z.namelist()) == sorted(f"{k}.npy" for k in ("mean", "scale", "centroids", "radius", "sizes"))
    with np.load(out / NPZ_FILE, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    back = load_cluster_model(out)
    for k in ("mean", "scale", "centroids", "radius", "sizes"):
        assert np.array_equal(getattr(back, k), getattr(res.model, k))
    assert back.feature_names == res.model.feature_names and back.assignments == res.model.assignments
    meta = json.loads((out / "model.json").read_text())
    assert meta["kind"] == "cluster" and meta["target"] == "fleet"
    d = small_fleet().devices[0]
    _, P = window_profiles(d.ts_s, d.values, back.feature_names, back.window_s)
    a1, a2 = assess(res.model, P[-1], 0), assess(back, P[-1], 0)
    assert a1.distance == a2.distance and a1.contributions == a2.contributions


def test_a_pickled_or_malformed_model_is_refused(tmp_path):
    out = save_cluster_model(small_result().model, tmp_path / "m")
    with np.load(out / NPZ_FILE, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(out / NPZ_FILE, **{**arrays, "radius": np.array([{"x": 1}] * len(arrays["radius"]), dtype=object)})
    with pytest.raises(ClusterModelError):
        load_cluster_model(out)
    np.savez(out / NPZ_FILE, **{**arrays, "radius": -arrays["radius"]})
    with pytest.raises(ClusterModelError, match="radius"):
        load_cluster_model(out)
    np.savez(out / NPZ_FILE, **{**arrays, "mean": arrays["mean"][:-1]})
    with pytest.raises(ClusterModelError, match="shapes"):
        load_cluster_model(out)


# -- the fleet store and the command -------------------------------------------------------------
@pytest.fixture()
def fleet_env(tmp_path):
    from fleet.simulate import write_store
    from fleet.store import open_store

    state = tmp_path / "fleet-state"
    cfg = tmp_path / "fleet.toml"
    cfg.write_text(f'[fleet]\nstate_dir = "{state}"\n')
    store = open_store(f"sqlite:///{state}/fleet.db")
    write_store(small_fleet(), store)
    store.close()
    return cfg, state


def test_clusters_command_from_the_store_and_registry_bundle(fleet_env, capsys):
    from fleet.bundle_cli import keygen, verify_file
    from fleet.cli import main
    from fleet.config import load_config
    from fleet.registry import Registry, build_bundle_file
    from fleet.store import open_store
    from models.bundle import Target

    cfg, state = fleet_env
    assert main(["clusters", "--config", str(cfg), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    roles = {d.device_id: d.role for d in small_fleet().devices}
    ids = sorted(doc["assignments"])
    assert ids == sorted(roles)
    ari = adjusted_rand_score([roles[d] for d in ids], [doc["assignments"][d] for d in ids])
    assert ari >= 0.9 and doc["k"] == 3
    assert sum(c["size"] for c in doc["clusters"]) == len(ids)

    assert main(["clusters", "--config", str(cfg), "--register", "--per-device", "--k", "3"]) == 0
    text = capsys.readouterr().out
    assert "cluster 0:" in text and "outliers" in text
    config = load_config(str(cfg))
    keygen(config.signing_key.parent, config.signing_key.stem)
    with open_store(config.store_url) as store:
        registry = Registry(store)
        rec = registry.list(Target("device", ids[0]))[-1]
        assert rec.kinds == ("cluster",) and rec.status == "candidate" and registry.champion(rec.target_obj) is None
        bundle = build_bundle_file(config, rec)
    verified = verify_file(bundle, [config.signing_key.with_suffix(".pub")])
    assert verified.manifest.kinds == ("cluster",)
    assert all("|" in f for f in verified.manifest.feature_names)
    model = load_cluster_model(rec.kind_dir("cluster"))
    assert model.assigned == doc["assignments"][ids[0]] and model.version == rec.version


def test_a_device_without_a_sensor_gets_a_model_without_its_features():
    fleet = small_fleet()
    hist = histories(fleet)
    base = fleet.devices[0]
    hist["no-temp"] = (base.ts_s, {m: v for m, v in base.values.items() if m != "system.temperature"})
    cp = ClusterParams()
    res = fit_clusters(build_profiles(hist, cp), cp)
    assert any(n.startswith("system.temperature|") for n in res.model.feature_names)
    m = res.device_model("no-temp", 2)
    assert m.version == 2 and m.assigned == res.model.assignments["no-temp"]
    assert not any(n.startswith("system.temperature|") for n in m.feature_names)
    assert m.centroids.shape == (res.model.k, len(m.feature_names)) == (res.model.k, len(m.mean))
    _, P = window_profiles(base.ts_s, hist["no-temp"][1], m.feature_names, m.window_s)
    full = res.model
    _, P_full = window_profiles(base.ts_s, hist["no-temp"][1], full.feature_names, full.window_s)
    # the same distance as the full model gives when the missing features are left out
    assert assess(m, P[-1], m.assigned).distance == pytest.approx(assess(full, P_full[-1], m.assigned).distance)
    assert res.device_model(base.device_id, 2).feature_names == full.feature_names
