"""Configuration: one TOML file plus ``EDGE_AGENT_<SECTION>_<KEY>`` overrides.

Parsed once at start-up into frozen dataclasses, so the rest of the agent can
trust every value it reads.  Every problem becomes a :class:`ConfigError` whose
message names the key and what is allowed; the CLI prints it on one line and
exits 2, because a traceback tells an operator nothing about their typo.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from models.features import spec_from_names
from models.settings import SettingsError, build_section, option, read_toml, reference_rows, section_types, unknown

ENV_PREFIX = "EDGE_AGENT_"
ENV_CONFIG = "EDGE_AGENT_CONFIG"
SYSTEM_CONFIG = Path("/etc/edge-agent/agent.toml")


class ConfigError(SettingsError):
    """A configuration value is missing, malformed or out of range."""


_opt = option


def _default_state_dir() -> str:
    xdg = os.environ.get("XDG_STATE_HOME")
    return str(Path(xdg) / "edge-agent") if xdg else "state"


@dataclass(frozen=True)
class AgentSection:
    device_id: str = _opt("", "Device id; empty means the host name.")
    state_dir: Path = _opt(Path(_default_state_dir()), "Where the database and models live; relative to the "
                           "configuration file's directory (to the working directory without a file).")
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
    shutdown_timeout_s: float = _opt(2.0, "On stop, wait this long for the queued messages' and 'offline' PUBACKs.",
                                     min=0.0, max=30.0)
    telemetry_interval_s: float = _opt(60.0, "Seconds between telemetry batches; each carries the samples "
                                       "committed since the last (a durable cursor: none lost on a crash).",
                                       min=0.1, max=3600.0)


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
    trusted_keys: tuple[str, ...] = _opt((), "Paths of ed25519 public keys that may sign model bundles "
                                          "(relative to the configuration file's directory).")
    max_bundle_bytes: int = _opt(16 * 1024 * 1024, "A larger bundle is refused before it is parsed.", min=1024)
    health_samples: int = _opt(300, "Samples a new model runs on trial before it is confirmed.", min=1)
    health_anomaly_rate_factor: float = _opt(3.0, "Roll back above this many times the previous model's anomaly rate.", min=1.0)
    health_anomaly_rate_floor: float = _opt(0.05, "The allowed anomaly rate is never below this.", min=0.0, max=1.0)
    health_inference_budget_s: float = _opt(0.1, "Roll back when the median inference time is slower.", min=0.0001)
    poll_interval_s: float = _opt(2.0, "How often the daemon looks for model changes made by the CLI.", min=0.1)


@dataclass(frozen=True)
class MetricsSection:
    enabled: bool = _opt(False, "Serve Prometheus metrics over HTTP.")
    bind: str = _opt("127.0.0.1", "Listen address; beyond loopback a token or basic auth is required.")
    port: int = _opt(9848, "Listen port.", min=1, max=65535)
    token: str = _opt("", "Scrape token: 'Authorization: Bearer <token>' (Prometheus' authorization).")
    basic_user: str = _opt("", "HTTP basic auth user name (with basic_password).")
    basic_password: str = _opt("", "HTTP basic auth password.")
    allow_unauthenticated: bool = _opt(False, "Allow a non-loopback bind without token or basic auth.")


@dataclass(frozen=True)
class HealthSection:
    stale_factor: float = _opt(5.0, "Samples older than this many intervals mean the agent is stalled.", min=1.0)
    min_stale_s: float = _opt(30.0, "Never call samples stale sooner than this.", min=0.0)
    outbox_max_depth: int = _opt(5000, "More queued messages than this is unhealthy.", min=1)
    required_models: tuple[str, ...] = _opt((), "Model kinds that must be installed (e.g. forest).")


@dataclass(frozen=True)
class DetectSection:
    features: tuple[str, ...] = _opt(("system.cpuUsage", "system.memoryPercent", "system.diskPercent",
                                      "system.swapPercent", "system.load1", "disk.readBytesPerSec",
                                      "disk.writeBytesPerSec", "network.bytesReceivedPerSec",
                                      "network.bytesSentPerSec", "system.temperature"),
                                     "Metrics the detectors watch (absent ones are ignored; counters are refused).")
    window_stats: bool = _opt(True, "Also z-score each metric's first difference and short rolling mean.")
    stats_window: int = _opt(10, "Samples in that short rolling mean.", min=2, max=1000)
    zscore_window: int = _opt(3000, "Samples in the rolling median/MAD baseline of the z-score.", min=10, max=100000)
    zscore_warmup: int = _opt(30, "Samples before the z-score reports anything.", min=1, max=100000)
    z_warning: float = _opt(4.0, "Robust |z| at which a sample is a warning.", min=0.1)
    z_critical: float = _opt(6.0, "Robust |z| at which a sample is critical.", min=0.1)
    open_after: int = _opt(3, "Consecutive abnormal samples that open an anomaly episode.", min=1, max=10000)
    close_after: int = _opt(5, "Consecutive normal samples that close it.", min=1, max=10000)
    explain_top_k: int = _opt(3, "Features named in an anomaly's explanation.", min=1, max=100)
    daily_profile: bool = _opt(True, "Also compare each metric with its time-of-day profile (anomaly_score).")
    novelty: bool = _opt(True, "Also flag a metric's never-seen level-to-level transition (anomaly_score).")
    novelty_learn_samples: int = _opt(750, "Samples whose range sets the novelty bins; silent until then.",
                                      min=10, max=1000000)
    novelty_rest_samples: int = _opt(150, "Samples anomaly_score stays 0 after an alarm (one incident, one alarm).",
                                     min=0, max=1000000)
    use_forest: bool = _opt(True, "Use an Isolation Forest beside the z-score once one is installed.")
    forest_bootstrap: bool = _opt(True, "Train a forest on the device when none is installed, and retrain it.")
    forest_train_after: int = _opt(100, "Clean samples needed to train a forest.", min=10)
    forest_retrain_every_s: float = _opt(86400.0, "Retrain the device's own forest this often.", min=60.0)
    forest_n_estimators: int = _opt(100, "Trees in the forest.", min=1, max=1000)
    forest_contamination: float = _opt(0.01, "Share of training samples above the warning threshold.",
                                       min=0.0001, max=0.5)

    def __post_init__(self) -> None:
        if self.z_warning > self.z_critical:
            raise ConfigError("detect.z_warning: must not exceed detect.z_critical")
        if self.zscore_warmup > self.zscore_window:
            raise ConfigError("detect.zscore_warmup: must not exceed detect.zscore_window")
        if not self.features:
            raise ConfigError("detect.features: expected at least one metric")
        try:  # the daemon builds the same spec at start; refuse here, where the key can be named
            spec_from_names(self.features)
        except ValueError as exc:
            raise ConfigError(f"detect.features: {exc}; use a percentage or a rate "
                              "(e.g. system.memoryPercent, network.bytesReceivedPerSec)") from None


@dataclass(frozen=True)
class ForecastSection:
    enabled: bool = _opt(True, "Forecast metrics on the device (fallback models; an installed LSTM joins).")
    metrics: tuple[str, ...] = _opt(("system.cpuUsage", "system.memoryPercent", "system.diskPercent",
                                     "system.load1", "system.temperature"),
                                    "Metrics to forecast (names or globs); metrics with a limit are added.")
    step_s: float = _opt(60.0, "Forecast step: samples are averaged over this many seconds.", min=1.0, max=86400.0)
    horizon: int = _opt(12, "Steps ahead each forecast covers.", min=1, max=1000)
    publish_every_s: float = _opt(300.0, "How often forecasts are stored and sent over MQTT.", min=1.0)
    retention_s: float = _opt(7 * 86400.0, "Keep stored forecasts this long.", min=60.0)
    season_s: float = _opt(86400.0, "Season length the fallback models look for.", min=0.0)
    history_max_steps: int = _opt(6000, "Steps of history kept per metric (and read back at start).", min=16,
                                  max=1000000)
    refit_every_steps: int = _opt(60, "Steps between refits of a metric's fallback model.", min=1)
    limits: tuple[str, ...] = _opt(("system.diskPercent*=95", "system.memoryPercent=95"),
                                   "METRIC=LIMIT pairs (globs allowed): exhaustion ETAs are computed for these.")
    warning_eta_s: float = _opt(86400.0, "An ETA to a limit at or below this opens a warning.", min=0.0)
    critical_eta_s: float = _opt(3600.0, "An ETA to a limit at or below this is critical.", min=0.0)
    trend_window_s: float = _opt(86400.0, "History of the trend used for ETAs beyond the horizon.", min=60.0)
    conformal_window: int = _opt(500, "Residuals per step behind the prediction intervals.", min=2, max=100000)
    aci_gamma: float = _opt(0.005, "Adaptive conformal step size; 0 = plain split conformal.", min=0.0, max=1.0)
    selector_margin: float = _opt(0.1, "Relative MAE gain a model needs to replace the published one.", min=0.0,
                                  max=1.0)
    train_epochs: int = _opt(30, "`train --kind forecast`: most training epochs (early stopping).", min=1)
    train_units: int = _opt(32, "`train --kind forecast`: LSTM cells.", min=1, max=1024)
    train_seq_len: int = _opt(50, "`train --kind forecast`: steps of history the LSTM sees.", min=2, max=10000)

    def __post_init__(self) -> None:
        if self.critical_eta_s > self.warning_eta_s:
            raise ConfigError("forecast.critical_eta_s: must not exceed forecast.warning_eta_s")
        for spec in self.limits:
            name, sep, value = spec.rpartition("=")
            try:
                float(value)
            except ValueError:
                sep = ""
            if not sep or not name.strip():
                raise ConfigError(f"forecast.limits: expected METRIC=LIMIT (e.g. system.diskPercent=95), got {spec!r}")
        if not self.metrics and not self.limits:
            raise ConfigError("forecast.metrics: expected at least one metric (or a limit)")


@dataclass(frozen=True)
class ClustersSection:
    enabled: bool = _opt(True, "Check this device against its fleet cluster (needs a 'cluster' model bundle).")
    check_every_s: float = _opt(3600.0, "Seconds between behaviour-profile checks.", min=60.0)
    profile_window_s: float = _opt(86400.0, "Samples one profile summarises; match the fleet's clusters --window-s.",
                                   min=600.0)
    min_coverage: float = _opt(0.5, "The window's samples must span this share of it.", min=0.0, max=1.0)
    stay_beyond_checks: int = _opt(3, "Consecutive checks beyond the radius before a cluster_deviation event.",
                                   min=1)
    close_after_checks: int = _opt(3, "Consecutive checks inside the radius before the event closes.", min=1)
    critical_factor: float = _opt(2.0, "Beyond this many radii the deviation is critical.", min=1.0)
    max_profile_rows: int = _opt(5000, "Stored samples per check are subsampled to this many.", min=100)


@dataclass(frozen=True)
class WebSection:
    enabled: bool = _opt(False, "Serve the read-only web page (charts, forecasts, anomalies, status).")
    bind: str = _opt("127.0.0.1", "Listen address; beyond loopback a token or basic auth is required.")
    port: int = _opt(9850, "Listen port.", min=1, max=65535)
    token: str = _opt("", "Access token: 'Authorization: Bearer <token>' or ?token=<token> once (sets a cookie).")
    basic_user: str = _opt("", "HTTP basic auth user name (with basic_password).")
    basic_password: str = _opt("", "HTTP basic auth password.")
    allow_unauthenticated: bool = _opt(False, "Allow a non-loopback bind without token or basic auth.")
    max_points: int = _opt(2000, "Values per chart at most (min/max downsampling).", min=100, max=20000)


@dataclass(frozen=True)
class MaintenanceSection:
    enabled: bool = _opt(True, "Score the failure-risk model pushed by the fleet (kind maintenance) when one is installed.")
    score_every_s: float = _opt(3600.0, "Seconds between failure-risk scores.", min=10.0)
    warning_risk: float = _opt(0.0, "Risk that opens a warning; 0 uses the model's own threshold.", min=0.0, max=1.0)
    critical_risk: float = _opt(0.0, "Risk that makes it critical; 0 uses the model's own threshold.", min=0.0, max=1.0)
    top_features: int = _opt(3, "Contributing features reported with the risk.", min=0, max=20)
    close_after: int = _opt(2, "Scores below warning that close a failure-risk episode.", min=1)


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
    detect: DetectSection = field(default_factory=DetectSection)
    forecast: ForecastSection = field(default_factory=ForecastSection)
    clusters: ClustersSection = field(default_factory=ClustersSection)
    web: WebSection = field(default_factory=WebSection)
    maintenance: MaintenanceSection = field(default_factory=MaintenanceSection)
    source: str = ""  # where the configuration came from, for status and logs

    @property
    def device_id(self) -> str:
        return self.agent.device_id

    @property
    def db_path(self) -> Path:
        return self.agent.state_dir / "agent.db"


def _sections() -> dict[str, type]:
    return section_types(AgentConfig, exclude=("source",))


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    sections = _sections()
    out: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            raise ConfigError(f"environment {name}: "
                              + str(unknown("section", rest.split("_")[0], list(sections), ConfigError)))
        out.setdefault(section, {})[rest[len(section) + 1:]] = value
    return out


def parse(data: Mapping[str, Any], environ: Mapping[str, str] | None = None, source: str = "") -> AgentConfig:
    """Build the configuration from parsed TOML and the environment."""
    environ = os.environ if environ is None else environ
    sections = _sections()
    for name, value in data.items():
        if name not in sections:
            raise unknown("section", name, list(sections), ConfigError)
    env = _env_overrides(environ)
    built = {name: build_section(name, cls, data.get(name, {}), env.get(name, {}), env_prefix=ENV_PREFIX,
                                 error=ConfigError)
             for name, cls in sections.items()}
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


def _relative_to(base: Path, value: Any) -> Any:
    """A relative path string from a file, anchored at the file's directory (other values unchanged)."""
    if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
        return str(base / value)
    return value


