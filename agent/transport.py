"""MQTT reporting: a paho client on its own thread, driven from the main loop.

Threading: paho runs its network loop on a thread (`loop_start`).  Its
callbacks never touch SQLite or agent state; they only push small event
tuples into a `queue.Queue`.  `MqttReporter.tick()` runs on the main loop
thread, drains that queue, deletes acknowledged outbox rows, tops up the
in-flight window from the outbox and hands inbound messages (commands,
model bundles) to their handlers.  Publishing from the main thread is
paho's supported threaded model.

Connection: `connect_async` + `loop_start`, so an unreachable broker (DNS,
TCP or TLS handshake) never blocks the main loop.  Paho retries on its
thread; the delay before each retry is set from the callbacks that precede
it (`on_disconnect`, `on_connect_fail`) to an exponential backoff with
jitter, so a fleet that lost its broker does not reconnect in lockstep.
Sessions persist (clean session false in 3.1.1, session expiry in 5).  A
retained last will "offline" sits on the status topic; "online" is
published retained on every connect and "offline" on a clean stop.

In-flight messages on disconnect: paho 2.x keeps unacknowledged QoS 1
messages and re-sends them (DUP, same message id) after it reconnects, so
they keep their mids here instead of being published a second time.  A
message with no PUBACK within `ack_timeout_s` of being (re)sent while
connected is requeued: it becomes eligible for a fresh publish.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import queue
import random
import sqlite3
import ssl
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import payloads
from agent.commands import CommandParams, CommandRegistry, register_builtins
from agent.outbox import DEFAULT_DROP_RANK, DROP_RANK, PRIORITY_HIGH, Outbox, OutboxParams
from agent.store import RateLimitedLog
from agent.topics import TopicParams, Topics, resolve

log = logging.getLogger(__name__)

ModelHandler = Callable[[str, bytes], None]
STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"
_PROTOCOLS = {"3.1.1": paho.MQTTv311, "5": paho.MQTTv5}
_paho_log = logging.getLogger(__name__ + ".paho")


@dataclass(frozen=True)
class MqttParams:
    host: str = "localhost"
    port: int = 1883
    username: str = ""
    password: str = ""
    tls_ca: str = ""          # CA file; setting it (or tls_cert) turns TLS on
    tls_cert: str = ""        # client certificate for mutual TLS
    tls_key: str = ""
    tls_insecure: bool = False  # skip the broker host name check (never the CA check)
    protocol: str = "3.1.1"
    keepalive_s: int = 60
    client_id: str = ""       # empty: the device id
    topic_prefix: str = "devices/{device_id}"
    preset: str = "default"
    session_expiry_s: int = 7 * 86400  # MQTT 5: broker keeps the session this long
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 120.0
    connect_timeout_s: float = 10.0
    max_inflight: int = 20
    ack_timeout_s: float = 60.0
    drain_budget_s: float = 0.2  # at most this long per tick waiting for acks while a backlog drains
    subscribe_models: bool = True
    max_inbound_queue: int = 1000
    shutdown_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.protocol not in _PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(_PROTOCOLS)}, not {self.protocol!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        if self.max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)


def params_from_sections(mqtt_section: Any, outbox_section: Any = None,
                         commands_section: Any = None) -> tuple[MqttParams, OutboxParams, CommandParams]:
    """Copy same-named fields from config sections (agent.config) into our params."""
    def pick(cls: type, section: Any) -> Any:
        if section is None:
            return cls()
        return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)
                      if hasattr(section, f.name)})
    return (pick(MqttParams, mqtt_section), pick(OutboxParams, outbox_section),
            pick(CommandParams, commands_section))


class Backoff:
    """Exponential backoff with equal jitter: attempt n waits U(d/2, d), d = min(max, min * 2^n)."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random) -> None:
        self.min_s, self.max_s, self._rng = min_s, max_s, rng
        self.attempt = 0
        self.last_delay_s = 0.0

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.min_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        self.last_delay_s = self._rng.uniform(ceiling / 2, ceiling)
        return self.last_delay_s

    def reset(self) -> None:
        self.attempt = 0


