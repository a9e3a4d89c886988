"""Optional Prometheus endpoint: text exposition format 0.0.4, written by hand.

Off by default and bound to 127.0.0.1: a device should not grow a listening
port unless its operator asks for one.  The web page's exposure rule applies
(``agent.web.check_exposure``): a bind beyond loopback without ``token`` or
``basic_user``/``basic_password`` is refused at start (logged, the endpoint
stays off) unless ``allow_unauthenticated = true``; with a credential every
scrape must carry it (Prometheus' ``authorization`` or ``basic_auth``).  The main loop owns every piece of
state; once per tick it hands over a snapshot (a plain dict) that
:meth:`MetricsServer.publish` deep-freezes and swaps in with one reference
assignment.  The HTTP thread only ever reads the current frozen snapshot, so
it never touches SQLite, never takes a lock the loop needs, and a slow
scraper cannot slow sampling down.

Sampled metrics are exported as one gauge family with the metric name as a
label, ``edge_agent_metric{name="system.cpuUsage"}``, rather than one family
per sanitised name: names such as ``system.diskUsed:/data`` survive intact,
two names can never collide after sanitising, and the label matches the
twin's reported state one to one.  The price is mixed units in one family;
filter by ``name`` in queries.

Snapshot keys (all optional; absent keys produce no series)::

    device_id: str, version: str
    samples_taken: int, ticks_skipped: int, component_errors: int   (cumulative)
    loop_lag_s: float
    sample: {"ts_s": float, "values": {metric name: float}}
    anomalies: {severity: int}                                        (cumulative)
    outbox: {"depth": int, "dropped": int}
    mqtt: {"connected": bool}
    models: [{"kind": str, "version": int,
              "inference_s_sum": float, "inference_count": int}]
    forecast_coverage: [{"metric": str, "level": float, "coverage": float}]
    forecast_mase: [{"metric": str, "model": str, "mase": float}]
"""
from __future__ import annotations

import logging
import math
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from types import MappingProxyType
from typing import Any, Callable, Mapping

from agent.httpserve import LocalHTTPServer, serve_in_thread, shutdown
from agent.web import Authenticator, WebConfigError, check_exposure

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "edge_agent_"


@dataclass(frozen=True)
class MetricsParams:
    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = 9848  # 0 picks a free port (tests)
    token: str = ""
    basic_user: str = ""
    basic_password: str = ""
    allow_unauthenticated: bool = False

    @property
    def has_auth(self) -> bool:
        return bool(self.token) or bool(self.basic_user and self.basic_password)


# -- exposition format -------------------------------------------------------------

