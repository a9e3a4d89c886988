"""Shared by the fleet tests: the fleet-loop CLI in-process, synthetic telemetry, ingestion, a collector thread."""
from __future__ import annotations

import argparse
import threading
from typing import Any

import numpy as np

from fleet.cli import GLOBAL_OPTIONS
from fleet.collect import Collector
from fleet.commands import register
from fleet.store import Incoming, open_store


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


class Running:
    """A collector thread on its own store connection."""

    def __init__(self, config: Any) -> None:
        self.stop = threading.Event()
        self.store = open_store(config.store_url, config.store.busy_timeout_s)
        self.collector = Collector(self.store, config)
        self.thread = threading.Thread(target=self.collector.run, args=(self.stop,), daemon=True)
        self.thread.start()
        assert self.collector.connected.wait(10), "collector did not connect"

    def close(self) -> None:
        self.stop.set()
        self.thread.join(20)
        assert not self.thread.is_alive()
        self.store.close()
