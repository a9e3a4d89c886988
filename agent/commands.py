"""Remote commands: `{"id", "command", "args"}` in, one response out.

The registry is the extension point: any component registers a handler
(e.g. model rollback) without touching the transport.  Handlers reach the
agent only through the small callables they were built with, so they stay
testable without a daemon.  Nothing a remote peer sends can raise out of
`handle`: bad input becomes an error response, a log line and a counter.
That includes what ``json.loads`` itself raises besides JSONDecodeError: a
document nested ~1,000 deep (RecursionError) or a number of more than 4,300
digits (ValueError) fits in the 8 KB limit, and each must still get its one
reply.
"""
from __future__ import annotations

import collections
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

MAX_ID_CHARS = 128
Handler = Callable[[Mapping[str, Any]], Mapping[str, Any] | None]


# What json.loads raises on hostile input that is still under the size limit: JSONDecodeError
# (a ValueError), UnicodeDecodeError (a ValueError), a too-long integer (ValueError), deep nesting.
_DECODE_ERRORS = (ValueError, RecursionError)


def _loads(payload: bytes) -> Any:
    return json.loads(payload.decode("utf-8"))


def _encodable(text: str) -> bool:
    """A string the reply can carry back: lone surrogates ('\\ud800') are valid JSON but not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class CommandError(Exception):
    """A request that cannot be served; `code` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class CommandParams:
    max_payload_bytes: int = 8192
    min_interval_s: float = 0.5
    max_interval_s: float = 3600.0
    remember_ids: int = 64  # replies kept to answer a redelivered request without re-running it


