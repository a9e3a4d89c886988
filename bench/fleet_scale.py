"""Collector scale: 1k / 5k / 10k simulated devices through a real Mosquitto into 1 and 3 collectors.

    .venv/bin/python bench/fleet_scale.py [--sizes 1000,5000,10000] [--collectors 1,3] [--no-kill]

Per run: a fresh mosquitto with the settings of fleet/mosquitto.example.conf, a
fresh SQLite fleet store, N ``edge-fleet collect`` processes (N > 1: members of
one ``$share/bench/...`` group, each with its own client id), then every
device's telemetry batches (12 samples x 8 metrics, the agent's payload) are
published QoS 1 from one publisher client. Printed per run:

    msg/s        messages stored per second, first publish to last stored
    loss         published message ids missing from the store after the collectors went quiet
    dup          duplicates the collectors dropped by message id (redeliveries)
    drops        the broker's own drop count ($SYS, as the collectors report it)
    CPU us/msg   CPU of all collector processes per stored message (less load-sensitive than msg/s)
    CPU s, RSS   CPU seconds (user + system) and peak RSS (VmHWM) per collector process

With 3 collectors a third run kills one collector (SIGKILL) once 30 % are stored
and restarts it with its client id (its persistent session holds its share).
Each size is bounded: 1k devices send 10 messages each, 5k send 2, 10k send 1 (10,000 in all).
Absolute rates depend on the machine and its load; compare rows of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import payloads  # noqa: E402
from fleet.collect import broker_settings  # noqa: E402
from fleet.store import open_store  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
METRICS = ("system.cpuUsage", "system.memoryPercent", "system.diskPercent", "system.load1",
           "system.temperature", "disk.writeBytesPerSec", "network.bytesSentPerSec", "system.processCount")
PER_DEVICE = {1000: 10, 5000: 2, 10000: 1}
ROWS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(workdir: Path) -> tuple[subprocess.Popen, int]:
    exe = os.environ.get("MOSQUITTO") or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join([f"user {pwd.getpwuid(os.geteuid()).pw_name}", "allow_anonymous true",
                               f"persistence_location {workdir}/", f"log_dest file {workdir / 'mosquitto.log'}",
                               "log_type error", "log_type warning", "log_type notice", "log_type subscribe",
                               *broker_settings(), f"listener {port} 127.0.0.1"]) + "\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait(lambda: _accepting(port), 10):
        proc.kill()
        raise SystemExit("mosquitto did not start")
    return proc, port


def _accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def messages(devices: int, per_device: int) -> list[tuple[str, bytes, str]]:
    """(topic, payload, message id), encoded before the clock starts."""
    out = []
    t0 = 1_700_000_000.0
    for d in range(devices):
        device = f"bench-{d:05d}"
        for k in range(per_device):
            start = t0 + k * ROWS * 60.0
            rows = [(start + 60.0 * i, {m: float((d + i + j) % 97) for j, m in enumerate(METRICS)})
                    for i in range(ROWS)]
            mid = f"{device}-t{k}"
            doc = payloads.telemetry_batch(device, start + ROWS * 60.0, rows, interval_s=60.0, message_id=mid)
            out.append((f"devices/{device}/telemetry", payloads.encode(doc), mid))
    return out


class CollectorProc:
    def __init__(self, conf: Path, client_id: str, workdir: Path) -> None:
        env = {**os.environ, "EDGE_FLEET_MQTT_CLIENT_ID": client_id, "PYTHONPATH": str(REPO)}
        self.client_id = client_id
        self.err = open(workdir / f"{client_id}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "collect", "--config", str(conf), "--json"],
                                     env=env, stdout=subprocess.PIPE, stderr=self.err, cwd=str(REPO))
        self.cpu_s = 0.0
        self.peak_rss_bytes = 0

    def usage(self) -> tuple[float, int]:
        """CPU seconds and peak RSS so far, from /proc (the process is still running)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        with open(f"/proc/{self.proc.pid}/status") as f:
            hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        return cpu, hwm

    def stop(self) -> dict:
        self.cpu_s, self.peak_rss_bytes = self.usage()
        self.proc.send_signal(signal.SIGTERM)
        out = self.proc.communicate(timeout=120)[0].decode()
        self.err.close()
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        self.cpu_s, self.peak_rss_bytes = self.usage()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.err.close()


