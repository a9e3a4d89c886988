"""A small maintenance model trained on a simulated fleet (shared by the maintenance tests)."""
from functools import lru_cache

from fleet.maintenance import MaintenanceParams, build_dataset, histories_from_fleet, split, train, write_model
from fleet.simulate import SimParams, simulate_fleet

PARAMS = MaintenanceParams(n_estimators=25, max_depth=6, holdout_device_share=0.0)


@lru_cache(maxsize=1)
def small_fleet():
    return simulate_fleet(SimParams(devices=15, days=10, seed=21, failure_rate_per_device_day=0.15))


@lru_cache(maxsize=1)
def dataset():
    return build_dataset(histories_from_fleet(small_fleet()), p=PARAMS)


def trained(out_dir):
    ds = dataset()
    masks = split(ds, PARAMS)
    forest, meta = train(ds, PARAMS, masks)
    return write_model(out_dir, forest, meta, version=3), ds, masks
