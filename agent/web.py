"""The device's read-only web page: history, forecast and anomalies as charts.

Off by default and bound to 127.0.0.1, like the Prometheus endpoint: a device
grows a listening port only when its operator asks for one.  Built on the
standard library's ``http.server`` in a thread (no framework to install on a
Pi); every request opens its own read-only SQLite connection, so the HTTP
thread never touches the main loop's connection and a slow browser cannot
slow sampling down (WAL readers do not block the writer).

Access control, in one place so the fleet page (fleet/serve.py) shares it:

* ``token``: ``Authorization: Bearer <token>``, or ``?token=<token>`` once in
  the address bar; a good ``?token=`` sets an HttpOnly, SameSite=Strict cookie
  so the page's own requests carry it, and the page removes it from the
  address bar.  ``basic_user``/``basic_password``: HTTP basic auth.  Either
  configured credential is accepted; tokens are compared in constant time.
* Binding beyond loopback without a credential is refused at start (the
  component logs why and stays off) unless ``allow_unauthenticated = true``:
  a page that lists a device's processes-to-be and its network use must not
  appear on a LAN by accident.  Put TLS in front (a reverse proxy, an SSH
  tunnel) when a credential crosses a network you do not trust: this server
  speaks plain HTTP.
* Without a credential (loopback only) the ``Host`` header must name a
  loopback host, which stops DNS-rebinding pages from reading it through the
  visitor's browser.

Everything is GET/HEAD; other methods get 405.  Static files are a fixed
whitelist from agent/static; nothing is fetched at run time (devices are often
offline), the chart library (uPlot, MIT) is vendored with its licence.
"""
from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Callable, Mapping

from agent.httpserve import LocalHTTPServer, serve_in_thread, shutdown

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
COOKIE = "edge_agent_token"

# name served under /static/ -> (file under agent/static, content type)
STATIC_FILES: dict[str, tuple[str, str]] = {
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "boot.js": ("boot.js", "text/javascript; charset=utf-8"),
    "fleet.js": ("fleet.js", "text/javascript; charset=utf-8"),
    "style.css": ("style.css", "text/css; charset=utf-8"),
    "uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "uPlot.min.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
    "uPlot.LICENSE": ("vendor/uPlot.LICENSE", "text/plain; charset=utf-8"),
}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # uPlot sets element styles, hence 'unsafe-inline' for styles only; scripts come from this server only
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
}


class WebConfigError(ValueError):
    """The web settings are unsafe or inconsistent; the message says which key to change."""


@dataclass(frozen=True)
class WebParams:
    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = 9850  # 0 picks a free port (tests)
    token: str = ""
    basic_user: str = ""
    basic_password: str = ""
    allow_unauthenticated: bool = False
    max_points: int = 2000

    @property
    def has_auth(self) -> bool:
        return bool(self.token) or bool(self.basic_user and self.basic_password)


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]").lower()
    if host in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(params: Any, section: str = "web") -> None:
    """Refuse settings that would publish the page unauthenticated beyond this machine.

    ``params`` is any settings object with bind, token, basic_user, basic_password,
    allow_unauthenticated and has_auth: the Prometheus endpoint follows the same rule."""
    s = section
    if bool(params.basic_user) != bool(params.basic_password):
        raise WebConfigError(f"{s}.basic_user and {s}.basic_password must be set together")
    if not is_loopback(params.bind) and not params.has_auth and not params.allow_unauthenticated:
        raise WebConfigError(
            f"{s}.bind = {params.bind!r} is reachable from other machines but no {s}.token or "
            f"{s}.basic_user/basic_password is set; set one, bind 127.0.0.1, or set "
            f"{s}.allow_unauthenticated = true to accept the risk")


# -- responses ----------------------------------------------------------------------------
@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] | None = None


def json_response(doc: Any, status: int = 200) -> Response:
    body = json.dumps(doc, separators=(",", ":"), allow_nan=False, default=str).encode()
    return Response(status, body, "application/json")