@dataclass(frozen=True)
class CommandOutcome:
    request_id: str | None
    command: str | None
    ok: bool
    result: Mapping[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    duplicate: bool = False


@dataclass(frozen=True)
class Request:
    request_id: str
    command: str
    args: Mapping[str, Any] = field(default_factory=dict)


def parse_request(payload: bytes, max_payload_bytes: int) -> Request:
    """Validate one request; raises CommandError naming the first problem."""
    if len(payload) > max_payload_bytes:
        raise CommandError("payload_too_large",
                           f"request of {len(payload)} bytes exceeds {max_payload_bytes}")
    try:
        doc = _loads(payload)
    except RecursionError as exc:
        raise CommandError("invalid_json", "request is nested too deeply") from exc
    except ValueError as exc:
        raise CommandError("invalid_json", f"request is not UTF-8 JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise CommandError("invalid_request", "request must be a JSON object")
    request_id = doc.get("id")
    if (not isinstance(request_id, str) or not request_id or len(request_id) > MAX_ID_CHARS
            or not _encodable(request_id)):
        raise CommandError("invalid_request", f"'id' must be a non-empty string of at most {MAX_ID_CHARS} chars")
    command = doc.get("command")
    if not isinstance(command, str) or not command or not _encodable(command):
        raise CommandError("invalid_request", "'command' must be a non-empty string")
    args = doc.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise CommandError("invalid_args", "'args' must be a JSON object")
    return Request(request_id, command, args)


def _peek_id(payload: bytes) -> tuple[str | None, str | None]:
    """Best-effort id/command of a request that failed validation, for the reply."""
    try:
        doc = _loads(payload)
    except _DECODE_ERRORS:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    rid, cmd = doc.get("id"), doc.get("command")
    return (rid if isinstance(rid, str) and len(rid) <= MAX_ID_CHARS and _encodable(rid) else None,
            cmd if isinstance(cmd, str) and len(cmd) <= MAX_ID_CHARS and _encodable(cmd) else None)


class CommandRegistry:
    def __init__(self, params: CommandParams = CommandParams()) -> None:
        self.params = params
        self._handlers: dict[str, tuple[Handler, str]] = {}
        self._recent: collections.OrderedDict[str, CommandOutcome] = collections.OrderedDict()
        self.received = 0
        self.succeeded = 0
        self.errors: collections.Counter[str] = collections.Counter()

    def register(self, name: str, handler: Handler, description: str = "") -> None:
        if not name or name in self._handlers:
            raise ValueError(f"command {name!r} is empty or already registered")
        self._handlers[name] = (handler, description)

    def unregister(self, name: str) -> None:
        self._handlers.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def describe(self) -> dict[str, str]:
        return {name: desc for name, (_, desc) in sorted(self._handlers.items())}

    def handle(self, payload: bytes) -> CommandOutcome:
        """Exactly one outcome per request, whatever the payload: never raises."""
        self.received += 1
        try:
            return self._handle(payload)
        except Exception as exc:  # a bug in validation or bookkeeping still owes the peer a reply
            log.exception("command request could not be processed")
            return self._fail(None, None, CommandError("internal_error", f"{type(exc).__name__}: {exc}"))

    def _handle(self, payload: bytes) -> CommandOutcome:
        try:
            request = parse_request(payload, self.params.max_payload_bytes)
        except CommandError as exc:
            rid, cmd = (None, None) if exc.code == "payload_too_large" else _peek_id(payload)
            return self._fail(rid, cmd, exc)
        cached = self._recent.get(request.request_id)
        if cached is not None and cached.command == request.command:
            log.info("command %s (%s) redelivered; replying with the earlier result",
                     request.request_id, request.command)
            return CommandOutcome(**{**cached.__dict__, "duplicate": True})
        entry = self._handlers.get(request.command)
        if entry is None:
            outcome = self._fail(request.request_id, request.command, CommandError(
                "unknown_command", f"unknown command {request.command!r}; known: {', '.join(self.names())}"))
        else:
            try:
                result = entry[0](request.args)
            except CommandError as exc:
                outcome = self._fail(request.request_id, request.command, exc)
            except RecursionError as exc:  # deeply nested args walked by a handler: the input's fault
                outcome = self._fail(request.request_id, request.command,
                                     CommandError("invalid_args", f"arguments nested too deeply: {exc}"))
            except Exception as exc:  # a handler bug must not crash the agent
                log.exception("command %s failed", request.command)
                outcome = self._fail(request.request_id, request.command,
                                     CommandError("internal_error", f"{type(exc).__name__}: {exc}"))
            else:
                self.succeeded += 1
                log.info("command %s (%s) ok", request.request_id, request.command)
                outcome = CommandOutcome(request.request_id, request.command, True, dict(result or {}))
        self._remember(request.request_id, outcome)
        return outcome

    def _fail(self, rid: str | None, cmd: str | None, exc: CommandError) -> CommandOutcome:
        self.errors[exc.code] += 1
        log.warning("command %s (%s) rejected: %s: %s", rid, cmd, exc.code, exc.message)
        return CommandOutcome(rid, cmd, False, error_code=exc.code, error_message=exc.message)

    def _remember(self, rid: str, outcome: CommandOutcome) -> None:
        self._recent[rid] = outcome
        while len(self._recent) > self.params.remember_ids:
            self._recent.popitem(last=False)

    def stats(self) -> dict:
        return {"received": self.received, "succeeded": self.succeeded,
                "errors": sum(self.errors.values()), "errors_by_code": dict(self.errors)}


def _number_arg(args: Mapping[str, Any], name: str) -> float:
    value = args.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CommandError("invalid_args", f"'{name}' must be a number")
    try:
        value = float(value)
    except OverflowError:  # an integer of hundreds of digits: valid JSON, no float
        raise CommandError("invalid_args", f"'{name}' is out of range") from None
    if not math.isfinite(value):
        raise CommandError("invalid_args", f"'{name}' must be finite")
    return value


def register_builtins(registry: CommandRegistry, *,
                      status: Callable[[], Mapping[str, Any]],
                      report_now: Callable[[], None] | None = None,
                      set_interval: Callable[[float], None] | None = None,
                      clock: Callable[[], float] | None = None) -> None:
    """ping, status, report-now, set-interval, help, wired to the agent's callables."""
    params = registry.params

    def ping(args: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"pong": True, **({"time_s": clock()} if clock else {})}

    def status_cmd(args: Mapping[str, Any]) -> Mapping[str, Any]:
        return dict(status())

    def help_cmd(args: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"commands": registry.describe()}

    registry.register("ping", ping, "Liveness check.")
    registry.register("status", status_cmd, "The agent's status object.")
    registry.register("help", help_cmd, "List commands.")
    if report_now is not None:
        def report(args: Mapping[str, Any]) -> Mapping[str, Any]:
            report_now()
            return {"queued": True}
        registry.register("report-now", report, "Queue a twin report now.")
    if set_interval is not None:
        def set_interval_cmd(args: Mapping[str, Any]) -> Mapping[str, Any]:
            interval_s = _number_arg(args, "interval_s")
            if not params.min_interval_s <= interval_s <= params.max_interval_s:
                raise CommandError("invalid_args",
                                   f"interval_s must be within [{params.min_interval_s}, {params.max_interval_s}]")
            set_interval(interval_s)
            return {"interval_s": interval_s}
        registry.register("set-interval", set_interval_cmd,
                          f"Set the sampling interval: args {{\"interval_s\": {params.min_interval_s}.."
                          f"{params.max_interval_s}}}.")