def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float | int | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class Family:
    """One metric family: HELP and TYPE once, then its samples, as 0.0.4 requires."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = PREFIX + name
        self.kind = kind
        self.help_text = help_text
        self.samples: list[tuple[str, tuple[tuple[str, str], ...], float | int | bool]] = []

    def add(self, value: float | int | bool, suffix: str = "", **labels: object) -> "Family":
        if self.kind == "counter" and not suffix:
            suffix = "_total"
        self.samples.append((suffix, tuple((k, str(v)) for k, v in labels.items()), value))
        return self

    def render(self) -> str:
        # Counters are declared by their _total name, the way prometheus_client writes them.
        declared = self.name + ("_total" if self.kind == "counter" else "")
        out = [f"# HELP {declared} {escape_help(self.help_text)}", f"# TYPE {declared} {self.kind}"]
        for suffix, labels, value in self.samples:
            label_text = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels)
            out.append(f"{self.name}{suffix}{{{label_text}}} {format_value(value)}" if labels
                       else f"{self.name}{suffix} {format_value(value)}")
        return "\n".join(out) + "\n"


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    return None


def build_families(snapshot: Mapping[str, Any], snapshot_age_s: float | None = None) -> list[Family]:
    """The families a snapshot yields, in a stable order; empty families are left out."""
    fams: list[Family] = []

    def single(name: str, kind: str, help_text: str, value: Any) -> None:
        number = _number(value)
        if number is not None:
            fams.append(Family(name, kind, help_text).add(number))

    def by_label(name: str, kind: str, help_text: str, values: Mapping[str, Any], label: str) -> None:
        fam = Family(name, kind, help_text)
        for key in sorted(values):
            number = _number(values[key])
            if number is not None:
                fam.add(number, **{label: key})
        fams.append(fam)

    info_labels = {k: snapshot[k] for k in ("device_id", "version") if isinstance(snapshot.get(k), str)}
    if info_labels:
        fams.append(Family("info", "gauge", "Agent identity; the value is always 1.").add(1, **info_labels))
    single("samples", "counter", "Samples taken since the agent started.", snapshot.get("samples_taken"))
    single("ticks_skipped", "counter", "Sampling ticks skipped because the loop fell behind.",
           snapshot.get("ticks_skipped"))
    single("component_errors", "counter", "Exceptions raised by plug-in components.",
           snapshot.get("component_errors"))
    single("loop_lag_seconds", "gauge", "How late the last loop iteration started.", snapshot.get("loop_lag_s"))
    if snapshot_age_s is not None:
        single("snapshot_age_seconds", "gauge", "Age of the published snapshot at scrape time.", snapshot_age_s)

    sample = snapshot.get("sample") or {}
    single("last_sample_timestamp_seconds", "gauge", "Wall-clock time of the newest sample (epoch).",
           sample.get("ts_s"))
    by_label("metric", "gauge", "Newest sampled value, by twin metric name (units vary by name).",
             sample.get("values") or {}, "name")
    by_label("anomalies", "counter", "Anomaly episodes opened, by severity.", snapshot.get("anomalies") or {},
             "severity")

    outbox = snapshot.get("outbox") or {}
    single("outbox_depth", "gauge", "Outbound messages waiting for a broker acknowledgement.", outbox.get("depth"))
    single("outbox_dropped", "counter", "Outbound messages dropped because the outbox was full.",
           outbox.get("dropped"))
    mqtt = snapshot.get("mqtt") or {}
    if isinstance(mqtt.get("connected"), bool):
        single("mqtt_connected", "gauge", "1 while connected to the MQTT broker.", mqtt["connected"])

    models = [m for m in snapshot.get("models") or () if isinstance(m, Mapping) and isinstance(m.get("kind"), str)]
    version = Family("model_version", "gauge", "Installed model version, by model kind.")
    latency = Family("model_inference_seconds", "summary", "Time spent in model inference, by model kind.")
    for model in sorted(models, key=lambda m: m["kind"]):
        number = _number(model.get("version"))
        if number is not None:
            version.add(number, kind=model["kind"])
        total, count = _number(model.get("inference_s_sum")), _number(model.get("inference_count"))
        if total is not None and count is not None:
            latency.add(total, "_sum", kind=model["kind"]).add(count, "_count", kind=model["kind"])
    fams += [version, latency]

    coverage = Family("forecast_coverage_ratio", "gauge",
                      "Share of recent actuals inside the forecast interval, by metric and nominal level.")
    for row in snapshot.get("forecast_coverage") or ():
        if not isinstance(row, Mapping):
            continue
        number, level = _number(row.get("coverage")), _number(row.get("level"))
        if number is not None and level is not None and isinstance(row.get("metric"), str):
            coverage.add(number, metric=row["metric"], level=format_value(float(level)))
    mase = Family("forecast_mase", "gauge",
                  "Rolling MAE of the published forecaster over the one-step naive MAE (< 1 beats naive), by metric.")
    for row in snapshot.get("forecast_mase") or ():
        number = _number(row.get("mase")) if isinstance(row, Mapping) else None
        if number is not None and isinstance(row.get("metric"), str):
            mase.add(number, metric=row["metric"], model=str(row.get("model", "")))
    fams += [coverage, mase]
    return [f for f in fams if f.samples]


def render(snapshot: Mapping[str, Any], snapshot_age_s: float | None = None) -> str:
    """The whole exposition for one scrape."""
    return "".join(f.render() for f in build_families(snapshot, snapshot_age_s))


def freeze(value: Any) -> Any:
    """A read-only deep copy: the HTTP thread can never see a half-updated dict."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


