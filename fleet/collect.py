"""``edge-fleet collect``: subscribe to every device's messages and store them, deduplicated.

Threads: paho runs its network loop on its own thread and its ``on_message``
only puts (topic, payload, mid) on a bounded queue; the writer (``run``/``pump``,
the caller's thread) parses, batches and writes to the store.

Acknowledgement: paho's manual ack mode. A message's PUBACK is sent only after
the transaction holding it (or the count of it as bad) has committed, so a
collector that crashes or loses its store never loses a message: the broker
still holds every unacknowledged one and redelivers it on reconnect. This also
throttles the broker to what the store absorbs (it keeps at most its in-flight
window, 20 by default in Mosquitto, unacknowledged), which is why a batch is
written as soon as the queue goes quiet rather than on a fixed period.

The MQTT session is persistent (clean session off, a client id that is stable
across restarts), so messages published while the collector is down wait in the
broker's queue for it. Delivery is at least once: duplicates (a redelivered QoS 1
message, the retained twin redelivered on each reconnect, a message a killed
member of a shared group had in flight) are dropped by message id in the store.

Scale-out: with ``mqtt.shared_group`` every collector subscribes to
``$share/<group>/<filter>`` and the broker hands each message to one member.
Routing always uses the message's own topic (the broker delivers the real topic,
not the filter). Each member needs its own client id: two clients with one id
take the session from each other (MQTT 5 says so with reason 142, logged as an
error). Mosquitto 2.0 keeps the messages in flight to a member that vanished in
that member's persistent session, so a collector that is killed must come back
with the same client id to hand them over (README "Broker settings").

Broker-side loss: a broker drops QoS 1 messages for a session whose queue is
full (Mosquitto ``max_queued_messages``). Those never reach any client, so the
collector watches the broker's ``$SYS/broker/publish/messages/dropped`` counter
and reports every increase (``broker_dropped`` in its stats, ``broker.dropped``
in the store's counters, a warning in the log).

A bad message (not JSON, no message id, a device id that differs from the
topic's, a malformed body, too large, a topic it cannot route) is kept in the
store's ``bad_messages`` table (topic, reason, payload) in the same transaction
as the good ones, counted under ``bad.<reason>`` and logged at most once a
minute per reason, and only then acknowledged: never acked and dropped. A store
error that is not about the connection is pinned down to the message that causes
it (the batch is retried one message at a time) and that message is kept as bad
with reason ``store``; a lost connection is retried with backoff.
"""
from __future__ import annotations

import base64
import json
import logging
import math
import queue
import re
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from agent.topics import DEFAULT_TEMPLATES, PRESETS
from fleet.config import FleetConfig, FleetConfigError
from fleet.store import SEVERITIES, Incoming, Store, StoreError, iso_to_s, open_store

log = logging.getLogger(__name__)

# message kind (payload "kind") -> the agent's topic template kind
TOPIC_KINDS = {"telemetry": "telemetry", "anomaly": "anomaly", "forecast": "forecast", "twin": "twin",
               "model": "model"}
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_ROWS = 100_000
QUIET_S = 0.02          # a batch is written once no message came for this long
SYS_DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"
SESSION_TAKEN_OVER = 142   # MQTT 5 disconnect reason: another client connected with this client id
QUICK_DISCONNECT_S = 5.0
_GROUP_RE = re.compile(r"^[^/+#$\s][^/+#\s]*$")
BAD_MIGRATIONS = [
    """
    CREATE TABLE bad_messages (
        id {pk}, received_s {real} NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL,
        size_bytes {int} NOT NULL, payload_b64 TEXT NOT NULL);
    CREATE INDEX bad_messages_received ON bad_messages (received_s)
    """,
]


