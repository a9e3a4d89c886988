"""Shared fixtures: a real Mosquitto on a free port, TLS material, an MQTT sink.

    mqtt_broker        plain broker (anonymous, persistent sessions): .host .port .stop() .start()
                       .pause() .resume() (SIGSTOP/SIGCONT) .log_text()
    mqtt_broker_tls    TLS broker: .port (server auth) .mtls_port (client cert required),
                       .ca_cert .client_cert .client_key .other_ca_cert (an unrelated CA)
    mosquitto_factory  factory(tls=False, users=None, extra_config=()) -> Mosquitto, for custom brokers
                       (extra_config lines replace the defaults with the same key)
    mqtt_sink          factory(broker, topics=("#",), **tls) -> MqttSink collecting messages

Brokers keep sessions and retained messages across stop()/start() (same port),
like a production broker restarting, so tests can stage outages.
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def connect_before_first_sample(daemon: Any, timeout_s: float = 10.0) -> None:
    """A daemon on a fake clock runs far ahead of real time: make its MQTT component wait for the
    broker's CONNACK in start(), so the test's first sample already finds it connected."""
    mqtt = next(c for c in daemon.components if c.name == "mqtt")
    real_start = mqtt.start

    def start_connected(ctx: Any) -> None:
        real_start(ctx)
        assert wait_until(lambda: (mqtt._process_events(), mqtt.connected)[1], timeout_s), mqtt.last_error

    mqtt.start = start_connected


# -- TLS material -------------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    ca_cert: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca_cert: str


def make_pki(directory: Path, client_cn: str = "edge-test") -> Pki:
    """A CA, a server cert for localhost/127.0.0.1, a client cert, and an unrelated CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: Any, path: Path) -> str:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return str(path)

    def write_cert(cert: Any, path: Path) -> str:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(path)

    def ca(cn: str) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return key, cert

    def leaf(cn: str, ca_key: Any, ca_cert: Any, usage: Any, san: list[Any] | None) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = ca("edge-test-ca")
    srv_key, srv_cert = leaf("localhost", ca_key, ca_cert, ExtendedKeyUsageOID.SERVER_AUTH,
                             [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cli_key, cli_cert = leaf(client_cn, ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH, None)
    _, other_cert = ca("someone-else-ca")
    return Pki(
        ca_cert=write_cert(ca_cert, directory / "ca.pem"),
        server_cert=write_cert(srv_cert, directory / "server.pem"),
        server_key=write_key(srv_key, directory / "server.key"),
        client_cert=write_cert(cli_cert, directory / "client.pem"),
        client_key=write_key(cli_key, directory / "client.key"),
        other_ca_cert=write_cert(other_cert, directory / "other-ca.pem"),
    )


# -- broker -------------------------------------------------------------------------------
class Mosquitto:
    """One mosquitto process with its own config, persistence and log in `workdir`."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, *, pki: Pki | None = None,
                 users: dict[str, str] | None = None, extra_config: Iterable[str] = ()) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.port = free_port()
        self.mtls_port = free_port() if pki else None
        self.log_path = workdir / "mosquitto.log"
        self.config_path = workdir / "mosquitto.conf"
        self._proc: subprocess.Popen | None = None
        lines = [
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            "per_listener_settings false",
            "persistence true",
            f"persistence_location {workdir}/",
            "max_queued_messages 100000",
            f"log_dest file {self.log_path}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "connection_messages true",
        ]
        extra = [line.strip() for line in extra_config if line.strip()]
        overridden = {line.split()[0] for line in extra}
        lines = [line for line in lines if line.split()[0] not in overridden] + extra
        if users:
            passwd = workdir / "passwd"
            passwd.touch()
            for user, password in users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(passwd), user, password], check=True,
                               capture_output=True)
            lines += [f"password_file {passwd}", "allow_anonymous false"]
        else:
            lines.append("allow_anonymous true")
        lines.append(f"listener {self.port} {self.host}")
        if pki:
            tls = [f"cafile {pki.ca_cert}", f"certfile {pki.server_cert}", f"keyfile {pki.server_key}"]
            lines += tls + ["require_certificate false"]
            lines += [f"listener {self.mtls_port} {self.host}", *tls, "require_certificate true"]
        self.config_path.write_text("\n".join(lines) + "\n")

    # TLS shortcuts so tests read naturally
    @property
    def ca_cert(self) -> str:
        assert self.pki
        return self.pki.ca_cert

    @property
    def client_cert(self) -> str:
        assert self.pki
        return self.pki.client_cert

    @property
    def client_key(self) -> str:
        assert self.pki
        return self.pki.client_key

    @property
    def other_ca_cert(self) -> str:
        assert self.pki
        return self.pki.other_ca_cert

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _accepting(self, port: int) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=0.2):
                return True
        except OSError:
            return False

    def start(self, timeout_s: float = 10.0) -> None:
        if self.running:
            return
        self._proc = subprocess.Popen([MOSQUITTO, "-c", str(self.config_path)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        ports = [p for p in (self.port, self.mtls_port) if p]
        deadline = time.monotonic() + timeout_s
        while not all(self._accepting(p) for p in ports):
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise RuntimeError(f"mosquitto exited: {err}\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not listen on {ports}\n{self.log_text()}")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful stop (SIGTERM): sessions and retained messages are saved."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    def pause(self) -> None:
        """SIGSTOP: the broker accepts bytes but answers nothing (a hung or partitioned broker)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed")
    brokers: list[Mosquitto] = []

    def make(*, tls: bool = False, users: dict[str, str] | None = None,
             extra_config: Iterable[str] = ()) -> Mosquitto:
        workdir = tmp_path / f"mosquitto-{len(brokers)}"
        if users and not Path(MOSQUITTO_PASSWD).exists():
            pytest.skip("mosquitto_passwd is not installed")
        broker = Mosquitto(workdir, pki=make_pki(workdir / "pki") if tls else None, users=users,
                           extra_config=extra_config)
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mqtt_broker(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    return mosquitto_factory()


@pytest.fixture
def mqtt_broker_tls(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    return mosquitto_factory(tls=True)


# -- sink ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


class MqttSink:
    """A subscriber with a persistent session (it gets what was published while the
    broker restarted), recording every message it receives."""

    def __init__(self, host: str, port: int, topics: Iterable[str], *, protocol: str = "3.1.1",
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 username: str | None = None, password: str | None = None) -> None:
        import paho.mqtt.client as paho

        self._paho = paho
        self.topics = list(topics)
        self._lock = threading.Lock()
        self._messages: list[Received] = []
        self._connected = threading.Event()
        v5 = protocol == "5"
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"sink-{uuid.uuid4().hex[:12]}",
                                  clean_session=None if v5 else False,
                                  protocol=paho.MQTTv5 if v5 else paho.MQTTv311)
        if tls_ca:
            self.client.tls_set(ca_certs=tls_ca, certfile=tls_cert, keyfile=tls_key)
        if username:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self._connected.clear()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._connected.set()
        self._acked: set[int] = set()
        self.client.on_publish = lambda client, userdata, mid, *a: self._acked.add(mid)
        kwargs: dict[str, Any] = {}
        if v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            kwargs = {"clean_start": False, "properties": props}
        self.client.connect_async(host, port, 5, **kwargs)
        self.client.loop_start()
        if not self._connected.wait(10):
            self.close()
            raise RuntimeError("sink could not connect")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:  # ready once the SUBACK arrives (on_subscribe)
            client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self._messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def messages(self, topic: str | None = None) -> list[Received]:
        with self._lock:
            return [m for m in self._messages if topic is None or m.topic == topic]

    def json_messages(self, topic: str | None = None) -> list[Any]:
        return [m.json() for m in self.messages(topic)]

    def wait_for(self, predicate: Callable[[list[Received]], Any], timeout_s: float = 10.0) -> bool:
        return wait_until(lambda: predicate(self.messages()), timeout_s)

    def wait_count(self, topic: str, n: int, timeout_s: float = 10.0) -> list[Received]:
        wait_until(lambda: len(self.messages(topic)) >= n, timeout_s)
        return self.messages(topic)

    def wait_connected(self, timeout_s: float = 10.0) -> bool:
        return self._connected.wait(timeout_s)

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False,
                timeout_s: float = 10.0) -> None:
        """Publish and wait for the PUBACK; while reconnecting paho keeps the message
        and sends it once the connection is back."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (self._paho.MQTT_ERR_SUCCESS, self._paho.MQTT_ERR_NO_CONN):
            raise RuntimeError(f"publish refused: {self._paho.error_string(info.rc)}")
        if qos and not wait_until(lambda: info.mid in self._acked, timeout_s, 0.005):
            raise TimeoutError(f"no PUBACK for {topic} within {timeout_s} s")

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mqtt_sink() -> Iterator[Callable[..., MqttSink]]:
    sinks: list[MqttSink] = []

    def make(broker: Mosquitto, topics: Iterable[str] = ("#",), *, port: int | None = None,
             **kwargs: Any) -> MqttSink:
        sink = MqttSink(broker.host, port or broker.port, topics, **kwargs)
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.close()


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """`edge-agent` commands called in-process configure the root logger; keep tests independent."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