# -- HTTP server -------------------------------------------------------------------

class _Server(LocalHTTPServer):
    def __init__(self, address: tuple[str, int], exporter: "MetricsServer") -> None:
        self.exporter = exporter
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a stuck client must not hold a thread forever
    server_version = "edge-agent"
    sys_version = ""

    def _send(self, code: int, body: bytes, content_type: str, head: bool) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        path, _, query = self.path.partition("?")
        auth = self.server.exporter.auth
        if auth is not None and not auth.check(self.headers, urllib.parse.parse_qs(query))[0]:
            self.server.exporter.refused += 1
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="edge-agent"' if auth.basic else 'Bearer realm="edge-agent"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path == "/metrics":
            self._send(200, self.server.exporter.exposition().encode(), CONTENT_TYPE, head)
        elif path == "/":
            body = b'<html><body><a href="/metrics">edge-agent metrics</a></body></html>\n'
            self._send(200, body, "text/html; charset=utf-8", head)
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8", head)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        log.debug("scrape from %s: " + format, self.client_address[0], *args)


class MetricsServer:
    """Daemon component: serves the latest snapshot the main loop published.

    ``publish`` is the only call the loop makes (cheap: a deep freeze of a
    small dict); the server thread renders text per scrape.
    """

    name = "metrics"

    def __init__(self, params: MetricsParams, clock: Callable[[], float] = time.monotonic) -> None:
        self.params = params
        self._clock = clock
        self._current: tuple[float, Mapping[str, Any]] | None = None  # (published at, frozen snapshot)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.scrapes = 0
        self.refused = 0  # scrapes without the configured credential
        self.auth: Authenticator | None = None
        self.error: str | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        """Where it listens (the real port when params.port is 0)."""
        return None if self._server is None else self._server.bound

    def start(self, ctx: Any = None) -> None:
        if not self.params.enabled or self._server is not None:
            return
        try:
            check_exposure(self.params, section="metrics")
        except WebConfigError as exc:  # an open endpoint on the LAN: stay off, say why
            self.error = str(exc)
            log.error("metrics endpoint disabled: %s", exc)
            return
        self.auth = Authenticator(self.params) if self.params.has_auth else None
        try:
            self._server = _Server((self.params.bind, self.params.port), self)
        except OSError as exc:  # a taken port must not stop the agent from sampling
            log.error("metrics endpoint disabled: cannot listen on %s:%d: %s", self.params.bind, self.params.port, exc)
            return
        self._thread = serve_in_thread(self._server, "metrics-http")
        host, port = self.address or ("?", 0)
        log.info("Prometheus metrics on http://%s:%d/metrics", host, port)

    def publish(self, snapshot: Mapping[str, Any]) -> None:
        """Swap in a new snapshot; called from the main loop."""
        if self._server is None:
            return
        self._current = (self._clock(), freeze(snapshot))  # one reference store: atomic for readers

    def exposition(self) -> str:
        current = self._current  # read once: the loop may swap it meanwhile
        self.scrapes += 1
        if current is None:
            return ""
        published_at, snapshot = current
        return render(snapshot, snapshot_age_s=max(0.0, self._clock() - published_at))

    def stop(self) -> None:
        if self._server is None:
            return
        shutdown(self._server, self._thread)
        self._server = self._thread = None

    def status(self) -> dict[str, Any]:
        address = self.address
        return {"metrics": {
            "enabled": self.params.enabled,
            "listening": f"{address[0]}:{address[1]}" if address else None,
            "scrapes": self.scrapes,
            **({"refused": self.refused} if self.auth is not None else {}),
            **({"error": self.error} if self.error else {}),
        }}


__all__ = [
    "CONTENT_TYPE", "MetricsParams", "MetricsServer", "build_families", "escape_label_value",
    "format_value", "freeze", "render",
]
