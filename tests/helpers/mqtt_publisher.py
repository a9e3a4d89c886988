"""Runs an MqttReporter on a real SQLite file, for tests that kill -9 it.

    python mqtt_publisher.py --db PATH --port N [--count N] [--device-id ID]

Queues `count` telemetry messages {"seq": i, "run": RUN} (each committed before
the "ENQUEUED" line is printed), then ticks forever, printing
"STATUS <depth> <connected>" lines.  SIGTERM stops it cleanly (publishes
"offline").
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from agent.store import connect
from agent.transport import MqttParams, MqttReporter


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True, type=Path)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", required=True, type=int)
    ap.add_argument("--device-id", default="dev-proc")
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--run", default="r1")
    ap.add_argument("--max-inflight", type=int, default=10)
    ap.add_argument("--drain-budget-s", type=float, default=0.2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    conn = connect(args.db)
    params = MqttParams(host=args.host, port=args.port, keepalive_s=2, reconnect_min_s=0.05,
                        reconnect_max_s=0.5, max_inflight=args.max_inflight,
                        drain_budget_s=args.drain_budget_s)
    reporter = MqttReporter(params, device_id=args.device_id, conn=conn)
    reporter.start()
    for seq in range(args.count):
        reporter.enqueue("telemetry", {"seq": seq, "run": args.run}, 0)
    print("ENQUEUED", args.count, flush=True)
    last = 0.0
    while not stop:
        reporter.tick(time.monotonic())
        now = time.monotonic()
        if now - last > 0.1:
            st = reporter.status()
            print("STATUS", st["outbox"]["depth"], int(st["mqtt"]["connected"]), flush=True)
            last = now
        time.sleep(0.005)
    reporter.stop()
    conn.close()
    print("STOPPED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