def anchor_paths(data: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """Relative ``agent.state_dir`` and ``models.trusted_keys`` in a file mean relative to that file.

    Why: `edge-agent status --config agent/agent.local.toml` must read the database `make run`
    wrote whichever directory it is typed in. Environment overrides stay relative to the working
    directory, like any path typed in a shell.
    """
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    agent, models = out.get("agent"), out.get("models")
    if isinstance(agent, dict) and "state_dir" in agent:
        agent["state_dir"] = _relative_to(base, agent["state_dir"])
    if isinstance(models, dict) and isinstance(models.get("trusted_keys"), list):
        models["trusted_keys"] = [_relative_to(base, v) for v in models["trusted_keys"]]
    return out


def load(cli_path: str | None = None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Load the configuration the way every command does."""
    path = resolve_path(cli_path, environ)
    if path is None:
        return parse({}, environ, source="built-in default")
    return parse(anchor_paths(read_toml(path, ConfigError), path.absolute().parent), environ, source=str(path))


EXAMPLE_PATH = Path(__file__).with_name("agent.example.toml")
SECRET_KEYS = frozenset({"mqtt.password", "web.token", "web.basic_password"})


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def render_toml(cfg: AgentConfig, mask_secrets: bool = True) -> str:
    """The effective configuration (file + environment + defaults) as TOML that parses back to it.

    Why: with a file, an /etc default and environment overrides, "what is the agent actually
    using?" deserves one command (``edge-agent config``), like ``telegraf config``."""
    out: list[str] = []
    for name in _sections():
        section = getattr(cfg, name)
        out.append(f"[{name}]")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if mask_secrets and f"{name}.{f.name}" in SECRET_KEYS and value:
                value = "***"
            out.append(f"{f.name} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def reference() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every key: feeds the README table and a consistency test."""
    return reference_rows(_sections())


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


def write_readme(path: Path) -> None:
    """Replace the README's generated tables (between the config-reference markers)."""
    text = path.read_text(encoding="utf-8")
    begin, end = "<!-- config-reference:begin -->\n", "<!-- config-reference:end -->"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(head + begin + reference_markdown() + end + tail, encoding="utf-8")


if __name__ == "__main__":  # python -m agent.config [README.md]: print the tables, or rewrite them in place
    import sys

    if len(sys.argv) > 1:
        write_readme(Path(sys.argv[1]))
    else:
        sys.stdout.write(reference_markdown())
