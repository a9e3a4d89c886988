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