class BadMessage(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TopicRoute:
    kind: str
    pattern: re.Pattern
    subscription: str


def routes(topic_prefix: str = "devices/{device_id}") -> list[TopicRoute]:
    """One (kind, regex, wildcard subscription) per device topic the fleet listens to.

    Built from the agent's own templates, for the configured prefix and for the
    origin preset's twin topic, so the two sides cannot disagree on names."""
    if topic_prefix.startswith("$share/"):
        raise FleetConfigError("mqtt.topic_prefix: a $share/<group>/ filter is not a topic prefix; "
                               "set mqtt.shared_group instead")
    out: list[TopicRoute] = []
    templates = [(k, DEFAULT_TEMPLATES[k]) for k in TOPIC_KINDS.values()]
    templates += [(k, t) for k, t in PRESETS["origin"].items() if k in TOPIC_KINDS.values()]
    seen: set[str] = set()
    for kind, tpl in templates:
        full = tpl.replace("{prefix}", topic_prefix.rstrip("/"))
        if "{device_id}" not in full:
            raise ValueError(f"topic template {full!r} has no {{device_id}}")
        sub = full.replace("{device_id}", "+")
        if sub in seen:
            continue
        seen.add(sub)
        regex = "^" + re.escape(full).replace(re.escape("{device_id}"), "(?P<device>[^/]+)") + "$"
        out.append(TopicRoute(kind, re.compile(regex), sub))
    return out


def subscription_filters(table: Sequence[TopicRoute], shared_group: str = "") -> list[str]:
    """The filters to subscribe: plain, or each as a member of ``$share/<group>/``."""
    if shared_group and not _GROUP_RE.match(shared_group):
        raise FleetConfigError(f"mqtt.shared_group: {shared_group!r} must be one topic level without +, # or /")
    return [f"$share/{shared_group}/{r.subscription}" if shared_group else r.subscription for r in table]


def resolve_client_id(template: str, hostname: str | None = None) -> str:
    """``{hostname}`` in the configured client id -> this host's name (stable across restarts)."""
    host = hostname if hostname is not None else socket.gethostname()
    client_id = template.replace("{hostname}", re.sub(r"[^A-Za-z0-9._-]", "-", host) or "host")
    if not client_id or len(client_id.encode()) > 65535:
        raise FleetConfigError("mqtt.client_id: must not be empty")
    return client_id


def broker_drop_delta(value: int, last: int | None) -> int:
    """How many new drops a reading of the broker's cumulative counter shows after the last one.

    No earlier reading: all of them (drops before the first collector ran are drops too). A
    counter that went down means the broker restarted and counts from zero again."""
    if last is None or value < last:
        return value
    return value - last


def route_of(topic: str, table: Sequence[TopicRoute]) -> tuple[str, str] | None:
    for r in table:
        m = r.pattern.match(topic)
        if m:
            return r.kind, m.group("device")
    return None


# -- parsing (pure) --------------------------------------------------------------------------
def _telemetry_samples(doc: Mapping[str, Any]) -> tuple[tuple[float, dict[str, float]], ...]:
    cols, rows = doc.get("columns"), doc.get("rows")
    if not isinstance(cols, list) or not cols or cols[0] != "ts_s" or \
            not all(isinstance(c, str) and c for c in cols):
        raise BadMessage("telemetry", "columns must be a list of names starting with 'ts_s'")
    if len(set(cols)) != len(cols):
        raise BadMessage("telemetry", "duplicate column names")
    if not isinstance(rows, list) or len(rows) > MAX_ROWS:
        raise BadMessage("telemetry", "rows must be a list (at most 100000)")
    out = []
    for row in rows:
        if not isinstance(row, list) or len(row) != len(cols):
            raise BadMessage("telemetry", f"a row has {len(row) if isinstance(row, list) else '?'} cells "
                                          f"for {len(cols)} columns")
        ts = row[0]
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            raise BadMessage("telemetry", f"row timestamp {ts!r} is not a number")
        values = {}
        for name, v in zip(cols[1:], row[1:]):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                values[name] = float(v)
        out.append((float(ts), values))
    return tuple(out)


def _check_body(kind: str, doc: Mapping[str, Any]) -> None:
    if kind == "anomaly":
        if not isinstance(doc.get("id"), str) or not doc["id"]:
            raise BadMessage("anomaly", "no episode id")
        if doc.get("severity") not in SEVERITIES:
            raise BadMessage("anomaly", f"severity {doc.get('severity')!r} not in {SEVERITIES}")
        if iso_to_s(doc.get("startedAt")) is None:
            raise BadMessage("anomaly", "startedAt is not a time")
    elif kind == "forecast":
        if not isinstance(doc.get("metric"), str) or iso_to_s(doc.get("origin")) is None:
            raise BadMessage("forecast", "needs a metric and an origin time")
        if not isinstance(doc.get("values"), list):
            raise BadMessage("forecast", "values must be a list")
    elif kind == "twin":
        state = doc.get("state")
        if not isinstance(state, Mapping) or not isinstance(state.get("reported"), Mapping):
            raise BadMessage("twin", "no state.reported object")


def parse_message(topic: str, payload: bytes, table: Sequence[TopicRoute],
                  max_bytes: int = 4 * 1024 * 1024) -> Incoming:
    """Bytes from a device topic -> a validated Incoming; BadMessage says why not."""
    if len(payload) > max_bytes:
        raise BadMessage("too_large", f"{len(payload)} bytes")
    route = route_of(topic, table)
    if route is None:
        raise BadMessage("topic", f"unexpected topic {topic!r}")
    kind, topic_device = route
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadMessage("json", str(exc)) from None
    if not isinstance(doc, dict):
        raise BadMessage("json", "not a JSON object")
    message_id, device_id = doc.get("messageId"), doc.get("deviceId")
    if not isinstance(message_id, str) or not _ID_RE.match(message_id):
        raise BadMessage("envelope", f"messageId {message_id!r} missing or invalid")
    if device_id != topic_device:
        raise BadMessage("device_mismatch", f"deviceId {device_id!r} on the topic of {topic_device!r}")
    if not isinstance(device_id, str) or not _ID_RE.match(device_id):
        raise BadMessage("envelope", f"deviceId {device_id!r} invalid")
    if doc.get("kind") not in (None, kind):
        raise BadMessage("envelope", f"kind {doc.get('kind')!r} on a {kind} topic")
    ts_s = iso_to_s(doc.get("timestamp"))
    if doc.get("timestamp") is not None and ts_s is None:
        raise BadMessage("envelope", f"timestamp {doc.get('timestamp')!r} is not a time")
    _check_body(kind, doc)
    samples = _telemetry_samples(doc) if kind == "telemetry" else ()
    return Incoming(message_id, device_id, kind, ts_s, doc, samples, topic)


# -- the collector ---------------------------------------------------------------------------
def _transient(exc: BaseException) -> bool:
    """A lost connection or a locked database: retry the batch later. Anything else: the data."""
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return "locked" in text or "busy" in text or "disk i/o" in text or "unable to open" in text
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))