class MqttLink:
    """The paho client and its callbacks; callbacks only enqueue events."""

    def __init__(self, params: MqttParams, *, client_id: str, status_topic: str,
                 subscriptions: list[str], events: queue.Queue, rng: random.Random) -> None:
        self.params = params
        self._events = events
        self._status_topic = status_topic
        self._subscriptions = subscriptions
        self._backoff = Backoff(params.reconnect_min_s, params.reconnect_max_s, rng)
        self._lock = threading.Lock()
        self.inbound_dropped = 0
        self._v5 = params.protocol == "5"
        self._json_props: Properties | None = None
        if self._v5:
            self._json_props = Properties(PacketTypes.PUBLISH)
            self._json_props.PayloadFormatIndicator = 1
            self._json_props.ContentType = "application/json"
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if self._v5 else False,
            protocol=_PROTOCOLS[params.protocol],
        )
        client.connect_timeout = params.connect_timeout_s
        client.max_inflight_messages_set(max(params.max_inflight, 20))
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(params.reconnect_min_s, params.reconnect_max_s)
        if params.username:
            client.username_pw_set(params.username, params.password or None)
        if params.tls:
            for key in ("tls_ca", "tls_cert", "tls_key"):
                path = getattr(params, key)
                if path and not os.path.isfile(path):
                    raise FileNotFoundError(f"{key} file not found: {path}")
            client.tls_set(ca_certs=params.tls_ca or None, certfile=params.tls_cert or None,
                           keyfile=params.tls_key or None, cert_reqs=ssl.CERT_REQUIRED,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
            client.tls_insecure_set(params.tls_insecure)
        client.will_set(status_topic, STATUS_OFFLINE, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_log = self._on_log
        self.client = client
        self._started = False

    # -- lifecycle (main thread) ------------------------------------------------------
    def start(self) -> None:
        kwargs: dict[str, Any] = {}
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.params.session_expiry_s
            kwargs = {"clean_start": False, "properties": props}
        self.client.connect_async(self.params.host, self.params.port, self.params.keepalive_s, **kwargs)
        self.client.loop_start()
        self._started = True

    def stop(self, connected: bool) -> None:
        if not self._started:
            return
        if connected:
            try:
                info = self.client.publish(self._status_topic, STATUS_OFFLINE, qos=1, retain=True)
                info.wait_for_publish(timeout=self.params.shutdown_timeout_s)
            except (ValueError, RuntimeError) as exc:
                log.info("could not publish offline status: %s", exc)
        self.client.disconnect()
        self.client.loop_stop()
        self._started = False

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> int | None:
        """Hand one message to paho; its mid, or None when paho did not queue it."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=self._json_props)
        # NO_CONN: paho keeps the message and sends it after reconnecting, so it is in flight.
        if info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            return info.mid
        return None

    @property
    def reconnect_delay_s(self) -> float:
        return self._backoff.last_delay_s

    # -- callbacks (paho network thread) ---------------------------------------------
    def _schedule_retry(self) -> None:
        with self._lock:
            delay = self._backoff.next_delay()
        # paho waits exactly `min_delay` after a reset, so this sets the next wait.
        self.client.reconnect_delay_set(delay, delay)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            self._events.put(("connect_refused", str(reason)))
            return
        with self._lock:
            self._backoff.reset()
        if self._subscriptions:
            client.subscribe([(t, 1) for t in self._subscriptions])
        client.publish(self._status_topic, STATUS_ONLINE, qos=1, retain=True)
        receive_max = getattr(properties, "ReceiveMaximum", None) if self._v5 else None
        self._events.put(("connected", bool(getattr(flags, "session_present", False)), receive_max))

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError` block: the exception is still current.
        exc = sys.exc_info()[1]
        self._events.put(("connect_failed", f"{type(exc).__name__}: {exc}" if exc else "connect failed"))
        self._schedule_retry()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self._events.put(("disconnected", str(reason)))
        self._schedule_retry()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        self._events.put(("puback", mid, bool(getattr(reason, "is_failure", False)), str(reason)))

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if self._events.qsize() >= self.params.max_inbound_queue:
            self.inbound_dropped += 1  # a flood must not grow memory without bound
            return
        self._events.put(("message", message.topic, bytes(message.payload), bool(message.retain)))

    def _on_log(self, client: paho.Client, userdata: Any, level: int, text: str) -> None:
        # paho's errors (e.g. a TLS alert from a broker refusing our certificate) explain
        # failed connections; the main thread decides whether and how loudly to log them.
        if level == paho.MQTT_LOG_ERR:
            self._events.put(("paho_error", text))
        else:
            _paho_log.debug("%s", text)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        failed = [str(r) for r in reasons if getattr(r, "is_failure", False)]
        if failed:
            self._events.put(("subscribe_failed", failed))


@dataclass
class _InFlight:
    row_id: int
    size_bytes: int
    sent_mono_s: float


class MqttReporter:
    """Daemon component: outbox + MQTT link + commands + inbound model routing."""

    name = "mqtt"

    def __init__(self, params: MqttParams = MqttParams(), outbox_params: OutboxParams = OutboxParams(),
                 *, device_id: str, groups: tuple[str, ...] | list[str] = (),
                 conn: sqlite3.Connection | None = None,
                 command_params: CommandParams = CommandParams(),
                 commands: CommandRegistry | None = None,
                 model_handler: ModelHandler | None = None,
                 status_provider: Callable[[], Mapping[str, Any]] | None = None,
                 report_now: Callable[[], None] | None = None,
                 set_interval: Callable[[float], None] | None = None,
                 wall_clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.params = params
        self.outbox_params = outbox_params
        self.device_id = device_id
        self.topics: Topics = resolve(device_id, tuple(groups),
                                      TopicParams(prefix=params.topic_prefix, preset=params.preset))
        self.commands = commands or CommandRegistry(command_params)
        self.model_handler = model_handler
        self._status_provider = status_provider
        self._report_now = report_now
        self._set_interval = set_interval
        self._wall = wall_clock
        self._rng = rng or random.Random()
        self._conn = conn
        self._store: Any = None
        self.outbox: Outbox | None = None
        self.link: MqttLink | None = None
        self._events: queue.Queue = queue.Queue()
        self._inflight: dict[int, _InFlight] = {}       # mid -> entry
        self._inflight_rows: dict[int, int] = {}        # row id -> mid
        self._acked: dict[int, int] = {}                # row id -> size, to delete
        self._rejected: dict[int, int] = {}
        self._unwritten: deque[tuple] = deque()         # messages the disk refused, retried each tick
        self._model_digests: dict[str, bytes] = {}      # topic -> sha256 of the last handled bundle
        self._window = params.max_inflight
        self._now = 0.0
        self.connected = False
        self.session_present = False
        self.last_error: str | None = None
        self._paho_error: str | None = None
        self._refused = False
        self._stopping = False
        self.counts = {"connects": 0, "disconnects": 0, "connect_failures": 0, "acked": 0,
                       "rejected": 0, "requeued": 0, "write_errors": 0, "memory_dropped": 0,
                       "inbound": 0, "unroutable": 0}
        self._errors = RateLimitedLog(log)  # a full disk fails every tick: one line a minute, with a count
        if conn is not None:
            self._open_outbox()

    # -- lifecycle ------------------------------------------------------------------
    def start(self, ctx: Any = None) -> None:
        if ctx is not None:
            self._wall = ctx.clock.time
            if self._conn is None:
                self._store = ctx.store
            daemon = getattr(ctx, "daemon", None)
            if daemon is not None:
                daemon.set_emitter(self.enqueue, self.enqueue_atomic)
                self._status_provider = self._status_provider or daemon.runtime_status
                self._set_interval = self._set_interval or daemon.set_interval
        if self._conn is None and self._store is None:
            raise ValueError("MqttReporter needs a database connection (conn=... or ctx.store)")
        self._open_outbox()
        self._stopping = False
        if "ping" not in self.commands.names():
            register_builtins(self.commands, status=self._status_for_command,
                              report_now=self._report_now, set_interval=self._set_interval,
                              clock=self._wall)
        subscriptions = [self.topics.commands]
        if self.params.subscribe_models:
            subscriptions += list(self.topics.inbound_models)
        try:
            self.link = MqttLink(self.params, client_id=self.params.client_id or self.device_id,
                                 status_topic=self.topics.status, subscriptions=subscriptions,
                                 events=self._events, rng=self._rng)
            self.link.start()
        except (OSError, ValueError, ssl.SSLError) as exc:
            # Bad TLS files or host: keep queueing into the outbox, report why nothing leaves.
            self.link = None
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("MQTT client not started: %s", self.last_error)
            return
        log.info("MQTT %s to %s:%d as %s (tls=%s), %d messages queued", self.params.protocol,
                 self.params.host, self.params.port, self.params.client_id or self.device_id,
                 self.params.tls, self.outbox.depth if self.outbox else 0)

    def _open_outbox(self) -> bool:
        """Open the outbox; with a store that cannot open its file yet (read-only or
        missing state dir) keep going and retry from tick()."""
        if self.outbox is not None:
            return True
        try:
            if self._store is not None:
                self.outbox = Outbox(self._store.conn, self.outbox_params, migrate=self._store.migrate)
            elif self._conn is not None:
                self.outbox = Outbox(self._conn, self.outbox_params)
        except sqlite3.Error as exc:
            self.counts["write_errors"] += 1
            self.last_error = f"outbox unavailable: {exc}"
            self._errors.warning("open", "outbox unavailable (%s); messages wait in memory", exc)
            return False
        return self.outbox is not None

    def stop(self) -> None:
        self._drain_before_stop()
        self._stopping = True
        if self.link is not None:
            self.link.stop(self.connected)
        self._process_events()  # acks that arrived while stopping: delete those rows now
        self._flush_acks()
        self.link = None
        self.connected = False

    def _drain_before_stop(self) -> None:
        """Publish what is queued (the reporter's final telemetry batch) and wait for the
        PUBACKs, at most ``shutdown_timeout_s``; whatever is left waits in the outbox."""
        if self.link is None or self.outbox is None or not self.connected:
            return
        deadline = time.monotonic() + self.params.shutdown_timeout_s
        self._retry_unwritten()
        while True:
            self._process_events()
            self._flush_acks()
            self._fill_window()
            remaining = deadline - time.monotonic()
            if self.outbox.depth == 0 or not self.connected or remaining <= 0:
                return
            try:
                self._handle(self._events.get(timeout=min(remaining, 0.1)))
            except queue.Empty:
                pass

    # -- producing ------------------------------------------------------------------
    def enqueue(self, kind: str, payload: Mapping[str, Any], priority: int = 0) -> str | None:
        """Queue one message durably; its message id, or None if it was refused.

        Adds the envelope (`messageId`, `deviceId`, `kind`, `timestamp`) where the
        payload lacks it, so every message can be deduplicated downstream."""
        item = self._prepare(kind, payload, priority)
        if item is None:
            return None
        if self._unwritten:  # keep order behind messages the disk refused earlier
            self._hold(item)
            return item[3]
        stored = self._write(item)
        if stored is None:
            self._hold(item)
        return item[3] if stored is not False else None

    def enqueue_atomic(self, kind: str, payload: Mapping[str, Any], priority: int,
                       write: Callable[[sqlite3.Connection], None]) -> str | None:
        """Queue one message and run ``write(conn)`` in the same transaction: both commit or
        neither.  Never held in memory: raises sqlite3.Error when the disk refuses, so the
        caller (the telemetry cursor) knows nothing moved.  None when the outbox refused it."""
        item = self._prepare(kind, payload, priority)
        if item is None:
            return None
        if self.outbox is None and not self._open_outbox():
            raise sqlite3.OperationalError(self.last_error or "outbox unavailable")
        assert self.outbox is not None
        kind, topic, data, message_id, priority, created_s, retain = item
        try:
            with self.outbox.transaction() as conn:
                stored = self.outbox.put(kind, topic, data, message_id=message_id, priority=priority,
                                         created_at_s=created_s, retain=retain)
                if stored:
                    write(conn)
        except sqlite3.Error as exc:
            self.counts["write_errors"] += 1
            self.last_error = f"outbox write: {exc}"
            self.outbox.recount()  # the put was counted before the transaction rolled back
            raise
        return message_id if stored else None

    def _prepare(self, kind: str, payload: Mapping[str, Any], priority: int) -> tuple | None:
        now_s = self._wall()
        doc = dict(payload)
        doc.setdefault("messageId", payloads.new_message_id())
        doc.setdefault("deviceId", self.device_id)
        doc.setdefault("kind", kind)
        doc.setdefault("timestamp", payloads.iso_utc(now_s))
        try:
            data = payloads.encode(doc)
            topic = self.topics.for_kind(kind)
        except (TypeError, ValueError) as exc:
            log.error("cannot queue %s message: %s", kind, exc)
            return None
        return (kind, topic, data, str(doc["messageId"]), int(priority), now_s,
                self.topics.retained(kind))

    def _write(self, item: tuple) -> bool | None:
        """True: stored; False: refused by the outbox (too large, duplicate id);
        None: the database failed and the message should be retried."""
        if self.outbox is None:
            return None
        kind, topic, data, message_id, priority, created_s, retain = item
        try:
            return self.outbox.put(kind, topic, data, message_id=message_id, priority=priority,
                                   created_at_s=created_s, retain=retain)
        except sqlite3.Error as exc:
            self.counts["write_errors"] += 1
            self.last_error = f"outbox write: {exc}"
            self._errors.warning("write", "outbox write failed (%s); holding %d messages in memory",
                                 exc, len(self._unwritten) + 1)
            return None

    def _hold(self, item: tuple) -> None:
        """Keep a message the disk refused; when the hold is full, drop by the outbox's own rule:
        the lowest kind rank first (telemetry, then twin, ..., anomalies last), then the lower
        priority, then the oldest.  The newcomer competes too: a twin never evicts an anomaly."""
        self._unwritten.append(item)
        limit = max(16, self.outbox_params.max_rows // 100)
        if len(self._unwritten) <= limit:
            return
        victim = min(range(len(self._unwritten)), key=lambda i: (
            DROP_RANK.get(self._unwritten[i][0], DEFAULT_DROP_RANK), self._unwritten[i][4], i))
        kind = self._unwritten[victim][0]
        del self._unwritten[victim]
        self.counts["memory_dropped"] += 1
        self._errors.warning("hold", "memory hold full (%d messages): dropped a %s message; %d dropped in total",
                             limit, kind, self.counts["memory_dropped"])

    def _retry_unwritten(self) -> None:
        while self._unwritten and self._write(self._unwritten[0]) is not None:
            self._unwritten.popleft()

    # -- main loop ------------------------------------------------------------------
    def tick(self, now_mono_s: float) -> None:
        self._now = now_mono_s
        if self.outbox is None and not self._open_outbox():
            self._process_events()  # keep the queue short; commands still get answered later
            return
        self._retry_unwritten()
        assert self.outbox is not None
        deadline = time.monotonic() + self.params.drain_budget_s
        self._process_events()
        while True:
            self._flush_acks()
            self._requeue_overdue()
            self._fill_window()
            backlog = self.outbox.depth > len(self._inflight_rows)
            remaining = deadline - time.monotonic()
            if not (self.connected and self._inflight and backlog) or remaining <= 0:
                return
            try:
                event = self._events.get(timeout=remaining)
            except queue.Empty:
                return
            self._handle(event)
            self._process_events()

    def _process_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self._handle(event)

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "puback":
            _, mid, failed, reason = event
            entry = self._inflight.pop(mid, None)
            if entry is None:
                return  # status message, or a requeued message's first copy
            self._inflight_rows.pop(entry.row_id, None)
            if failed:
                log.warning("broker rejected outbox row %d: %s", entry.row_id, reason)
                self._rejected[entry.row_id] = entry.size_bytes
            else:
                self._acked[entry.row_id] = entry.size_bytes
        elif kind == "message":
            self._route(event[1], event[2], event[3])
        elif kind == "connected":
            _, self.session_present, receive_max = event
            self.connected = True
            self.counts["connects"] += 1
            self.last_error = self._paho_error = None
            self._refused = False
            self._window = min(self.params.max_inflight, receive_max or self.params.max_inflight)
            for entry in self._inflight.values():
                entry.sent_mono_s = self._now  # paho re-sends them now
            log.info("MQTT connected to %s:%d (session present: %s, %d in flight, %d queued)",
                     self.params.host, self.params.port, self.session_present,
                     len(self._inflight), self.outbox.depth if self.outbox else 0)
        elif kind == "disconnected":
            if self._stopping:
                self.connected = False
            elif self.connected:
                self.counts["disconnects"] += 1
                self.connected = False
                self.last_error = event[1]
                log.warning("MQTT disconnected: %s; retrying in %.1f s", event[1],
                            self.link.reconnect_delay_s if self.link else 0.0)
            elif not self._refused:
                # Closed before CONNACK (e.g. a TLS alert: the broker refused our certificate);
                # paho's error log line, if any, says why better than the reason code.
                self._connect_failed(self._paho_error or event[1])
            self._refused = False
            self._paho_error = None
        elif kind in ("connect_failed", "connect_refused"):
            self._connect_failed(event[1])
            self._refused = kind == "connect_refused"  # the broker closes next: same attempt
            self._paho_error = None
        elif kind == "paho_error":
            _paho_log.debug("%s", event[1])
            if not self.connected:
                self._paho_error = event[1]
        elif kind == "subscribe_failed":
            log.error("MQTT subscription refused by the broker: %s", event[1])
            self.last_error = f"subscribe refused: {event[1]}"

    def _connect_failed(self, reason: str) -> None:
        self.counts["connect_failures"] += 1
        if self.last_error != reason:  # once per distinct cause, not once per retry
            log.warning("MQTT connection to %s:%d failed: %s", self.params.host, self.params.port, reason)
        self.last_error = reason

    def _requeue_overdue(self) -> None:
        if not self.connected:
            return
        limit = self._now - self.params.ack_timeout_s
        overdue = [mid for mid, e in self._inflight.items() if e.sent_mono_s < limit]
        for mid in overdue:
            entry = self._inflight.pop(mid)
            self._inflight_rows.pop(entry.row_id, None)
            self.counts["requeued"] += 1
        if overdue:
            log.warning("%d messages unacknowledged for %.0f s; requeued", len(overdue),
                        self.params.ack_timeout_s)

    def _fill_window(self) -> None:
        if not self.connected or self.link is None or self.outbox is None:
            return
        free = self._window - len(self._inflight)
        if free <= 0:
            return
        exclude = set(self._inflight_rows) | set(self._acked) | set(self._rejected)
        self.outbox.protected = exclude
        for msg in self.outbox.next_batch(free, exclude):
            try:
                mid = self.link.publish(msg.topic, msg.payload, msg.qos, msg.retain)
            except ValueError as exc:  # a stored topic paho refuses: never sendable
                log.error("outbox row %d unsendable (%s); discarded", msg.row_id, exc)
                self._rejected[msg.row_id] = msg.size_bytes
                continue
            if mid is None:
                break
            self._inflight[mid] = _InFlight(msg.row_id, msg.size_bytes, self._now)
            self._inflight_rows[msg.row_id] = mid

    def _flush_acks(self) -> None:
        if self.outbox is None or not (self._acked or self._rejected):
            return
        try:
            if self._acked:
                self.outbox.delete(self._acked)
                self.counts["acked"] += len(self._acked)
                self._acked = {}
            if self._rejected:
                self.outbox.delete(self._rejected, counter="rejected")
                self.counts["rejected"] += len(self._rejected)
                self._rejected = {}
        except sqlite3.Error as exc:  # kept for the next tick; a re-send is harmless
            self.counts["write_errors"] += 1
            self.last_error = f"outbox delete: {exc}"
            self._errors.warning("delete", "could not delete acknowledged outbox rows: %s", exc)
        self.outbox.protected = set(self._inflight_rows)

    # -- inbound ----------------------------------------------------------------------
    def _route(self, topic: str, payload: bytes, retained: bool) -> None:
        self.counts["inbound"] += 1
        if topic == self.topics.commands:
            if retained:
                log.warning("ignoring a retained command on %s (stale after a reconnect)", topic)
                return
            self._answer(payload)
        elif topic in self.topics.inbound_models:
            if not payload:
                return  # a retained message being cleared
            if self.model_handler is None:
                log.warning("model bundle on %s but no handler is installed; ignored", topic)
                return
            # Retained bundles come back on every re-subscribe (each reconnect); verifying
            # the same megabytes again proves nothing, so a payload handled once is skipped.
            digest = hashlib.sha256(payload).digest()
            if self._model_digests.get(topic) == digest:
                log.debug("model bundle on %s unchanged since last delivery; skipped", topic)
                return
            try:
                self.model_handler(topic, payload)
            except Exception:  # the verifier's bug must not stop the publisher
                log.exception("model handler failed for %s", topic)
            else:
                self._model_digests[topic] = digest
        else:
            self.counts["unroutable"] += 1
            log.debug("message on unexpected topic %s ignored", topic)

    def _answer(self, payload: bytes) -> None:
        outcome = self.commands.handle(payload)
        reply = payloads.command_response(
            self.device_id, self._wall(), request_id=outcome.request_id, command=outcome.command,
            ok=outcome.ok, result=outcome.result, error_code=outcome.error_code,
            error_message=outcome.error_message)
        if outcome.duplicate:
            reply["duplicate"] = True
        if self.enqueue("command_response", reply, PRIORITY_HIGH) is None:
            # The reply itself could not be queued (too large for the outbox, or unencodable):
            # the peer still gets its one answer, a short error in place of the result.
            self.enqueue("command_response", payloads.command_response(
                self.device_id, self._wall(), request_id=outcome.request_id, command=outcome.command,
                ok=False, error_code="reply_failed",
                error_message="the reply could not be queued (too large or not encodable)"), PRIORITY_HIGH)

    def _status_for_command(self) -> Mapping[str, Any]:
        if self._status_provider is not None:
            return self._status_provider()
        return self.status()

    # -- status -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        stats = self.outbox.stats() if self.outbox else {"depth": 0, "bytes": 0, "dropped": 0}
        stats["dropped"] += self.counts["memory_dropped"]
        stats["unwritten"] = len(self._unwritten)
        return {
            "mqtt": {
                "connected": self.connected,
                "broker": f"{self.params.host}:{self.params.port}",
                "protocol": self.params.protocol,
                "tls": self.params.tls,
                "client_id": self.params.client_id or self.device_id,
                "session_present": self.session_present,
                "last_error": self.last_error,
                "inflight": len(self._inflight),
                "inbound_dropped": self.link.inbound_dropped if self.link else 0,
                "reconnect_delay_s": round(self.link.reconnect_delay_s, 3) if self.link else 0.0,
                **self.counts,
            },
            "outbox": stats,
            "commands": self.commands.stats(),
        }
