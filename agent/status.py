"""``edge-agent status``: what the database and the running agent say, without disturbing it.

The database is opened read-only, so status works while the daemon runs and
never creates a state directory by accident.  Whether the agent runs is the
kernel's answer (``agent.liveness``: the daemon holds a lock on its state
directory), which needs no disk write: on a full disk the agent keeps running
while its snapshot cannot be committed.  Live facts (MQTT connection, loop
lag) come from the snapshot the daemon commits with every flush; without the
lock (an agent of an older version) a snapshot older than a few commit
intervals, or a dead pid, means the agent is not running.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from agent import liveness
from agent.config import AgentConfig
from agent.store import quote_ident


def open_readonly(path: Path) -> sqlite3.Connection | None:
    """A read-only connection usable from any thread (the web page's), or None when there is no
    database yet: readers never create the file or block the daemon's writes (WAL)."""
    if not Path(path).exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0, check_same_thread=False)
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1")
        return conn
    except sqlite3.Error:
        return None


def has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def _latest_values(conn: sqlite3.Connection) -> dict[str, float]:
    cols = [r[1] for r in conn.execute("PRAGMA table_info(samples)") if r[1] not in ("seq",)]
    row = conn.execute(f"SELECT {', '.join(map(quote_ident, cols))} FROM samples ORDER BY seq DESC LIMIT 1").fetchone()
    return {c: v for c, v in zip(cols, row or ()) if v is not None and c != "ts_s"}


def runtime_snapshot(conn: sqlite3.Connection) -> dict[str, Any]:
    import json

    if not has_table(conn, "agent_state"):
        return {}
    row = conn.execute("SELECT value FROM agent_state WHERE key = 'runtime'").fetchone()
    return json.loads(row[0]) if row else {}


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def collect(config: AgentConfig, now_s: float) -> dict[str, Any]:
    """The status document of DESIGN.md, plus what helps an operator."""
    path = config.db_path
    doc: dict[str, Any] = {
        "device_id": config.device_id,
        "config": config.source,
        "database": {"path": str(path), "size_bytes": _db_size(path)},
        "samples": {"count": 0, "oldest": None, "newest": None},
        "last_sample": {},
        "events": {"count": 0},
        "outbox": {"depth": 0, "dropped": 0},
        "mqtt": {"connected": False},
        "models": [],
        "running": False,
        "_state_dir": str(config.agent.state_dir),
    }
    conn = open_readonly(path)
    if conn is None:
        doc.pop("_state_dir")
        return doc
    try:
        if has_table(conn, "samples"):
            count, oldest, newest = conn.execute("SELECT count(*), min(ts_s), max(ts_s) FROM samples").fetchone()
            doc["samples"] = {"count": count, "oldest": oldest, "newest": newest}
            doc["last_sample"] = _latest_values(conn)
        runtime = runtime_snapshot(conn)
        fresh_s = 3 * config.store.commit_interval_s + 5 * config.agent.interval_s + 10.0
        fresh = bool(runtime) and now_s - runtime.get("updated_at", 0) <= fresh_s and _pid_alive(runtime.get("pid"))
        locked = liveness.probe(path.parent)
        running = bool(locked) or fresh
        doc["running"] = running
        doc["runtime"] = runtime
        if running and not fresh:  # alive, but its snapshot cannot be written (disk full or read-only)
            doc["runtime_stale_s"] = round(now_s - float(runtime.get("updated_at", 0) or 0), 1) if runtime else None
        for reader in STATUS_READERS:
            reader(conn, doc, runtime if running else {})
    finally:
        conn.close()
        doc.pop("_state_dir", None)
    return doc


def _db_size(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += path.with_name(path.name + suffix).stat().st_size
        except OSError:
            pass
    return total


def _models_reader(conn: sqlite3.Connection, doc: dict[str, Any], runtime: dict[str, Any]) -> None:
    if "models" not in runtime:
        from agent.updates import list_installed

        doc["models"] = [installed_view(m) for m in list_installed(doc["_state_dir"])]


def installed_view(m: dict[str, Any]) -> dict[str, Any]:
    """A pointer-file model in the shape the running agent reports (target as its label, state as
    health), so status, the web page and the report show "forest v2 fleet", never "[object Object]"."""
    from models.bundle import Target

    target = m.get("target")
    if isinstance(target, dict):
        target = Target(str(target.get("type")), str(target.get("id"))).label
    return {**m, "target": target, "health": m.get("state")}


def _events_reader(conn: sqlite3.Connection, doc: dict[str, Any], runtime: dict[str, Any]) -> None:
    if has_table(conn, "events"):
        doc["events"] = {"count": conn.execute("SELECT count(*) FROM events").fetchone()[0]}


def _live_reader(conn: sqlite3.Connection, doc: dict[str, Any], runtime: dict[str, Any]) -> None:
    for key in ("mqtt", "outbox", "models"):
        if key in runtime:
            doc[key] = runtime[key]


def _outbox_reader(conn: sqlite3.Connection, doc: dict[str, Any], runtime: dict[str, Any]) -> None:
    """Outbox depth and drops straight from the table, true even while the agent is down."""
    if has_table(conn, "outbox"):
        depth = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
        dropped = 0
        if has_table(conn, "outbox_counters"):
            dropped = conn.execute("SELECT coalesce(sum(value), 0) FROM outbox_counters WHERE name = 'dropped'").fetchone()[0]
        doc["outbox"] = {**doc.get("outbox", {}), "depth": depth, "dropped": dropped}


# Each reader adds its part of the document; modules owning a table add theirs here.
STATUS_READERS = [_events_reader, _live_reader, _outbox_reader, _models_reader]