@dataclass
class CollectorStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    samples: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    store_errors: int = 0
    broker_dropped: int = 0          # drops the broker's $SYS counter showed while this collector ran

    def as_dict(self) -> dict[str, Any]:
        return {"received": self.received, "stored": self.stored, "duplicates": self.duplicates,
                "samples": self.samples, "bad": dict(self.bad), "bad_total": sum(self.bad.values()),
                "store_errors": self.store_errors, "broker_dropped": self.broker_dropped}


@dataclass(frozen=True)
class BadRecord:
    """A message kept as bad: enough to inspect or replay it."""
    received_s: float
    topic: str
    reason: str
    detail: str
    size_bytes: int
    payload: bytes          # at most collect.max_message_bytes of it


class Collector:
    def __init__(self, store: Store, config: FleetConfig, *,
                 reopen: Callable[[], Store] | None = None) -> None:
        self.store = store
        self.config = config
        self.params = config.collect
        self.routes = routes(config.mqtt.topic_prefix)
        self.filters = subscription_filters(self.routes, config.mqtt.shared_group)
        self.client_id = resolve_client_id(config.mqtt.client_id)
        self.stats = CollectorStats()
        self.connected = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=self.params.max_queue)
        self._client: Any = None
        self._reopen = reopen
        self._last_bad_log: dict[str, float] = {}
        self._pending: list[Incoming] = []
        self._unsaved_bad: dict[str, int] = {}
        self._bad_rows: list[BadRecord] = []
        self._unacked: list[tuple[int, int]] = []       # (mid, qos) of every message taken, until committed
        self._drop_reading: int | None = None           # latest unsaved reading of the broker's drop counter
        self._connected_at = -math.inf
        self._quick_disconnects = 0
        store.migrate("collect_bad", BAD_MIGRATIONS)

    # -- MQTT (paho thread: queue only) ---------------------------------------------------
    def start(self) -> None:
        import paho.mqtt.client as paho

        m = self.config.mqtt
        v5 = m.protocol == "5"
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             clean_session=None if v5 else False,
                             protocol=paho.MQTTv5 if v5 else paho.MQTTv311, manual_ack=True)
        if m.username:
            client.username_pw_set(m.username, m.password or None)
        if m.tls_ca or m.tls_cert:
            client.tls_set(ca_certs=m.tls_ca or None, certfile=m.tls_cert or None, keyfile=m.tls_key or None)
        client.reconnect_delay_set(1, 60)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        kwargs: dict[str, Any] = {}
        if v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 7 * 86400
            props.ReceiveMaximum = m.receive_maximum
            kwargs = {"clean_start": False, "properties": props}
        client.connect_async(m.host, m.port, m.keepalive_s, **kwargs)
        client.loop_start()
        self._client = client
        log.info("collector connecting to %s:%d as %s; topics %s", m.host, m.port, self.client_id,
                 ", ".join(self.filters))

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the collector: %s", reason)
            return
        subs = [(f, 1) for f in self.filters]
        if self.config.mqtt.watch_broker_drops:
            subs.append((SYS_DROPPED_TOPIC, 0))
        client.subscribe(subs)
        self._connected_at = time.monotonic()
        self.connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        """Two collectors with one client id take the session from each other in turn: MQTT 5
        brokers may say so (reason 142); Mosquitto 2.0 just closes the socket, so a run of
        disconnects within seconds of connecting is reported as the likely cause."""
        self.connected.clear()
        quick = time.monotonic() - self._connected_at < QUICK_DISCONNECT_S
        self._quick_disconnects = self._quick_disconnects + 1 if quick else 0
        if getattr(reason, "value", None) == SESSION_TAKEN_OVER or self._quick_disconnects == 3:
            log.error("collector %r keeps losing its session (%s): another client probably connects with the "
                      "same client id; give every collector its own mqtt.client_id", self.client_id, reason)
        elif quick:
            log.warning("collector %r lost its connection %.1f s after connecting (%s)", self.client_id,
                        time.monotonic() - self._connected_at, reason)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self._queue.put((msg.topic, bytes(msg.payload), msg.mid, msg.qos))  # blocks when full: backpressure

    def submit(self, topic: str, payload: bytes, mid: int = 0, qos: int = 0) -> None:
        """Hand one message to the writer, as the MQTT thread does."""
        self._queue.put((topic, payload, mid, qos))

    def stop(self) -> None:
        """Write what was taken (acknowledging it), then disconnect; what could not be written
        stays unacknowledged and the broker delivers it again to the next collector."""
        self.pump(0.0)
        self.flush()
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    # -- writer (caller's thread) ---------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> Incoming | None:
        """Parse one message; a bad one is counted and logged, and None returned."""
        self.stats.received += 1
        try:
            return parse_message(topic, payload, self.routes, self.params.max_message_bytes)
        except BadMessage as exc:
            self._bad(exc.reason, f"{topic}: {exc.detail}", topic, payload)
        except Exception as exc:  # noqa: BLE001 - a parser bug must not stop collection
            log.exception("unexpected error parsing a message on %s", topic)
            self._bad("internal", f"{topic}: {type(exc).__name__}", topic, payload)
        return None

    def _broker_reading(self, payload: bytes) -> None:
        """A reading of the broker's cumulative drop counter (retained $SYS, every sys_interval);
        compared with the store's last reading when written, so collectors sharing a store and a
        broker count each drop once."""
        try:
            self._drop_reading = int(payload.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            log.debug("unreadable %s payload %r", SYS_DROPPED_TOPIC, payload[:40])

    def _bad(self, reason: str, detail: str, topic: str = "", payload: bytes = b"") -> None:
        self.stats.bad[reason] = self.stats.bad.get(reason, 0) + 1
        self._unsaved_bad[reason] = self._unsaved_bad.get(reason, 0) + 1
        self._bad_rows.append(BadRecord(time.time(), topic, reason, detail[:1000], len(payload),
                                        payload[:self.params.max_message_bytes]))
        now = time.monotonic()
        if now - self._last_bad_log.get(reason, -math.inf) >= 60.0:
            self._last_bad_log[reason] = now
            log.warning("bad message (%s): %s [%d so far]", reason, detail[:300], self.stats.bad[reason])

    def pump(self, timeout_s: float) -> int:
        """Move queued messages into the pending batch, writing full batches; returns messages taken.

        While the store refuses a full batch nothing more is taken off the queue, so the
        queue fills and paho's thread blocks: the broker keeps the rest."""
        taken = 0
        deadline = time.monotonic() + timeout_s
        while len(self._pending) < self.params.batch_size or self.flush():
            # wait up to the deadline for the first message, then only while more keep coming
            wait = deadline - time.monotonic() if not taken else min(QUIET_S, deadline - time.monotonic())
            try:
                topic, payload, mid, qos = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            taken += 1
            self._unacked.append((mid, qos))
            if topic == SYS_DROPPED_TOPIC:
                self._broker_reading(payload)
                continue
            item = self.handle(topic, payload)
            if item is not None:
                self._pending.append(item)
        return taken

    def flush(self) -> bool:
        """Write the pending batch (and the bad-message counts); False when the store is unavailable."""
        if not self._pending and not self._unsaved_bad and self._drop_reading is None:
            self._ack()
            return True
        batch = self._pending
        try:
            self._write(batch)
        except Exception as exc:  # noqa: BLE001 - classified below; the collector keeps running
            if _transient(exc) or isinstance(exc, StoreError):
                self.stats.store_errors += 1
                log.warning("store unavailable (%s); %d messages wait", exc, len(batch))
                self._recover()
                return False
            log.warning("store refused a batch of %d (%s: %s); retrying one by one", len(batch),
                        type(exc).__name__, exc)
            for item in batch:
                try:
                    self._write([item])
                except Exception as one_exc:  # noqa: BLE001
                    if _transient(one_exc):
                        self.stats.store_errors += 1
                        self._recover()
                        self._pending = batch[batch.index(item):]
                        return False
                    self._bad("store", f"{item.kind} {item.message_id} from {item.device_id}: {one_exc}",
                              item.topic, json.dumps(item.doc, default=str).encode())
            if self._unsaved_bad:
                try:
                    self._write([])
                except Exception as count_exc:  # noqa: BLE001
                    log.warning("could not store the bad-message counts: %s", count_exc)
        self._pending = []
        self._ack()
        return True

    def _ack(self) -> None:
        """PUBACK everything taken so far: it is committed (or counted as bad)."""
        client, unacked = self._client, self._unacked
        self._unacked = []
        if client is None:
            return
        for mid, qos in unacked:
            if qos > 0 and mid:
                client.ack(mid, qos)

    def _write(self, batch: list[Incoming]) -> None:
        with self.store.transaction():
            result = self.store.ingest(batch) if batch else None
            deltas = {"stored": result.stored if result else 0,
                      "duplicates": result.duplicates if result else 0,
                      **{f"bad.{k}": v for k, v in self._unsaved_bad.items()}}
            dropped = 0
            if self._drop_reading is not None:
                last = self.store.counters().get("broker.dropped_reading")
                dropped = broker_drop_delta(self._drop_reading, last)
                deltas.update({"broker.dropped": dropped, "broker.dropped_reading": self._drop_reading - (last or 0)})
            self.store.bump(deltas)
            if self._bad_rows:
                self.store.executemany(
                    "INSERT INTO bad_messages (received_s, topic, reason, detail, size_bytes, payload_b64) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [(b.received_s, b.topic, b.reason, b.detail, b.size_bytes,
                      base64.b64encode(b.payload).decode("ascii")) for b in self._bad_rows])
        if result is not None:
            self.stats.stored += result.stored
            self.stats.duplicates += result.duplicates
            self.stats.samples += result.samples
        if dropped:
            self.stats.broker_dropped += dropped
            log.warning("the broker dropped %d messages (its %s reads %d): raise max_queued_messages or add "
                        "collectors (README: Broker settings)", dropped, SYS_DROPPED_TOPIC, self._drop_reading)
        self._unsaved_bad = {}
        self._bad_rows = []
        self._drop_reading = None

    def _retention(self) -> None:
        try:
            self.store.apply_retention(self.config.store.retention_s)
        except Exception as exc:  # noqa: BLE001 - a store hiccup must not stop collecting; retried next hour
            log.warning("retention failed (retried in %.0f s): %s", RETENTION_EVERY_S, exc)

    def _recover(self) -> None:
        """A PostgreSQL connection that broke is reopened (SQLite just retries: a lock passes)."""
        if self._reopen is None or not self.store.is_postgres:
            return
        try:
            self.store.close()
            self.store = self._reopen()
            log.info("store reopened")
        except Exception as exc:  # noqa: BLE001 - still down: the next flush tries again
            log.warning("store still unavailable: %s", exc)

    def run(self, stop: threading.Event | None = None, duration_s: float | None = None,
            report_every_s: float = 60.0) -> CollectorStats:
        """Collect until ``stop`` is set (or ``duration_s`` passed); returns the counts."""
        stop = stop or threading.Event()
        end = None if duration_s is None else time.monotonic() + duration_s
        next_report = time.monotonic() + report_every_s
        next_retention = time.monotonic()
        backoff_s = 0.5
        if self._client is None:
            self.start()
        try:
            while not stop.is_set() and (end is None or time.monotonic() < end):
                self.pump(self.params.flush_interval_s)
                if self.flush():
                    backoff_s = 0.5
                else:
                    stop.wait(backoff_s)
                    backoff_s = min(backoff_s * 2, 30.0)
                if time.monotonic() >= next_report:
                    next_report = time.monotonic() + report_every_s
                    log.info("collector: %s", json.dumps(self.stats.as_dict(), sort_keys=True))
                if self.config.store.retention_s and time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + RETENTION_EVERY_S
                    self._retention()
        finally:
            self.stop()
        return self.stats


