"""``edge-fleet publish``: put a signed bundle on the broker as a retained QoS 1 message.

Retained, so a device that is offline now receives it when it next connects;
QoS 1 and we wait for the PUBACK, so "published" means the broker has it.
``--clear`` publishes an empty retained payload, which removes the retained
bundle (devices ignore empty payloads).

Topics are those the agent subscribes to (DESIGN.md; ``agent.topics`` builds
the device side, a test keeps the two in step):

    --device ID   <topic prefix>/models, the prefix template "devices/{device_id}" by default
    --group G     fleet/G/models
    --fleet       fleet/all/models

Before anything is sent the bundle is parsed and its manifest target must match
the destination: a bundle for ``device:pi-01`` published to a group would be
refused by every device of the group, so it is refused here instead.
``--pub`` additionally verifies the signature and hashes like a device would.
"""
from __future__ import annotations

import logging
import os
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from models.bundle import FLEET_ID, BundleError, BundleLimits, Target, parse_bundle, verify_bundle

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "devices/{device_id}"
DEVICE_MODELS = "{prefix}/models"
GROUP_MODELS = "fleet/{group}/models"


class PublishError(RuntimeError):
    """The bundle could not be published; the message is one line for the operator."""


@dataclass(frozen=True)
class BrokerParams:
    host: str = "localhost"
    port: int = 1883
    username: str = ""
    password: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    protocol: str = "3.1.1"
    timeout_s: float = 10.0


def destination(device: str | None = None, group: str | None = None, fleet: bool = False) -> Target:
    chosen = [x for x in (device is not None, group is not None, fleet) if x]
    if len(chosen) != 1:
        raise PublishError("give exactly one of --device ID, --group NAME, --fleet")
    if fleet:
        return Target("fleet", FLEET_ID)
    ident = device if device is not None else group
    assert ident is not None
    if not ident or any(ch in ident for ch in "/+#\x00"):
        raise PublishError(f"{'device id' if device is not None else 'group'} {ident!r} must be non-empty "
                           "without / + #")
    if group is not None and group == FLEET_ID:
        raise PublishError(f"group {FLEET_ID!r} is the fleet: use --fleet")
    return Target("device" if device is not None else "group", ident)


def topic_for(target: Target, topic_prefix: str = DEFAULT_PREFIX) -> str:
    """The inbound model topic a device of ``target`` subscribes to."""
    if target.type == "device":
        if "{device_id}" not in topic_prefix:
            raise PublishError("--topic-prefix must contain {device_id}")
        prefix = topic_prefix.format(device_id=target.id).rstrip("/")
        return DEVICE_MODELS.format(prefix=prefix)
    return GROUP_MODELS.format(group=target.id if target.type == "group" else FLEET_ID)


def check_bundle(data: bytes, target: Target, pub_paths: Sequence[str] = (),
                 limits: BundleLimits = BundleLimits()) -> str:
    """Refuse a bundle whose manifest names another target; returns a one-line description."""
    try:
        if pub_paths:
            from fleet.keys import load_public_keys

            manifest = verify_bundle(data, load_public_keys(list(pub_paths)), limits, time.time()).manifest
        else:
            manifest = parse_bundle(data, limits)[0]
    except BundleError as exc:
        raise PublishError(f"not publishing: {exc.reason}") from None
    if manifest.target != target:
        raise PublishError(f"bundle target is {manifest.target.label} but the destination is {target.label}; "
                           f"rebuild it with --target {target.label}")
    return f"{','.join(manifest.kinds)} v{manifest.version} for {manifest.target.label}"


def publish(topic: str, payload: bytes, broker: BrokerParams) -> None:
    """Publish retained with QoS 1 and return once the broker acknowledged it."""
    import paho.mqtt.client as paho

    connected = threading.Event()
    outcome: dict[str, str] = {}

    def on_connect(client, userdata, flags, reason, properties):  # noqa: ANN001 - paho signature
        if reason.is_failure:
            outcome["error"] = f"broker refused the connection: {reason}"
        connected.set()

    def on_disconnect(client, userdata, flags, reason, properties):  # noqa: ANN001
        if not connected.is_set():
            outcome.setdefault("error", f"disconnected: {reason}")
            connected.set()

    v5 = broker.protocol == "5"
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"edge-fleet-publish-{uuid.uuid4().hex[:12]}",
                         protocol=paho.MQTTv5 if v5 else paho.MQTTv311)
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    if broker.username:
        client.username_pw_set(broker.username, broker.password or None)
    if broker.tls_ca or broker.tls_cert:
        for name in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(broker, name)
            if path and not os.path.isfile(path):
                raise PublishError(f"--{name.replace('_', '-')} {path}: no such file")
        try:
            client.tls_set(ca_certs=broker.tls_ca or None, certfile=broker.tls_cert or None,
                           keyfile=broker.tls_key or None, cert_reqs=ssl.CERT_REQUIRED,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise PublishError(f"TLS setup failed: {exc}") from None
    try:
        client.connect(broker.host, broker.port, keepalive=max(5, int(broker.timeout_s) * 2))
    except (OSError, ssl.SSLError) as exc:
        raise PublishError(f"cannot connect to {broker.host}:{broker.port}: {exc}") from None
    client.loop_start()
    try:
        if not connected.wait(broker.timeout_s):
            raise PublishError(f"no answer from {broker.host}:{broker.port} within {broker.timeout_s:g} s")
        if "error" in outcome:
            raise PublishError(outcome["error"])
        info = client.publish(topic, payload, qos=1, retain=True)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise PublishError(f"publish failed: {paho.error_string(info.rc)}")
        try:
            info.wait_for_publish(timeout=broker.timeout_s)
        except (ValueError, RuntimeError) as exc:
            raise PublishError(f"publish failed: {exc}") from None
        if not info.is_published():
            raise PublishError(f"no PUBACK from {broker.host}:{broker.port} within {broker.timeout_s:g} s")
    finally:
        client.disconnect()
        client.loop_stop()
    log.info("published %d bytes retained to %s", len(payload), topic)


def publish_bundle(bundle: str | Path | None, target: Target, broker: BrokerParams, *,
                   topic_prefix: str = DEFAULT_PREFIX, clear: bool = False, pub_paths: Sequence[str] = (),
                   limits: BundleLimits = BundleLimits()) -> tuple[str, str]:
    """Publish (or ``clear``) the retained bundle for ``target``; returns (topic, description)."""
    topic = topic_for(target, topic_prefix)
    if clear:
        if bundle is not None:
            raise PublishError("--clear takes no BUNDLE")
        publish(topic, b"", broker)
        return topic, "retained bundle cleared"
    if bundle is None:
        raise PublishError("give a BUNDLE file (or --clear)")
    path = Path(bundle)
    try:
        size = path.stat().st_size
        if size > limits.max_bundle_bytes:
            raise PublishError(f"{path}: {size} bytes is over the {limits.max_bundle_bytes}-byte bundle limit")
        data = path.read_bytes()
    except OSError as exc:
        raise PublishError(f"cannot read {path}: {exc.strerror}") from None
    what = check_bundle(data, target, pub_paths, limits)
    publish(topic, data, broker)
    return topic, f"{what}, {len(data)} bytes"


__all__ = ["BrokerParams", "PublishError", "check_bundle", "destination", "publish", "publish_bundle", "topic_for"]
