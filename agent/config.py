"""Configuration: one TOML file plus ``EDGE_AGENT_<SECTION>_<KEY>`` overrides.

Parsed once at start-up into frozen dataclasses, so the rest of the agent can
trust every value it reads.  Every problem becomes a :class:`ConfigError` whose
message names the key and what is allowed; the CLI prints it on one line and
exits 2, because a traceback tells an operator nothing about their typo.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import socket
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "EDGE_AGENT_"
ENV_CONFIG = "EDGE_AGENT_CONFIG"
SYSTEM_CONFIG = Path("/etc/edge-agent/agent.toml")


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


def _opt(default: Any, doc: str, **rules: Any) -> Any:
    """A dataclass field with validation rules (min, max, choices) and a doc line."""
    return field(default=default, metadata={"doc": doc, **rules})


def _default_state_dir() -> str:
    xdg = os.environ.get("XDG_STATE_HOME")
    return str(Path(xdg) / "edge-agent") if xdg else "state"


@dataclass(frozen=True)
class AgentSection:
    device_id: str = _opt("", "Device id; empty means the host name.")
    state_dir: Path = _opt(Path(_default_state_dir()), "Where the database and models live.")
    interval_s: float = _opt(1.0, "Seconds between samples.", min=0.01, max=3600.0)
    groups: tuple[str, ...] = _opt((), "Fleet groups this device belongs to (model bundles).")
    log_level: str = _opt("INFO", "Log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = _opt("text", "Log line format.", choices=("text", "json"))


@dataclass(frozen=True)
class SamplingSection:
    mounts: tuple[str, ...] = _opt(("/",), "Mount points whose usage is sampled; the first is system.disk*.")
    per_cpu: bool = _opt(False, "Also sample per-core CPU usage.")
    temperature: bool = _opt(True, "Sample the SoC temperature where a sensor exists.")


@dataclass(frozen=True)
class StoreSection:
    commit_interval_s: float = _opt(5.0, "Seconds between SQLite commits (SD card wear).", min=0.0, max=600.0)
    retention_s: float = _opt(7 * 86400.0, "Keep samples this long.", min=60.0)
    max_db_bytes: int = _opt(256 * 1024 * 1024, "Trim oldest samples beyond this database size.", min=1024 * 1024)
    memory_buffer_rows: int = _opt(3600, "Samples held in memory while the disk is unwritable.", min=10)


@dataclass(frozen=True)
class MqttSection:
    enabled: bool = _opt(True, "Report to an MQTT broker (the agent runs fine while it is unreachable).")
    host: str = _opt("localhost", "Broker host name.")
    port: int = _opt(1883, "Broker port.", min=1, max=65535)
    username: str = _opt("", "User name; empty for none.")
    password: str = _opt("", "Password.")
    tls_ca: str = _opt("", "CA certificate file; set to use TLS.")
    tls_cert: str = _opt("", "Client certificate for mutual TLS.")
    tls_key: str = _opt("", "Client private key for mutual TLS.")
    topic_prefix: str = _opt("devices/{device_id}", "Topic prefix template.")
    preset: str = _opt("default", "Topic preset.", choices=("default", "origin"))
    protocol: str = _opt("3.1.1", "MQTT protocol version.", choices=("3.1.1", "5"))
    keepalive_s: int = _opt(60, "Keep-alive interval.", min=5, max=3600)
    client_id: str = _opt("", "Client id; empty means the device id.")
    tls_insecure: bool = _opt(False, "Skip the broker host-name check (the CA is still checked).")
    session_expiry_s: int = _opt(604800, "MQTT 5: how long the broker keeps the session.", min=0)
    reconnect_min_s: float = _opt(1.0, "Reconnect backoff lower bound (exponential, with jitter).", min=0.1)
    reconnect_max_s: float = _opt(120.0, "Reconnect backoff upper bound.", min=0.1)
    connect_timeout_s: float = _opt(10.0, "TCP/TLS connect timeout.", min=0.5)
    max_inflight: int = _opt(20, "Unacknowledged messages at once.", min=1, max=65535)
    ack_timeout_s: float = _opt(60.0, "Re-send a message with no PUBACK after this long while connected.", min=1.0)
    drain_budget_s: float = _opt(0.2, "Most time per tick spent draining a backlog.", min=0.0, max=5.0)
    subscribe_models: bool = _opt(True, "Subscribe to the model bundle topics.")
    max_inbound_queue: int = _opt(1000, "Inbound messages beyond this are dropped and counted.", min=1)
    shutdown_timeout_s: float = _opt(2.0, "Wait this long for the 'offline' PUBACK on stop.", min=0.0, max=30.0)


@dataclass(frozen=True)
class OutboxSection:
    max_rows: int = _opt(10000, "Messages kept while the broker is away; telemetry is dropped first.", min=10)
    max_bytes: int = _opt(16 * 1024 * 1024, "Bytes kept in the outbox.", min=64 * 1024)
    max_message_bytes: int = _opt(256 * 1024, "A larger message is refused and counted.", min=1024)


@dataclass(frozen=True)
class CommandsSection:
    max_payload_bytes: int = _opt(8192, "A larger command request gets an error reply.", min=64)
    min_interval_s: float = _opt(0.5, "Smallest interval set-interval accepts.", min=0.01)
    max_interval_s: float = _opt(3600.0, "Largest interval set-interval accepts.", min=0.01)
    remember_ids: int = _opt(64, "Replies kept to answer a redelivered request without re-running it.", min=0)


@dataclass(frozen=True)
class ModelsSection:
    trusted_keys: tuple[str, ...] = _opt((), "Paths of ed25519 public keys that may sign model bundles.")
    max_bundle_bytes: int = _opt(16 * 1024 * 1024, "A larger bundle is refused before it is parsed.", min=1024)
    health_samples: int = _opt(300, "Samples a new model runs on trial before it is confirmed.", min=1)
    health_anomaly_rate_factor: float = _opt(3.0, "Roll back above this many times the previous model's anomaly rate.", min=1.0)
    health_anomaly_rate_floor: float = _opt(0.05, "The allowed anomaly rate is never below this.", min=0.0, max=1.0)
    health_inference_budget_s: float = _opt(0.1, "Roll back when the median inference time is slower.", min=0.0001)
    poll_interval_s: float = _opt(2.0, "How often the daemon looks for model changes made by the CLI.", min=0.1)


@dataclass(frozen=True)
class MetricsSection:
    enabled: bool = _opt(False, "Serve Prometheus metrics over HTTP.")
    bind: str = _opt("127.0.0.1", "Listen address; keep it local unless a firewall protects the device.")
    port: int = _opt(9848, "Listen port.", min=1, max=65535)


@dataclass(frozen=True)
class HealthSection:
    stale_factor: float = _opt(5.0, "Samples older than this many intervals mean the agent is stalled.", min=1.0)
    min_stale_s: float = _opt(30.0, "Never call samples stale sooner than this.", min=0.0)
    outbox_max_depth: int = _opt(5000, "More queued messages than this is unhealthy.", min=1)
    required_models: tuple[str, ...] = _opt((), "Model kinds that must be installed (e.g. forest).")


@dataclass(frozen=True)
class AgentConfig:
    agent: AgentSection = field(default_factory=AgentSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    store: StoreSection = field(default_factory=StoreSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    commands: CommandsSection = field(default_factory=CommandsSection)
    models: ModelsSection = field(default_factory=ModelsSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    health: HealthSection = field(default_factory=HealthSection)
    source: str = ""  # where the configuration came from, for status and logs

    @property
    def device_id(self) -> str:
        return self.agent.device_id

    @property
    def db_path(self) -> Path:
        return self.agent.state_dir / "agent.db"


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(AgentConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(AgentConfig) if f.name != "source"}


def _unknown(kind: str, name: str, allowed: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown {kind} '{name}'{hint}; allowed: {', '.join(sorted(allowed))}")


def _coerce(key: str, value: Any, kind: Any, from_env: bool) -> Any:
    """Turn a TOML or environment value into the field's type, or say what is allowed."""
    origin = typing.get_origin(kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_env and str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return str(value).lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_env:
            try:
                return int(str(value).strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_env:
            try:
                return float(str(value).strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if kind is Path:
        if isinstance(value, str) and value:
            return Path(value).expanduser()
        raise ConfigError(f"{key}: expected a non-empty path, got {value!r}")
    if origin is tuple:
        if from_env and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {kind}")  # pragma: no cover - programming error


def _check_rules(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{key}: must be >= {meta['min']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{key}: must be <= {meta['max']}, got {value!r}")


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    sections = _sections()
    out: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            raise ConfigError(f"environment {name}: " + str(_unknown("section", rest.split("_")[0], list(sections))))
        out.setdefault(section, {})[rest[len(section) + 1:]] = value
    return out


def _build_section(name: str, cls: type, raw: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in list(raw) + list(env):
        if key not in fields:
            raise _unknown("key", f"{name}.{key}", [f"{name}.{k}" for k in fields])
    values: dict[str, Any] = {}
    for key, f in fields.items():
        if key in env:
            value = _coerce(f"{name}.{key} (from {ENV_PREFIX}{name.upper()}_{key.upper()})", env[key], hints[key], True)
        elif key in raw:
            value = _coerce(f"{name}.{key}", raw[key], hints[key], False)
        else:
            continue
        _check_rules(f"{name}.{key}", value, f.metadata)
        values[key] = value
    return cls(**values)


def parse(data: Mapping[str, Any], environ: Mapping[str, str] | None = None, source: str = "") -> AgentConfig:
    """Build the configuration from parsed TOML and the environment."""
    environ = os.environ if environ is None else environ
    sections = _sections()
    for name, value in data.items():
        if name not in sections:
            raise _unknown("section", name, list(sections))
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a [{name}] table, got {value!r}")
    env = _env_overrides(environ)
    built = {name: _build_section(name, cls, data.get(name, {}), env.get(name, {})) for name, cls in sections.items()}
    if not built["agent"].device_id:
        built["agent"] = dataclasses.replace(built["agent"], device_id=socket.gethostname())
    _check_cross_field(built)
    return AgentConfig(**built, source=source)


def _check_cross_field(built: dict[str, Any]) -> None:
    device_id = built["agent"].device_id
    if any(ch in device_id for ch in "/#+") or not device_id.isprintable():
        raise ConfigError(f"agent.device_id: must not contain '/', '#', '+' or control characters, got {device_id!r}")
    if "{device_id}" not in built["mqtt"].topic_prefix:
        raise ConfigError("mqtt.topic_prefix: must contain '{device_id}'")
    if bool(built["mqtt"].tls_cert) != bool(built["mqtt"].tls_key):
        raise ConfigError("mqtt.tls_cert and mqtt.tls_key: set both for mutual TLS, or neither")
    if built["mqtt"].reconnect_min_s > built["mqtt"].reconnect_max_s:
        raise ConfigError("mqtt.reconnect_min_s: must not exceed mqtt.reconnect_max_s")
    if built["commands"].min_interval_s > built["commands"].max_interval_s:
        raise ConfigError("commands.min_interval_s: must not exceed commands.max_interval_s")
    if not built["sampling"].mounts:
        raise ConfigError("sampling.mounts: expected at least one mount point")


def resolve_path(cli_path: str | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """--config, then $EDGE_AGENT_CONFIG, then /etc/edge-agent/agent.toml, else the built-in default."""
    environ = os.environ if environ is None else environ
    if cli_path:
        return Path(cli_path)
    if environ.get(ENV_CONFIG):
        return Path(environ[ENV_CONFIG])
    if SYSTEM_CONFIG.exists():
        return SYSTEM_CONFIG
    return None


def load(cli_path: str | None = None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Load the configuration the way every command does."""
    path = resolve_path(cli_path, environ)
    if path is None:
        return parse({}, environ, source="built-in default")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except PermissionError:
        raise ConfigError(f"config file {path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path}: is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
    return parse(data, environ, source=str(path))


def reference() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every key: feeds the README table and a consistency test."""
    rows = []
    for name, cls in _sections().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            kind = hints[f.name]
            kind_name = "list of strings" if typing.get_origin(kind) is tuple else getattr(kind, "__name__", str(kind))
            rows.append((f"{name}.{f.name}", kind_name, default, f.metadata.get("doc", "")))
    return rows


__all__ = ["AgentConfig", "ConfigError", "load", "parse", "reference", "resolve_path"]


def reference_markdown() -> str:
    """The README's configuration tables, generated so the two can never disagree."""
    out: list[str] = []
    section = None
    for key, kind, default, doc in reference():
        name = key.split(".", 1)[0]
        if name != section:
            section = name
            out += ["", f"**[{name}]**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        shown = list(default) if isinstance(default, tuple) else default
        shown = f'"{shown}"' if isinstance(shown, (str, Path)) else shown
        shown = str(shown).lower() if isinstance(default, bool) else shown
        out.append(f"| `{key}` | {kind} | `{shown}` | {doc} |")
    return "\n".join(out[1:]) + "\n"


if __name__ == "__main__":  # python -m agent.config > the README's reference tables
    import sys

    sys.stdout.write(reference_markdown())
