"""Health rules: what makes ``edge-agent status`` exit non-zero, and the watchdog verdict.

Pure functions over plain values, so the same rules serve the CLI (reading
the status the daemon persisted), monitoring scripts and the main loop.  Only
conditions an operator must act on are problems: a broker outage is not one
(the outbox exists to ride it out) until the outbox backs up past its threshold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1


@dataclass(frozen=True)
class HealthParams:
    stale_factor: float = 5.0  # newest sample older than stale_factor x interval_s is stale
    min_stale_s: float = 30.0  # ... but never flag staleness sooner than this (short intervals, slow SD)
    outbox_max_depth: int = 5000  # queued outbound messages before the backlog is a problem
    required_models: tuple[str, ...] = ()  # model kinds that must be installed, e.g. ("forest",)
    default_interval_s: float = 1.0  # used when the status carries no interval_s


@dataclass(frozen=True)
class Problem:
    code: str  # stable identifier: not_running, no_samples, stale_samples, outbox_backlog, no_model
    message: str  # one line for people

    def __str__(self) -> str:
        return self.message


def stale_after_s(interval_s: float, params: HealthParams) -> float:
    return max(params.stale_factor * interval_s, params.min_stale_s)


def _interval_s(status: Mapping[str, Any], params: HealthParams, given: float | None) -> float:
    if given is not None and given > 0:
        return float(given)
    for holder in (status, status.get("runtime") or {}):
        value = holder.get("interval_s") if isinstance(holder, Mapping) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return params.default_interval_s


def evaluate(
    status: Mapping[str, Any],
    now_s: float,
    params: HealthParams = HealthParams(),
    interval_s: float | None = None,
) -> list[Problem]:
    """Problems found in an ``edge-agent status --json`` object; empty means healthy.

    ``now_s`` is wall-clock epoch seconds, like ``samples.newest``.  The
    sampling interval is ``interval_s`` when given (the configured one), else
    the status's ``interval_s`` (top level or under ``runtime``).
    """
    problems: list[Problem] = []
    interval_s = _interval_s(status, params, interval_s)
    if status.get("running") is False:
        problems.append(Problem("not_running", "the agent is not running (no live status from its process)"))
    samples = status.get("samples") or {}
    newest = samples.get("newest")
    if not samples.get("count") or newest is None:
        problems.append(Problem("no_samples", "no samples recorded yet: is the agent running?"))
    else:
        age_s = now_s - float(newest)
        limit_s = stale_after_s(interval_s, params)
        if age_s > limit_s:
            problems.append(Problem(
                "stale_samples",
                f"newest sample is {age_s:.0f} s old (limit {limit_s:.0f} s = max({params.stale_factor:g} x "
                f"{interval_s:g} s interval, {params.min_stale_s:g} s)): the agent is stopped or stalled",
            ))
    outbox = status.get("outbox") or {}
    depth = outbox.get("depth")
    if isinstance(depth, (int, float)) and depth > params.outbox_max_depth:
        connected = (status.get("mqtt") or {}).get("connected")
        why = "broker unreachable" if connected is False else "publishing falls behind"
        problems.append(Problem(
            "outbox_backlog",
            f"outbox holds {int(depth)} messages (limit {params.outbox_max_depth}): {why}",
        ))
    installed = {
        str(m.get("kind")) for m in status.get("models") or ()
        if isinstance(m, Mapping) and m.get("version") is not None
    }
    for kind in params.required_models:
        if kind not in installed:
            problems.append(Problem("no_model", f"no {kind} model installed, and one is required"))
    return problems


def exit_code(problems: list[Problem]) -> int:
    return EXIT_UNHEALTHY if problems else EXIT_HEALTHY


def twin_health(problems: list[Problem]) -> dict[str, Any]:
    """The twin's ``health`` field: the same verdict as ``edge-agent status``, so the fleet page and
    the device's own exit code never disagree about a device."""
    return {"status": "unhealthy" if problems else "healthy",
            "problems": [{"code": p.code, "message": p.message} for p in problems]}


def loop_healthy(
    now_mono_s: float,
    last_sample_mono_s: float | None,
    started_mono_s: float,
    interval_s: float,
    params: HealthParams = HealthParams(),
) -> tuple[bool, str]:
    """The watchdog verdict: has the loop produced a sample recently enough?

    Only a failure a restart can cure counts: sampling that keeps failing or a
    loop that fell far behind.  Broker, disk-full and model problems do not,
    because restarting would not fix them and would lose the memory buffer.
    """
    reference = last_sample_mono_s if last_sample_mono_s is not None else started_mono_s
    age_s = now_mono_s - reference
    limit_s = stale_after_s(interval_s, params)
    if age_s > limit_s:
        what = "last successful sample" if last_sample_mono_s is not None else "start-up without a sample"
        return False, f"{what} {age_s:.3g} s ago (limit {limit_s:.3g} s)"
    return True, ""


__all__ = [
    "EXIT_HEALTHY", "EXIT_UNHEALTHY", "HealthParams", "Problem",
    "evaluate", "exit_code", "loop_healthy", "stale_after_s", "twin_health",
]
