"""The exported failure-risk classifier: exact vs scikit-learn, calibrated, loadable, explainable."""
import json

import numpy as np
import pytest

from fleet.maintenance import export_classifier, fit_forest, split
from models.maintenance import feature_names, load_maintenance_model, path_contributions, window_features
from tests.maintenance_helpers import PARAMS, dataset, trained


def test_compact_forest_equals_sklearn_predict_proba():
    ds = dataset()
    tr = split(ds, PARAMS)["train"]
    rf = fit_forest(ds.X[tr], ds.y[tr], PARAMS)
    forest = export_classifier(rf)
    X = ds.X.copy()
    X[::5, 0] = np.nan                          # missing values follow sklearn's routing too
    X[::7, 10] = np.nan
    got = forest.leaf_mean(X)
    want = rf.predict_proba(X)
    assert np.abs(got - want).max() <= 1e-9
    one = forest.leaf_mean(X[3])                 # the single-row path
    assert np.abs(one - want[3]).max() <= 1e-9


def test_model_dir_roundtrip_calibration_and_contributions(tmp_path):
    d, ds, masks = trained(tmp_path / "m")
    assert sorted(p.name for p in d.iterdir()) == ["maintenance.npz", "model.json"]
    with np.load(d / "maintenance.npz", allow_pickle=False) as z:   # plain arrays only
        assert str(z["kind"]) == "mean"
    meta = json.loads((d / "model.json").read_text())
    assert meta["kind"] == "maintenance" and meta["version"] == 3
    m = load_maintenance_model(d)
    raw = m.raw_proba(ds.X)
    risk = m.risk(ds.X)
    assert np.all((risk >= 0) & (risk <= 1))
    order = np.argsort(raw)                      # isotonic: the calibrated risk never reverses the order
    assert np.all(np.diff(risk[order]) >= -1e-12)
    from sklearn.isotonic import IsotonicRegression
    ca = masks["calib"]
    iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(m.raw_proba(ds.X[ca]), ds.y[ca])
    assert np.abs(iso.predict(raw) - risk).max() <= 1e-9
    # path contributions add up to the raw probability minus the mean root value
    x = ds.X[int(np.argmax(raw))]
    c = path_contributions(m.forest, x)
    roots = m.forest.value[m.forest.tree_offsets[:-1], 1].mean()
    assert abs(c.sum() - (m.raw_proba(x)[0] - roots)) <= 1e-9
    top = m.top_features(x, 3)
    assert top and all(t["feature"] in m.feature_names and t["contribution"] > 0 for t in top)


def test_loader_refuses_inconsistent_models(tmp_path):
    d, _, _ = trained(tmp_path / "m")
    meta = json.loads((d / "model.json").read_text())
    meta["feature_names"] = meta["feature_names"][:-1]
    (d / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError):
        load_maintenance_model(d)


def test_features_read_nothing_after_the_scoring_time():
    ts = 1_700_000_000.0 + np.arange(400) * 300.0
    mem = np.linspace(40, 90, 400)
    names = feature_names()
    a = window_features(ts, {"system.memoryPercent": mem}, ts[200], names)
    mem2 = mem.copy()
    mem2[201:] = 0.0
    b = window_features(ts, {"system.memoryPercent": mem2}, ts[200], names)
    np.testing.assert_array_equal(a, b)
    i = names.index("system.memoryPercent|slope6h")
    assert a[i] == pytest.approx(50 / 399 * 12, rel=1e-9)      # per hour


def test_a_held_out_slice_without_failures_is_named_not_reported_as_precision_zero():
    from fleet.maintenance import holdout_warnings, train
    from tests.maintenance_helpers import PARAMS, dataset

    ds = dataset()
    masks = split(ds, PARAMS)
    _, meta = train(ds, PARAMS, masks)
    assert meta["holdout"]["positives"] > 0 and holdout_warnings(meta) == []
    no_failures = dict(masks, test=masks["test"] & (ds.y == 0))   # the same slice, failure rows left out
    _, meta = train(ds, PARAMS, no_failures)
    assert meta["holdout"]["positives"] == 0
    [warning] = holdout_warnings(meta)
    assert "holds no failure rows" in warning and "mean nothing" in warning
    empty = dict(masks, test=np.zeros(len(ds.y), bool))
    _, meta = train(ds, PARAMS, empty)
    assert "not evaluated" in holdout_warnings(meta)[0]