def error(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


def static_response(name: str) -> Response:
    entry = STATIC_FILES.get(name)
    if entry is None:
        return error(404, "not found")
    try:
        body = (STATIC_DIR / entry[0]).read_bytes()
    except OSError:
        return error(404, "not found")
    return Response(200, body, entry[1], {"Cache-Control": "no-cache"})


def page_response(name: str) -> Response:
    try:
        body = (STATIC_DIR / name).read_bytes()
    except OSError:
        return error(404, "not found")
    return Response(200, body, "text/html; charset=utf-8", {"Cache-Control": "no-cache"})


class BadRequest(ValueError):
    """A query parameter is malformed; becomes a 400 with the message."""


def query_float(query: Mapping[str, list[str]], name: str, now_s: float) -> float | None:
    """A time parameter: epoch seconds, ISO 8601 or an age such as ``24h`` (counted back from now)."""
    from agent.timeparse import parse_time_arg

    values = query.get(name)
    if not values or values[0] == "":
        return None
    try:
        return parse_time_arg(values[0], now_s)
    except ValueError as exc:
        raise BadRequest(f"{name}: {exc}") from None


def query_int(query: Mapping[str, list[str]], name: str) -> int | None:
    values = query.get(name)
    if not values or values[0] == "":
        return None
    try:
        return int(values[0])
    except ValueError:
        raise BadRequest(f"{name}: expected an integer, got {values[0]!r}") from None


def query_list(query: Mapping[str, list[str]], *names: str) -> list[str] | None:
    out: list[str] = []
    for name in names:
        for v in query.get(name, ()):
            out.extend(p for p in (s.strip() for s in v.split(",")) if p)
    return out or None


# -- auth -----------------------------------------------------------------------------------
class Authenticator:
    def __init__(self, params: WebParams) -> None:
        self._token = params.token.encode()
        self._basic = (f"{params.basic_user}:{params.basic_password}".encode()
                       if params.basic_user and params.basic_password else b"")
        self.required = bool(self._token or self._basic)
        self.basic = bool(self._basic)

    def _token_ok(self, candidate: str | None) -> bool:
        return bool(self._token) and candidate is not None and hmac.compare_digest(candidate.encode(), self._token)

    def check(self, headers: Any, query: Mapping[str, list[str]]) -> tuple[bool, bool]:
        """(allowed, set the cookie): the cookie is set when the token came in the address."""
        if not self.required:
            return True, False
        header = headers.get("Authorization", "") or ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and self._token_ok(value.strip()):
            return True, False
        if scheme.lower() == "basic" and self._basic:
            try:
                raw = base64.b64decode(value.strip(), validate=True)
            except ValueError:
                raw = b""
            if hmac.compare_digest(raw, self._basic):
                return True, False
        if self._token_ok((query.get("token") or [None])[0]):
            return True, True
        cookies = headers.get("Cookie", "") or ""
        for part in cookies.split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and self._token_ok(urllib.parse.unquote(value)):
                return True, False
        return False, False

    def cookie(self) -> str:
        return f"{COOKIE}={urllib.parse.quote(self._token.decode())}; HttpOnly; SameSite=Strict; Path=/"


# -- server ---------------------------------------------------------------------------------
App = Callable[[str, Mapping[str, list[str]]], Response]


class _Server(LocalHTTPServer):
    def __init__(self, address: tuple[str, int], service: "HttpService") -> None:
        self.service = service
        super().__init__(address, _Handler)


_HOST_RE = re.compile(r"^(\[[^\]]+\]|[^:]+)(:\d+)?$")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 30  # a stuck client must not hold a thread forever
    server_version = "edge-agent"
    sys_version = ""

    def _write(self, resp: Response, head: bool, extra: Mapping[str, str] | None = None) -> None:
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        for k, v in {**SECURITY_HEADERS, "Cache-Control": "no-store", **(resp.headers or {}), **(extra or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(resp.body)

    def _host_ok(self) -> bool:
        match = _HOST_RE.match((self.headers.get("Host") or "").strip())
        return bool(match) and is_loopback(match.group(1))

    def _serve(self, head: bool) -> None:
        service = self.server.service
        started = time.perf_counter()
        parts = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        allowed, set_cookie = service.auth.check(self.headers, query)
        if not allowed:
            service.refused += 1
            challenge = 'Basic realm="edge-agent", charset="UTF-8"' if service.auth.basic else 'Bearer realm="edge-agent"'
            self._write(error(401, "authentication required"), head, {"WWW-Authenticate": challenge})
            return
        if not service.auth.required and not self._host_ok():
            service.refused += 1
            self._write(error(403, "this page answers to localhost only (set web.token to serve other names)"), head)
            return
        try:
            resp = service.app(parts.path, query)
        except BadRequest as exc:
            resp = error(400, str(exc))
        except Exception:  # a bug in one view must not kill the server thread
            log.exception("web request %s failed", parts.path)
            resp = error(500, "internal error (see the agent log)")
        service.requests += 1
        self._write(resp, head, {"Set-Cookie": service.auth.cookie()} if set_cookie else None)
        log.debug("web %s %d %d bytes %.1f ms", parts.path, resp.status, len(resp.body),
                  (time.perf_counter() - started) * 1e3)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def _refuse_method(self) -> None:
        self._write(error(405, "read-only"), False, {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse_method  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        log.debug("web from %s: " + format, self.client_address[0], *args)


class HttpService:
    """A threaded HTTP server around an ``App`` callable; shared by the device and the fleet page."""

    def __init__(self, params: WebParams, app: App, name: str = "web") -> None:
        check_exposure(params)
        self.params = params
        self.app = app
        self.name = name
        self.auth = Authenticator(params)
        self.requests = 0
        self.refused = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        """Where it listens (the real port when params.port is 0)."""
        return None if self._server is None else self._server.bound

    @property
    def url(self) -> str | None:
        if self.address is None:
            return None
        host, port = self.address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def start(self) -> None:
        self._server = _Server((self.params.bind, self.params.port), self)
        self._thread = serve_in_thread(self._server, f"{self.name}-http")

    def stop(self) -> None:
        if self._server is None:
            return
        shutdown(self._server, self._thread)
        self._server = self._thread = None


# -- the device application -------------------------------------------------------------------
class DeviceApp:
    """Routes of the device page; each API call opens (and closes) its own read-only connection."""

    def __init__(self, config: Any, clock: Callable[[], float] = time.time, max_points: int = 2000) -> None:
        self.config = config
        self.clock = clock
        self.max_points = max_points

    def __call__(self, path: str, query: Mapping[str, list[str]]) -> Response:
        if path in ("/", "/index.html"):
            return page_response("index.html")
        if path.startswith("/static/"):
            return static_response(path[len("/static/"):])
        if path.startswith("/api/"):
            return self.api(path[len("/api/"):], query)
        return error(404, "not found")

    def api(self, name: str, query: Mapping[str, list[str]]) -> Response:
        from agent import webdata

        now = self.clock()
        if name == "status":
            return json_response(webdata.status(self.config, now))
        conn = webdata.open_readonly(self.config.db_path)
        if conn is None:
            return error(503, f"no database at {self.config.db_path.name} yet")
        try:
            if name == "meta":
                doc = webdata.meta(conn, self.config.device_id)
                doc["max_points"] = self.max_points
                return json_response(doc)
            since, until = query_float(query, "since", now), query_float(query, "until", now)
            if name == "series":
                return json_response(webdata.series(conn, query_list(query, "metrics", "metric"), since, until,
                                                    query_int(query, "points"), self.max_points))
            if name == "forecast":
                metric = (query_list(query, "metric") or [None])[0]
                return json_response(webdata.forecast(conn, metric, until))
            if name == "events":
                kind = (query_list(query, "kind") or [None])[0]
                limit = max(1, min(query_int(query, "limit") or 500, 5000))
                return json_response(webdata.events(conn, since, until, kind, limit))
            return error(404, f"no endpoint /api/{name}")
        finally:
            conn.close()


class WebComponent:
    """Daemon component: starts the page server with the daemon, stops it with the daemon."""

    name = "web"

    def __init__(self, params: WebParams) -> None:
        self.params = params
        self.service: HttpService | None = None
        self.error: str | None = None

    def start(self, ctx: Any) -> None:
        if not self.params.enabled:
            return
        try:
            check_exposure(self.params)
            app = DeviceApp(ctx.config, clock=ctx.clock.time, max_points=self.params.max_points)
            self.service = HttpService(self.params, app)
            self.service.start()
        except WebConfigError as exc:
            self.error = str(exc)
            self.service = None
            log.error("web page disabled: %s", exc)
            return
        except OSError as exc:  # a taken port must not stop the agent from sampling
            self.error = str(exc)
            self.service = None
            log.error("web page disabled: cannot listen on %s:%d: %s", self.params.bind, self.params.port, exc)
            return
        log.info("web page on %s%s", self.service.url, " (authentication required)" if self.params.has_auth else "")

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def status(self) -> dict[str, Any]:
        address = self.service.address if self.service else None
        return {"web": {
            "enabled": self.params.enabled,
            "listening": f"{address[0]}:{address[1]}" if address else None,
            "auth": self.params.has_auth,
            "requests": self.service.requests if self.service else 0,
            "refused": self.service.refused if self.service else 0,
            **({"error": self.error} if self.error else {}),
        }}


def params_from_section(section: Any) -> WebParams:
    """The [web] configuration section -> WebParams (the section's field names match)."""
    return WebParams(**{f: getattr(section, f) for f in WebParams.__dataclass_fields__ if hasattr(section, f)})
