import math

import numpy as np
import pytest

from models.features import (DEFAULT_FEATURES, FeatureBuilder, build_matrix, derived_names, select_feature_names,
                             spec_from_names, transform_value)


def _rows(n=60, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        r = {"system.cpuUsage": float(rng.uniform(0, 100)), "system.memoryPercent": float(rng.uniform(20, 30)),
             "network.bytesReceivedPerSec": float(rng.exponential(1e5)), "network.bytesReceived": float(i * 1e6)}
        if i == 0 or i == 17:
            del r["network.bytesReceivedPerSec"]          # first sample / counter reset: rate absent
        if i == 30:
            r["system.memoryPercent"] = float("nan")
        rows.append(r)
    return rows


def test_rates_are_log1p_and_counters_rejected():
    assert transform_value("disk.readBytesPerSec", 1e6) == pytest.approx(math.log1p(1e6))
    assert transform_value("disk.readBytesPerSec", -5.0) == 0.0
    assert transform_value("system.cpuUsage", 42.0) == 42.0
    assert math.isnan(transform_value("system.cpuUsage", float("inf")))
    with pytest.raises(ValueError):
        spec_from_names(["network.bytesSent"])
    assert "network.bytesSent" not in DEFAULT_FEATURES and "disk.readBytes" not in DEFAULT_FEATURES


def test_missing_values_forward_filled_and_nan_until_seen():
    names = ("system.cpuUsage", "system.memoryPercent", "network.bytesReceivedPerSec")
    rows = _rows()
    m = build_matrix(rows, names)
    assert math.isnan(m[0, 2])                      # never seen yet
    assert m[17, 2] == m[16, 2]                     # absent -> last value
    assert m[30, 1] == m[29, 1]                     # NaN -> last value
    assert m[1, 2] == pytest.approx(math.log1p(rows[1]["network.bytesReceivedPerSec"]))


def test_streaming_equals_batch_with_window_stats():
    names = derived_names(("system.cpuUsage", "system.memoryPercent", "network.bytesReceivedPerSec"), 5)
    rows = _rows(80)
    batch = build_matrix(rows, names)
    fb = FeatureBuilder(names)
    stream = np.array([fb.update(r) for r in rows])
    assert stream.shape == batch.shape == (80, 12)
    np.testing.assert_allclose(stream, batch, rtol=0, atol=1e-9, equal_nan=True)
    # window stats are what they claim on a fully observed stretch
    i = 50
    cpu = np.array([r["system.cpuUsage"] for r in rows])
    assert batch[i, names.index("system.cpuUsage|mean5")] == pytest.approx(cpu[i - 4:i + 1].mean())
    assert batch[i, names.index("system.cpuUsage|std5")] == pytest.approx(cpu[i - 4:i + 1].std())
    assert batch[i, names.index("system.cpuUsage|diff1")] == pytest.approx(cpu[i] - cpu[i - 1])
    assert batch[0, names.index("system.cpuUsage|diff1")] == 0.0


def test_column_order_is_the_name_order():
    rows = _rows(10)
    a = build_matrix(rows, ("system.cpuUsage", "system.memoryPercent"))
    b = build_matrix(rows, ("system.memoryPercent", "system.cpuUsage"))
    np.testing.assert_array_equal(a[:, 0], b[:, 1])
    assert spec_from_names(("a", "a|mean3")).bases == ("a",)
    with pytest.raises(ValueError):
        spec_from_names(("a", "a"))


def test_select_feature_names_drops_absent_metrics():
    rows = [{"system.cpuUsage": 1.0, "system.load1": 0.5}] * 10
    assert select_feature_names(rows) == ("system.cpuUsage", "system.load1")
