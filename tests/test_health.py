"""Health rules (what makes `edge-agent status` exit non-zero) and the watchdog verdict."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from agent.health import (
    EXIT_HEALTHY,
    EXIT_UNHEALTHY,
    HealthParams,
    evaluate,
    exit_code,
    loop_healthy,
    stale_after_s,
)

NOW_S = 1_700_000_000.0


def status(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "device_id": "pi-1",
        "running": True,
        "samples": {"count": 120, "oldest": NOW_S - 120, "newest": NOW_S - 1},
        "events": {"count": 0},
        "outbox": {"depth": 3, "dropped": 0},
        "mqtt": {"connected": True},
        "models": [{"kind": "forest", "version": 4}],
        "runtime": {"interval_s": 1.0},
    }
    doc.update(overrides)
    return doc


def codes(problems: list) -> list[str]:
    return [p.code for p in problems]


def test_a_fresh_running_agent_is_healthy() -> None:
    problems = evaluate(status(), NOW_S, HealthParams(required_models=("forest",)))
    assert problems == []
    assert exit_code(problems) == EXIT_HEALTHY


def test_no_samples_at_all() -> None:
    problems = evaluate(status(samples={"count": 0, "oldest": None, "newest": None}), NOW_S)
    assert codes(problems) == ["no_samples"]
    assert exit_code(problems) == EXIT_UNHEALTHY


@pytest.mark.parametrize(
    "interval_s, age_s, stale",
    [
        (1.0, 29.0, False),   # 5 x 1 s = 5 s, but never sooner than min_stale_s = 30 s
        (1.0, 31.0, True),
        (60.0, 299.0, False),  # 5 x 60 s = 300 s
        (60.0, 301.0, True),
    ],
)
def test_stale_samples_scale_with_the_interval(interval_s: float, age_s: float, stale: bool) -> None:
    doc = status(samples={"count": 10, "oldest": NOW_S - 1000, "newest": NOW_S - age_s},
                 runtime={"interval_s": interval_s})
    problems = evaluate(doc, NOW_S, HealthParams())
    assert codes(problems) == (["stale_samples"] if stale else [])
    if stale:
        assert f"{age_s:.0f} s old" in problems[0].message


def test_an_explicit_interval_wins_over_the_status() -> None:
    doc = status(samples={"count": 10, "oldest": 0.0, "newest": NOW_S - 100}, runtime={"interval_s": 60.0})
    assert codes(evaluate(doc, NOW_S, HealthParams(), interval_s=1.0)) == ["stale_samples"]
    assert codes(evaluate(doc, NOW_S, HealthParams())) == []


def test_a_stopped_agent_is_reported_even_before_its_samples_go_stale() -> None:
    assert codes(evaluate(status(running=False), NOW_S)) == ["not_running"]


def test_outbox_backlog_names_the_likely_cause() -> None:
    params = HealthParams(outbox_max_depth=100)
    assert evaluate(status(outbox={"depth": 100, "dropped": 0}), NOW_S, params) == []
    offline = evaluate(status(outbox={"depth": 101, "dropped": 5}, mqtt={"connected": False}), NOW_S, params)
    assert codes(offline) == ["outbox_backlog"] and "broker unreachable" in str(offline[0])
    slow = evaluate(status(outbox={"depth": 5000, "dropped": 0}), NOW_S, params)
    assert "falls behind" in str(slow[0])


def test_required_models() -> None:
    params = HealthParams(required_models=("forest", "forecaster"))
    problems = evaluate(status(), NOW_S, params)
    assert codes(problems) == ["no_model"] and "forecaster" in str(problems[0])
    no_version = status(models=[{"kind": "forest", "version": None}, {"kind": "forecaster", "version": 1}])
    assert codes(evaluate(no_version, NOW_S, params)) == ["no_model"]
    assert evaluate(status(models=[]), NOW_S, HealthParams()) == []  # nothing required: none needed


def test_problems_accumulate() -> None:
    doc = status(running=False, samples={"count": 5, "oldest": 0.0, "newest": NOW_S - 3600},
                 outbox={"depth": 10**6, "dropped": 0}, models=[])
    problems = evaluate(doc, NOW_S, HealthParams(required_models=("forest",)))
    assert codes(problems) == ["not_running", "stale_samples", "outbox_backlog", "no_model"]


def test_loop_verdict_for_the_watchdog() -> None:
    params = HealthParams(stale_factor=5.0, min_stale_s=30.0)
    assert stale_after_s(1.0, params) == 30.0 and stale_after_s(60.0, params) == 300.0
    assert loop_healthy(100.0, 90.0, 0.0, 1.0, params) == (True, "")
    healthy, reason = loop_healthy(100.0, 60.0, 0.0, 1.0, params)
    assert not healthy and "last successful sample 40" in reason
    # No sample yet: judged from start-up, so a slow start is given the same grace.
    assert loop_healthy(20.0, None, 0.0, 1.0, params)[0]
    healthy, reason = loop_healthy(31.0, None, 0.0, 1.0, params)
    assert not healthy and "start-up" in reason


def test_status_document_of_a_real_database(tmp_path: Path) -> None:
    """The rules against what `edge-agent status` actually collects from a real SQLite file."""
    from agent import status as status_mod
    from agent.config import parse
    from agent.sampling import Sample
    from agent.store import Store

    cfg = parse({"agent": {"state_dir": str(tmp_path), "interval_s": 1.0, "device_id": "pi-1"}}, environ={})
    store = Store(cfg.db_path)
    try:
        for i in range(10):
            store.add_sample(Sample(ts_s=NOW_S - 100 + i, values={"system.cpuUsage": 10.0 + i}))
        store.set_state("runtime", {"pid": os.getpid(), "updated_at": NOW_S, "interval_s": 1.0})
        assert store.flush()
    finally:
        store.close()
    doc = status_mod.collect(cfg, NOW_S)
    assert doc["samples"]["count"] == 10 and doc["running"] is True
    problems = evaluate(doc, NOW_S, HealthParams())
    assert codes(problems) == ["stale_samples"]  # newest is 91 s old at 1 s interval
    assert evaluate(doc, NOW_S - 80, HealthParams()) == []  # 11 s old: fine
