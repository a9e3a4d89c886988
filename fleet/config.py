"""Fleet configuration: one TOML file plus ``EDGE_FLEET_<SECTION>_<KEY>`` overrides.

Parsed once into frozen dataclasses, like the agent's configuration, so every
fleet command can trust what it reads; a bad value is a ``FleetConfigError``
naming the key, printed on one line by the CLI (exit 2).

File lookup: ``--config PATH``, else ``$EDGE_FLEET_CONFIG``, else
``/etc/edge-fleet/fleet.toml`` when it exists, else built-in defaults. The
state directory defaults to ``$STATE_DIRECTORY`` (what systemd's
``StateDirectory=edge-fleet`` sets for the retraining unit) or ``./fleet-state``;
the store, the artefacts and the signing key live under it unless configured.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from models.settings import (SettingsError, build_section, option, read_toml, reference_rows, section_types,
                             unknown)

ENV_PREFIX = "EDGE_FLEET_"
ENV_CONFIG = "EDGE_FLEET_CONFIG"
SYSTEM_CONFIG = Path("/etc/edge-fleet/fleet.toml")


class FleetConfigError(SettingsError):
    """A configuration value is missing, malformed or out of range."""


_opt = option


def default_state_dir() -> str:
    return os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "fleet-state"


@dataclass(frozen=True)
class FleetSection:
    state_dir: str = _opt("", "Directory for the store, artefacts and keys; empty: $STATE_DIRECTORY or ./fleet-state.")
    artefact_dir: str = _opt("", "Trained model directories and bundles; empty: <state_dir>/models.")
    signing_key: str = _opt("", "ed25519 private key that signs bundles; empty: <state_dir>/keys/bundle-signing.key.")
    log_level: str = _opt("INFO", "Log level of long-running commands.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass(frozen=True)
class StoreSection:
    url: str = _opt("", "sqlite:///PATH (relative) or sqlite:////ABS, or postgresql://...; empty: "
                        "sqlite <state_dir>/fleet.db.")
    busy_timeout_s: float = _opt(30.0, "SQLite: wait this long for a writer lock.", min=0.0)
    retention_s: float = _opt(0.0, "Forget samples and message ids older than this (PostgreSQL drops whole daily "
                                   "partitions; SQLite deletes rows), checked by the collector hourly; 0 keeps all.",
                              min=0.0)


@dataclass(frozen=True)
class MqttSection:
    host: str = _opt("localhost", "Broker host name.")
    port: int = _opt(1883, "Broker port.", min=1, max=65535)
    username: str = _opt("", "User name; empty for none.")
    password: str = _opt("", "Password.")
    tls_ca: str = _opt("", "CA certificate file; set to use TLS.")
    tls_cert: str = _opt("", "Client certificate for mutual TLS.")
    tls_key: str = _opt("", "Client private key for mutual TLS.")
    client_id: str = _opt("edge-fleet-collector-{hostname}", "Collector client id, unique per collector and "
                          "stable across its restarts (its persistent session keeps what arrives while it is "
                          "down); {hostname} is replaced by the host name.")
    shared_group: str = _opt("", "Subscribe as a member of $share/<group>/... so several collectors (each with "
                                 "its own client_id) split the messages; empty: plain subscriptions.")
    receive_maximum: int = _opt(200, "MQTT 5: unacknowledged messages the broker may send at once (the "
                                     "collector acknowledges after the commit).", min=1, max=65535)
    watch_broker_drops: bool = _opt(True, "Subscribe to the broker's $SYS drop counter and report drops.")
    topic_prefix: str = _opt("devices/{device_id}", "Device topic prefix template (as on the devices).")
    keepalive_s: int = _opt(60, "Keep-alive interval.", min=5, max=3600)
    protocol: str = _opt("3.1.1", "MQTT protocol version.", choices=("3.1.1", "5"))


@dataclass(frozen=True)
class CollectSection:
    batch_size: int = _opt(500, "Messages written per store transaction at most.", min=1)
    flush_interval_s: float = _opt(1.0, "Write what arrived at least this often.", min=0.01)
    max_queue: int = _opt(100_000, "Messages buffered between the MQTT thread and the writer.", min=100)
    max_message_bytes: int = _opt(4 * 1024 * 1024, "Larger messages are counted as bad.", min=1024)


@dataclass(frozen=True)
class TrainSection:
    source: str = _opt("collected", "Training rows: collected telemetry, or the origin's shadow history.",
                       choices=("collected", "shadow"))
    lookback_s: float = _opt(14 * 86400.0, "Train on at most this much recent history.", min=60.0)
    max_rows: int = _opt(100_000, "At most this many recent rows per device (a forest needs few; memory).",
                         min=100)
    holdout_fraction: float = _opt(0.2, "Most recent share of each device's rows held out for evaluation.",
                                   min=0.01, max=0.5)
    min_samples: int = _opt(200, "Fewer usable rows: the target is skipped.", min=20)
    features: tuple[str, ...] = _opt((), "Forest features; empty: the default set, those present.")
    lstm: bool = _opt(True, "Also train the LSTM forecaster.")
    forecast_metrics: tuple[str, ...] = _opt(("system.cpuUsage", "system.memoryPercent"),
                                             "Metrics the LSTM forecasts (those present are used).")
    step_s: float = _opt(60.0, "Forecast step (bucket mean) in seconds; as the devices' [forecast] step_s.",
                         min=0.0)
    seq_len: int = _opt(50, "LSTM input window (steps).", min=2)
    horizon: int = _opt(12, "LSTM forecast horizon (steps).", min=1)
    units: int = _opt(32, "LSTM cells.", min=1)
    epochs: int = _opt(30, "LSTM training epochs at most (early stopping).", min=1)
    time_features: bool = _opt(True, "Give the LSTM time-of-day inputs.")
    n_estimators: int = _opt(100, "Isolation Forest trees.", min=1)
    contamination: float = _opt(0.01, "Share of training rows above the warning threshold.", min=0.0001, max=0.5)
    max_eval_origins: int = _opt(300, "Forecast origins scored per device on the held-out slice.", min=10)
    seed: int = _opt(0, "Random seed of both trainers.")


@dataclass(frozen=True)
class PromoteSection:
    mase_margin: float = _opt(0.02, "Relative MASE change that counts (0.02: 2 % better or worse).", min=0.0)
    coverage_margin: float = _opt(0.02, "Change of the interval coverage error that counts.", min=0.0)
    anomaly_rate_margin: float = _opt(0.005, "Change of the anomaly rate on clean held-out data that counts.",
                                      min=0.0)
    precision_margin: float = _opt(0.05, "Change of precision on labelled events that counts.", min=0.0)
    max_clean_anomaly_rate: float = _opt(0.05, "A first model flagging more clean rows than this is not promoted.",
                                         min=0.0, max=1.0)
    publish: bool = _opt(True, "Publish a promoted model as a signed retained bundle.")
    expires_in: str = _opt("", "Bundle lifetime (e.g. 30d); empty: no expiry.")


@dataclass(frozen=True)
class DriftSection:
    method: str = _opt("psi", "Test per device and feature.", choices=("psi", "ks"))
    psi_threshold: float = _opt(0.25, "PSI above this is drift (0.1 moderate, 0.25 significant).", min=0.0)
    ks_threshold: float = _opt(0.2, "KS statistic above this is drift.", min=0.0, max=1.0)
    bins: int = _opt(10, "PSI bins (quantiles of the training data).", min=2, max=100)
    recent_s: float = _opt(86400.0, "Window of recent data compared with the training data.", min=60.0)
    min_samples: int = _opt(100, "Fewer recent or reference rows: no verdict.", min=10)
    min_drifted_features: int = _opt(1, "Drifted features needed to call a device drifting.", min=1)
    calibration: str = _opt("self", "self: each device and feature gets a threshold from its own variation "
                                    "(windows of its training data as long as the recent one, each against "
                                    "the rest); fixed: psi_threshold / ks_threshold for all.",
                            choices=("self", "fixed"))
    calibration_margin: float = _opt(2.0, "self: threshold = this x the largest window-vs-rest statistic "
                                          "(never below the fixed threshold).", min=1.0)
    coverage_drop: float = _opt(0.15, "Realised 80 % coverage below 0.8 - this is degraded accuracy.",
                                min=0.0, max=0.8)
    error_factor: float = _opt(1.5, "Recent forecast MAE above this x the training validation MAE is degraded.",
                               min=1.0)
    min_forecasts: int = _opt(20, "Scored forecast steps needed for an accuracy verdict.", min=1)


@dataclass(frozen=True)
class RetrainSection:
    interval_s: float = _opt(86400.0, "A target is due when its last training is older than this.", min=60.0)
    loop_interval_s: float = _opt(3600.0, "Pause between passes of `retrain --loop`.", min=1.0)
    targets: tuple[str, ...] = _opt((), "device:ID, group:NAME or fleet; empty: every device in the store.")


@dataclass(frozen=True)
class SourceSection:
    shadow_url: str = _opt("", "Database holding the origin's shadow history; empty: the fleet store.")
    shadow_table: str = _opt("device_shadow_history", "Table (device_uuid, timestamp, reported_state).")


@dataclass(frozen=True)
class FleetConfig:
    fleet: FleetSection = field(default_factory=FleetSection)
    store: StoreSection = field(default_factory=StoreSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    collect: CollectSection = field(default_factory=CollectSection)
    train: TrainSection = field(default_factory=TrainSection)
    promote: PromoteSection = field(default_factory=PromoteSection)
    drift: DriftSection = field(default_factory=DriftSection)
    retrain: RetrainSection = field(default_factory=RetrainSection)
    source: SourceSection = field(default_factory=SourceSection)
    # group name -> device ids ([groups] table); devices may also report "groups" in their twin.
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    path: str = ""

    # -- resolved paths --------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return Path(self.fleet.state_dir or default_state_dir())

    @property
    def artefact_dir(self) -> Path:
        return Path(self.fleet.artefact_dir) if self.fleet.artefact_dir else self.state_dir / "models"

    @property
    def signing_key(self) -> Path:
        return Path(self.fleet.signing_key) if self.fleet.signing_key else \
            self.state_dir / "keys" / "bundle-signing.key"

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{self.state_dir / 'fleet.db'}"


def _section_classes() -> dict[str, type]:
    return section_types(FleetConfig, exclude=("groups", "path"))


def _env_values(name: str, cls_fields: Any, env: Mapping[str, str]) -> dict[str, str]:
    """{key: value} of the EDGE_FLEET_<SECTION>_<KEY> variables set for one section."""
    prefix = f"{ENV_PREFIX}{name.upper()}_"
    return {k[len(prefix):].lower(): v for k, v in env.items()
            if k.startswith(prefix) and k[len(prefix):].lower() in cls_fields}


def _groups(raw: Any) -> dict[str, tuple[str, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise FleetConfigError("groups: expected a table of NAME = [device ids]")
    out: dict[str, tuple[str, ...]] = {}
    for name, members in raw.items():
        if not isinstance(members, (list, tuple)) or not all(isinstance(m, str) and m for m in members):
            raise FleetConfigError(f"groups.{name}: expected a list of device ids")
        out[str(name)] = tuple(members)
    return out


def config_from_dict(doc: Mapping[str, Any], env: Mapping[str, str] | None = None, path: str = "") -> FleetConfig:
    env = os.environ if env is None else env
    classes = _section_classes()
    for name in doc:
        if name not in classes and name != "groups":
            raise unknown("section", name, [*classes, "groups"], FleetConfigError)
    sections = {}
    for name, cls in classes.items():
        keys = {f for f in cls.__dataclass_fields__}
        sections[name] = build_section(name, cls, doc.get(name, {}), _env_values(name, keys, env),
                                       env_prefix=ENV_PREFIX, error=FleetConfigError)
    return FleetConfig(**sections, groups=_groups(doc.get("groups")), path=path)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> FleetConfig:
    """The configuration a fleet command runs with (see the module docstring for the lookup)."""
    env = os.environ if env is None else env
    chosen = Path(path) if path else (Path(env[ENV_CONFIG]) if env.get(ENV_CONFIG) else None)
    if chosen is None and SYSTEM_CONFIG.is_file():
        chosen = SYSTEM_CONFIG
    if chosen is None:
        return config_from_dict({}, env)
    return config_from_dict(read_toml(chosen, FleetConfigError), env, str(chosen))


def describe() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, meaning) of every key: the README table and the example file."""
    return reference_rows(_section_classes())
