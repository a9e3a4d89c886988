"""Shared by the fleet tests: the fleet-loop CLI in-process, synthetic telemetry, ingestion."""
from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from fleet.cli import GLOBAL_OPTIONS
from fleet.commands import register
from fleet.store import Incoming


def fleet_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edge-fleet")
    handlers = register(parser.add_subparsers(dest="command", required=True))
    args = GLOBAL_OPTIONS.parse(GLOBAL_OPTIONS.install(parser), argv)   # --config, -v as edge-fleet has them
    return handlers[args.command](args)


def rows(start: float, n: int, regime: dict, seed: int) -> list[tuple[float, dict[str, float]]]:
    """One row a minute; ``regime`` maps a metric to its (mean, sd)."""
    rng = np.random.default_rng(seed)
    return [(start + 60.0 * i, {k: float(rng.normal(m, s)) for k, (m, s) in regime.items()}) for i in range(n)]


def ingest(store: Any, device: str, data: list, tag: str) -> None:
    """Store ``data`` as telemetry batches of 100 rows, as the collector would."""
    store.ingest([Incoming(f"{device}-{tag}-{k}", device, "telemetry", data[k][0], {}, tuple(data[k:k + 100]))
                  for k in range(0, len(data), 100)])
