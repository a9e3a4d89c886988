"""MQTT outbox throughput: drain a 10,000-message outbox (real SQLite file) to a local Mosquitto.

    .venv/bin/python bench/mqtt.py [--messages 10000] [--windows 20,100]

Prints, per in-flight window: enqueue rate (each message its own committed
transaction), drain rate (publish -> PUBACK -> row deleted), and CPU seconds
per message from resource.getrusage (process total: main loop + paho thread).
Starts its own mosquitto (MOSQUITTO env or /usr/sbin/mosquitto) on a free port.
"""
from __future__ import annotations

import argparse
import os
import pwd
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import payloads  # noqa: E402
from agent.outbox import OutboxParams  # noqa: E402
from agent.store import connect  # noqa: E402
from agent.transport import MqttParams, MqttReporter  # noqa: E402

METRICS = {f"system.metric{i:02d}": 1000.0 + i * 1.5 for i in range(24)}


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def start_broker(workdir: Path) -> tuple[subprocess.Popen, int]:
    exe = os.environ.get("MOSQUITTO") or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
                    f"allow_anonymous true\nlistener {port} 127.0.0.1\n"
                    f"log_dest file {workdir / 'mosquitto.log'}\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit("mosquitto did not start")


def run(workdir: Path, port: int, n: int, window: int, protocol: str) -> dict:
    db = workdir / f"outbox-{window}-{protocol}.db"
    conn = connect(db)
    params = MqttParams(host="127.0.0.1", port=port, max_inflight=window, drain_budget_s=0.2, protocol=protocol,
                        reconnect_min_s=0.05, reconnect_max_s=0.5)
    rep = MqttReporter(params, OutboxParams(max_rows=n + 10, max_bytes=1 << 30),
                       device_id="bench-1", conn=conn)
    # Fill while disconnected (not started), as after an outage.
    c0, t0 = cpu_s(), time.perf_counter()
    for i in range(n):
        doc = payloads.telemetry_batch("bench-1", 1.7e9 + i, [(1.7e9 + i, METRICS)], interval_s=1.0)
        rep.enqueue("telemetry", doc, 0)
    enqueue_s, enqueue_cpu = time.perf_counter() - t0, cpu_s() - c0
    size = rep.outbox.bytes
    rep.start()
    while not rep.connected:
        rep.tick(time.monotonic())
        time.sleep(0.005)
    c0, t0 = cpu_s(), time.perf_counter()
    while rep.outbox.depth:
        rep.tick(time.monotonic())
    drain_s, drain_cpu = time.perf_counter() - t0, cpu_s() - c0
    acked = rep.status()["mqtt"]["acked"]
    rep.stop()
    conn.close()
    return {"window": window, "enqueue_s": enqueue_s, "enqueue_cpu": enqueue_cpu, "drain_s": drain_s,
            "drain_cpu": drain_cpu, "acked": acked, "bytes": size, "db_bytes": db.stat().st_size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--windows", default="20,100")
    ap.add_argument("--protocol", default="3.1.1", choices=("3.1.1", "5"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        workdir = Path(tmp)
        proc, port = start_broker(workdir)
        try:
            print(f"outbox drain to local mosquitto, {args.messages} telemetry messages "
                  f"(~{len(payloads.encode(payloads.telemetry_batch('bench-1', 1.7e9, [(1.7e9, METRICS)])))} "
                  f"bytes each), QoS 1, MQTT {args.protocol}, SQLite WAL synchronous=NORMAL")
            for window in (int(w) for w in args.windows.split(",")):
                r = run(workdir, port, args.messages, window, args.protocol)
                n = args.messages
                assert r["acked"] == n, r
                print(f"window {window:>4}: enqueue {n / r['enqueue_s']:8.0f} msg/s "
                      f"({r['enqueue_cpu'] / n * 1e6:6.1f} us CPU/msg) | drain {n / r['drain_s']:8.0f} msg/s "
                      f"({r['drain_cpu'] / n * 1e6:6.1f} us CPU/msg, {r['drain_s']:.2f} s, "
                      f"{r['drain_cpu']:.2f} CPU s) | payload {r['bytes'] / 1e6:.1f} MB, "
                      f"db file {r['db_bytes'] / 1e6:.1f} MB")
        finally:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
