import numpy as np
import pytest

from models.zscore import RollingZScore, ZScoreParams, robust_center_scale, rolling_zscores


def _series(n=400, seed=1):
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.normal(50, 5, n), rng.exponential(2.0, n), np.full(n, 7.0)])
    return X


def test_no_z_before_warmup_then_robust_z():
    p = ZScoreParams(window=100, warmup=20)
    zs = RollingZScore(3, p)
    X = _series()
    out = [zs.update(x) for x in X[:20]]
    assert all((z == 0).all() for z in out) and zs.ready
    x = np.array([90.0, 2.0, 7.0])
    z = zs.update(x)
    med = np.median(X[:20], axis=0)
    mad = np.median(np.abs(X[:20] - med), axis=0)
    assert z[0] == pytest.approx((90.0 - med[0]) / (1.4826 * mad[0]))
    assert z[0] > 4 and abs(z[1]) < 3


def test_sample_is_scored_against_the_past_only():
    p = ZScoreParams(window=50, warmup=10)
    zs = RollingZScore(1, p)
    for v in np.random.default_rng(0).normal(0, 1, 60):
        zs.update(np.array([v]))
    z = zs.update(np.array([100.0]))[0]
    med, scale = zs.center[0], zs.scale[0]
    assert z == pytest.approx((100.0 - med) / scale)
    assert z > 30


def test_outliers_do_not_move_the_baseline():
    """Median/MAD: a burst of spikes (under half the window) leaves the scale intact."""
    rng = np.random.default_rng(2)
    buf = rng.normal(0, 1, (200, 1))
    _, scale_clean = robust_center_scale(buf, ZScoreParams())
    buf[:40] = 1e6
    _, scale_spiky = robust_center_scale(buf, ZScoreParams())
    assert scale_spiky[0] < 2 * scale_clean[0]


def test_constant_series_gets_a_floor_not_a_division_by_zero():
    zs = RollingZScore(1, ZScoreParams(window=30, warmup=5))
    for _ in range(30):
        z = zs.update(np.array([7.0]))
    assert z[0] == 0.0
    z = zs.update(np.array([7.5]))[0]
    assert np.isfinite(z) and z > 10


@pytest.mark.parametrize("refresh_every", [1, 7])
def test_streaming_equals_batch(refresh_every):
    p = ZScoreParams(window=64, warmup=16, refresh_every=refresh_every)
    X = _series(300)
    X[100:105, 1] = np.nan           # a feature not reported for a while
    X[200] = np.nan                  # a fully missing row is not learnt
    zs = RollingZScore(3, p)
    stream = np.array([zs.update(x) for x in X])
    batch = rolling_zscores(X, p)
    np.testing.assert_allclose(stream, batch, rtol=0, atol=1e-9)
    assert (stream[100:105, 1] == 0).all()


def test_invalid_params():
    with pytest.raises(ValueError):
        ZScoreParams(window=1)


def test_feature_never_observed_is_silent_and_scores_zero():
    """No temperature sensor: an always-absent feature gives z = 0 and no numpy RuntimeWarning
    (run under warnings-as-errors, as `pytest -W error::RuntimeWarning` does for the whole file)."""
    import warnings

    from models.detect import Detector

    rng = np.random.default_rng(2)
    X = np.column_stack([rng.normal(10, 1, 120), np.full(120, np.nan)])
    X[5:8, 0] = np.nan  # a partly missing column takes the NaN path too
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        med, scale = robust_center_scale(X, ZScoreParams())
        z = rolling_zscores(X, ZScoreParams(window=50, warmup=10))
        det = Detector()   # default features include system.temperature, swap, rates: all absent here
        for i in range(120):
            row, _ = det.update(float(i), {"system.cpuUsage": float(X[i, 0]) if i not in (5, 6, 7) else 10.0})
    assert np.isnan(med[1]) and np.isnan(scale[1]) and np.isfinite(med[0]) and scale[0] > 0
    assert (z[:, 1] == 0).all() and np.abs(z[10:, 0]).max() > 0
    assert row.severity == "normal" and np.isfinite(row.anomaly_score)


def test_daily_profile_flags_a_value_wrong_for_the_hour_only():
    """A daily cycle (busy 9-17 h, idle at night): an idle value at noon is normal for the rolling
    window (it saw idle hours) but 'wrong for the hour' for the daily profile."""
    from models.zscore import DailyProfileParams, DailyProfileZ

    rng = np.random.default_rng(4)
    step_s = 300.0                                       # 5-minute samples: 12 per hourly slot per day
    prof = DailyProfileZ(1, DailyProfileParams(memory_days=4.0, min_days=1.5))
    zs = []
    for i in range(288 * 5):                              # five days
        ts = i * step_s
        hour = (ts % 86400) / 3600
        busy = 9 <= hour < 17
        v = (80.0 if busy else 10.0) + rng.normal(0, 2)
        if i == 288 * 4 + 144:                            # day 5, 12:00: idle although the day says busy
            v = 10.0
        zs.append(prof.update(ts, np.array([v]))[0])
    zs = np.abs(np.array(zs))
    assert (zs[: 288 + 5] == 0).all()                     # a slot needs 1.5 days of its own samples (18)
    anomaly = 288 * 4 + 144
    assert zs[anomaly] > 10 * np.quantile(zs[288 * 2:anomaly], 0.99)
    # the same value at midnight is ordinary
    assert zs[288 * 4 + 10] < 4


def test_daily_profile_adapts_its_memory_to_the_sampling_interval():
    """Memory and warm-up are in days: at 60 s sampling a slot needs 1.5 days of samples (90 of them)."""
    from models.zscore import DailyProfileParams, DailyProfileZ

    prof = DailyProfileZ(1, DailyProfileParams(min_days=1.5))
    first = [prof.update(i * 60.0, np.array([1.0 + (i % 3)]))[0] for i in range(1440 * 2)]
    assert all(z == 0 for z in first[:1440]) and any(z != 0 for z in first[1440 + 720:])
