import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest, RandomForestClassifier

from models.features import build_matrix, derived_names
from models.forest import CompactForest, load_forest_model
from models.training.forest import (ForestParams, NotEnoughSamples, export_isolation_forest, train_forest_from_rows,
                                    write_model_dir)

TOL = 1e-9
NAB = Path(os.environ.get("EDGE_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets")) / "nab"


def _assert_same(cf: CompactForest, model: IsolationForest, X: np.ndarray) -> None:
    assert np.abs(cf.score_samples(X) - model.score_samples(X)).max() <= TOL
    assert np.abs(cf.decision_function(X) - model.decision_function(X)).max() <= TOL
    for i in range(0, len(X), max(1, len(X) // 7)):         # one-row hot path
        assert abs(cf.score_one(X[i]) + model.score_samples(X[i:i + 1])[0]) <= TOL


@pytest.mark.parametrize("kw", [
    dict(n_estimators=100, contamination=0.01),
    dict(n_estimators=37, contamination="auto", max_samples=100, max_features=0.6),
    dict(n_estimators=20, contamination=0.05, max_samples=1.0, bootstrap=True),
])
def test_matches_sklearn_on_random_data(kw):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 5)) * [1, 10, 0.01, 1e4, 3]
    X[:10] += 6
    model = IsolationForest(random_state=3, **kw).fit(X)
    cf = export_isolation_forest(model)
    T = np.vstack([rng.normal(size=(500, 5)) * [2, 20, 0.02, 2e4, 6], X[:50]])
    _assert_same(cf, model, T)
    assert cf.offset == model.offset_ and cf.max_samples == model.max_samples_


def test_matches_sklearn_with_nan_inputs():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 3))
    model = IsolationForest(random_state=0).fit(X)
    cf = export_isolation_forest(model)
    T = rng.normal(size=(100, 3))
    T[::3, 1] = np.nan
    assert np.abs(cf.score_samples(T) - model.score_samples(T)).max() <= TOL


def _nab_rows(rel="realKnownCause/machine_temperature_system_failure.csv"):
    path = NAB / "data" / rel
    if not path.exists():
        pytest.skip(f"NAB data absent: {path}")
    with open(path) as f:
        return [{"value": float(r["value"])} for r in csv.DictReader(f)]


def test_matches_sklearn_on_real_nab_series(tmp_path):
    rows = _nab_rows()
    names = derived_names(("value",), 6)
    X = build_matrix(rows, names)
    train = X[:2000]
    model = IsolationForest(n_estimators=100, contamination=0.01, random_state=0).fit(train)
    cf = export_isolation_forest(model)
    _assert_same(cf, model, X)
    # the saved file scores the same (no pickle involved)
    cf.save(tmp_path / "f.npz")
    cf2 = CompactForest.load(tmp_path / "f.npz")
    assert np.array_equal(cf2.score_samples(X), cf.score_samples(X))
    with np.load(tmp_path / "f.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)


def test_engine_is_generic_random_forest_probabilities():
    """The same arrays serve a classifier: mean leaf value = sklearn predict_proba."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(400, 4))
    y = (X[:, 0] + X[:, 1] ** 2 > 1).astype(int)
    rf = RandomForestClassifier(n_estimators=15, max_depth=6, random_state=0).fit(X, y)
    trees = []
    for est in rf.estimators_:
        t = est.tree_
        v = t.value[:, 0, :]
        v = v / v.sum(axis=1, keepdims=True)
        trees.append({"children_left": t.children_left, "children_right": t.children_right,
                      "feature": np.maximum(t.feature, 0), "threshold": t.threshold,
                      "missing_go_left": t.missing_go_to_left, "n_node_samples": t.n_node_samples, "value": v})
    cf = CompactForest.from_trees(trees, n_features=4, kind="mean")
    T = rng.normal(size=(200, 4))
    assert np.abs(cf.leaf_mean(T) - rf.predict_proba(T)).max() <= TOL
    with pytest.raises(ValueError):
        cf.score_samples(T)


def test_train_from_rows_writes_model_dir(tmp_path):
    rng = np.random.default_rng(5)
    rows = [{"system.cpuUsage": float(rng.uniform(5, 20)), "system.memoryPercent": float(rng.normal(40, 1)),
             "network.bytesSentPerSec": float(rng.exponential(1e4))} for _ in range(300)]
    del rows[0]["network.bytesSentPerSec"]
    names = ("system.cpuUsage", "system.memoryPercent", "network.bytesSentPerSec")
    meta = train_forest_from_rows(rows, names, ForestParams(), tmp_path / "forest-v3", version=3)
    d = tmp_path / "forest-v3"
    assert sorted(p.name for p in d.iterdir()) == ["forest.npz", "model.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["forest-v3"]          # no temp dir left behind
    on_disk = json.loads((d / "model.json").read_text())
    assert on_disk == meta
    assert meta["kind"] == "forest" and meta["version"] == 3 and meta["n_samples"] == 299
    assert meta["feature_names"] == list(names) and meta["scaler"] is None and meta["trained_at"].endswith("Z")
    th = meta["thresholds"]
    assert th["median"] < th["warning"] < th["critical"]
    model = load_forest_model(d)
    X = build_matrix(rows, names)[1:]
    a = -model.forest.score_samples(X)
    # warning is the (1 - contamination) quantile of the training scores plus the small-sample margin
    q = float(np.quantile(a, 0.99))
    m = 0.5 * (np.sqrt(1000 / len(a)) - 1)
    assert th["warning"] == pytest.approx(q + m * (q - th["median"]), rel=1e-6)
    assert (a >= th["warning"]).mean() <= 0.01
    with pytest.raises(FileExistsError):
        write_model_dir(d, model.forest, meta)
    write_model_dir(d, model.forest, {**meta, "version": 4}, replace=True)
    assert load_forest_model(d).version == 4
    with pytest.raises(NotEnoughSamples):
        train_forest_from_rows(rows[:50], names, ForestParams(), tmp_path / "small", version=1)
    assert not (tmp_path / "small").exists()


def test_threshold_margin_shrinks_with_the_training_set():
    """Few training rows: the in-sample quantile is unreliable, so warning sits further above it."""
    from models.training.forest import calibrate_thresholds

    rng = np.random.default_rng(1)
    big = rng.normal(0.45, 0.03, 5000)
    th_small = calibrate_thresholds(big[:100])
    th_big = calibrate_thresholds(big)
    th_mid = calibrate_thresholds(big[:400])
    rel = [(t["warning"] - np.quantile(a, 0.99)) / (np.quantile(a, 0.99) - t["median"])
           for t, a in ((th_small, big[:100]), (th_mid, big[:400]), (th_big, big))]
    # ... and none from 1,000 rows on: the clearest outliers of a big set must still cross it
    assert rel == pytest.approx([0.5 * (np.sqrt(10) - 1), 0.5 * (np.sqrt(2.5) - 1), 0.0], abs=1e-9)
    assert th_small["median"] < th_small["warning"] < th_small["critical"]
    assert calibrate_thresholds(big[:100], ForestParams(warning_margin=0.0))["warning"] == \
        pytest.approx(np.quantile(big[:100], 0.99))