RETENTION_EVERY_S = 3600.0
SAMPLE_BROKER_CONF = Path(__file__).with_name("mosquitto.example.conf")
_MACHINE_KEYS = ("listener", "persistence_location", "log_dest", "user")


def broker_settings(path: Path = SAMPLE_BROKER_CONF) -> list[str]:
    """The behaviour lines of a Mosquitto config (queues, in-flight window, persistence, $SYS),
    without what describes one machine (listeners, paths): for brokers that tests and benches start."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#") and line.split()[0] not in _MACHINE_KEYS]


def bad_messages(store: Store, limit: int = 100) -> list[dict[str, Any]]:
    """The most recent messages kept as bad, newest first, payloads decoded back to bytes."""
    store.migrate("collect_bad", BAD_MIGRATIONS)
    rows = store.query("SELECT received_s, topic, reason, detail, size_bytes, payload_b64 FROM bad_messages "
                       "ORDER BY id DESC LIMIT ?", (int(limit),))
    return [{"received_s": r[0], "topic": r[1], "reason": r[2], "detail": r[3], "size_bytes": int(r[4]),
             "payload": base64.b64decode(r[5])} for r in rows]


def collect(config: FleetConfig, stop: threading.Event | None = None,
            duration_s: float | None = None) -> CollectorStats:
    """Open the configured store and collect (the CLI command's body)."""
    def reopen() -> Store:
        return open_store(config.store_url, config.store.busy_timeout_s)

    store = reopen()
    try:
        return Collector(store, config, reopen=reopen).run(stop, duration_s)
    finally:
        store.close()
