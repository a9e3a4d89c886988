"""PostgreSQL fleet store sizing: bytes per sample row, index bytes, insert rate, partitions.

    .venv/bin/python bench/fleet_store.py [--devices 1000] [--batches 10]

A throwaway PostgreSQL server (tests/pg.py, fsync off), the partitioned schema of
fleet/store.py, then ``devices x batches`` telemetry messages of the agent's shape
(12 samples x 8 metrics each) ingested 500 messages per transaction, the
collector's batch. Printed: sample rows, rows/s, heap and index bytes per row
(pg_relation_size over the partitions), partitions touched. Figures for 100k
devices in the README are these bytes/row times the row count: extrapolated.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.store import Incoming, open_store  # noqa: E402
from tests.pg import PostgresServer, find_bindir  # noqa: E402

METRICS = ("system.cpuUsage", "system.memoryUsed", "system.memoryTotal", "system.diskUsed", "system.diskTotal",
           "system.uptime", "network.bytesReceived", "network.bytesSent")
BATCH_MESSAGES = 500


def messages(devices: int, batches: int, start_s: float) -> list[Incoming]:
    out = []
    for b in range(batches):
        for d in range(devices):
            t0 = start_s + 60.0 * b
            rows = tuple((t0 + 5.0 * i, {m: float(1000 * d + 10 * b + i + k) for k, m in enumerate(METRICS)})
                         for i in range(12))
            out.append(Incoming(f"d{d}-b{b}", f"dev-{d:06d}", "telemetry", rows[-1][0], {"kind": "telemetry"}, rows))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=10)
    args = ap.parse_args()
    bindir = find_bindir()
    if bindir is None:
        print("PostgreSQL server binaries not found: install the 'postgresql' package", file=sys.stderr)
        return 2
    server = PostgresServer(bindir)
    try:
        server.start()
        url = server.create_database()
        with open_store(url) as store:
            todo = messages(args.devices, args.batches, time.time() - 3600.0)
            t0 = time.perf_counter()
            for i in range(0, len(todo), BATCH_MESSAGES):
                store.ingest(todo[i:i + BATCH_MESSAGES])
            elapsed_s = time.perf_counter() - t0
            store.execute("ANALYZE samples")
            rows = int(store.one("SELECT COUNT(*) FROM samples")[0])
            parts = [p[0] for p in store.partitions()]
            heap = sum(int(store.one(f"SELECT pg_table_size('{p}')")[0]) for p in parts)
            index = sum(int(store.one(f"SELECT pg_indexes_size('{p}')")[0]) for p in parts)
            msg_bytes = int(store.one("SELECT pg_total_relation_size('messages')")[0])
        print(f"{'messages':>9} {'rows':>8} {'rows/s':>8} {'msg/s':>7} {'heap B/row':>10} {'index B/row':>11} "
              f"{'messages B/msg':>14} {'partitions':>10}")
        print(f"{len(todo):>9} {rows:>8} {rows / elapsed_s:>8.0f} {len(todo) / elapsed_s:>7.0f} {heap / rows:>10.0f} "
              f"{index / rows:>11.0f} {msg_bytes / len(todo):>14.0f} {len(parts):>10}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
