"""Shared set-up for the clustering tests: a small simulated fleet and its fitted clusters."""
from __future__ import annotations

from functools import lru_cache

from fleet.clusters import ClusterParams, ClusterResult, build_profiles, fit_clusters
from fleet.simulate import SimParams, SimulatedFleet, simulate_fleet

SMALL = SimParams(devices=18, days=5, seed=3, step_s=600.0, failure_rate_per_device_day=0.0, use_nab=False)


@lru_cache(maxsize=4)
def small_fleet(params: SimParams = SMALL) -> SimulatedFleet:
    return simulate_fleet(params)


def histories(fleet: SimulatedFleet) -> dict:
    return {d.device_id: (d.ts_s, d.values) for d in fleet.devices}


@lru_cache(maxsize=4)
def small_result(params: SimParams = SMALL) -> ClusterResult:
    cp = ClusterParams()
    return fit_clusters(build_profiles(histories(small_fleet(params)), cp), cp)