def publish(port: int, msgs: list[tuple[str, bytes, str]]) -> None:
    import paho.mqtt.client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}")
    client.max_inflight_messages_set(200)
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    infos = [client.publish(topic, payload, qos=1) for topic, payload, _ in msgs]
    for info in infos:
        info.wait_for_publish(300)
    client.loop_stop()
    client.disconnect()
    if not all(i.is_published() for i in infos):
        raise SystemExit("the broker did not acknowledge every message")


def run(size: int, n_collectors: int, kill: bool, msgs: list[tuple[str, bytes, str]]) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="fleet-scale-"))
    broker, port = start_broker(workdir)
    conf = workdir / "fleet.toml"
    share = 'shared_group = "bench"\n' if n_collectors > 1 else ""
    conf.write_text(f'[fleet]\nstate_dir = "{workdir}"\nlog_level = "WARNING"\n[mqtt]\nhost = "127.0.0.1"\n'
                    f'port = {port}\n{share}[collect]\nflush_interval_s = 0.05\n')
    ids = [f"bench-collector-{i}" for i in range(n_collectors)]
    procs = [CollectorProc(conf, cid, workdir) for cid in ids]
    log = workdir / "mosquitto.log"
    try:
        if not wait(lambda: all(f"{cid} 1 " in log.read_text(errors="replace") for cid in ids), 60):
            raise SystemExit("collectors did not subscribe")
        store = open_store(f"sqlite:///{workdir / 'fleet.db'}")
        t0 = time.perf_counter()
        pub = threading.Thread(target=publish, args=(port, msgs))
        pub.start()
        retired: list[CollectorProc] = []
        if kill:
            wait(lambda: store.message_count() >= 0.3 * len(msgs), 300)
            procs[1].kill()
            retired.append(procs[1])
            procs[1] = CollectorProc(conf, ids[1], workdir)
        pub.join()
        # stored: until everything is there, or nothing new arrived for 15 s
        last, last_change = -1, time.monotonic()
        while True:
            n = store.message_count()
            if n >= len(msgs):
                break
            if n != last:
                last, last_change = n, time.monotonic()
            elif time.monotonic() - last_change > 15:
                break
            time.sleep(0.1)
        elapsed = time.perf_counter() - t0
        stored = store.message_count()
        store.close()
        stats = [p.stop() for p in procs]
        everyone = procs + retired
        return {"devices": size, "collectors": n_collectors, "killed": kill, "published": len(msgs),
                "stored": stored, "loss": len(msgs) - stored, "msg_per_s": stored / elapsed,
                "duplicates": sum(s["duplicates"] for s in stats),
                "broker_dropped": max([s["broker_dropped"] for s in stats] or [0]),
                "cpu_us_per_msg": 1e6 * sum(p.cpu_s for p in everyone) / max(stored, 1),
                "cpu_s": [round(p.cpu_s, 1) for p in everyone],
                "rss_mib": [round(p.peak_rss_bytes / 2 ** 20, 1) for p in everyone], "elapsed_s": elapsed}
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,5000,10000")
    ap.add_argument("--collectors", default="1,3")
    ap.add_argument("--no-kill", action="store_true", help="skip the run with a collector killed")
    args = ap.parse_args()
    print(f"{'devices':>7} {'coll':>4} {'kill':>4} {'msgs':>6} {'msg/s':>7} {'loss':>4} {'dup':>4} {'drops':>5} {'us/msg':>6}  "
          f"CPU s per collector / RSS MiB per collector")
    for size in (int(s) for s in args.sizes.split(",")):
        msgs = messages(size, PER_DEVICE.get(size, max(1, 10_000 // size)))
        for n in (int(c) for c in args.collectors.split(",")):
            for kill in ([False, True] if n > 1 and not args.no_kill else [False]):
                r = run(size, n, kill, msgs)
                print(f"{r['devices']:>7} {r['collectors']:>4} {'yes' if kill else 'no':>4} {r['published']:>6} "
                      f"{r['msg_per_s']:>7.0f} {r['loss']:>4} {r['duplicates']:>4} {r['broker_dropped']:>5} {r['cpu_us_per_msg']:>6.0f}  "
                      f"{r['cpu_s']} / {r['rss_mib']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
