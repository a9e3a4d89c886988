"""``edge-agent models list | show KIND | rollback KIND | install FILE``.

Works on the configuration's state directory and database whether or not the
agent is running: the updater's file lock keeps the CLI and the daemon from
interleaving, the running daemon notices a changed pointer within seconds
(reloads the model, starts its health check), and the events of what the CLI
did are queued in the database for the daemon to publish on MQTT.

``install FILE`` is for devices without a broker: the same checks as a bundle
received over MQTT (signature by a ``[models] trusted_keys`` key, hashes,
target, version, features, expiry). Exit codes: 0 done, 1 refused (the reason
on one line), 2 usage or an operation that cannot be done (no such model,
unreadable file, unusable key file).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sqlite3
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from agent.updates import ModelUpdater, UpdateError, list_installed

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``models`` on edge-agent's sub-command parser."""
    p = subparsers.add_parser("models", help="installed models: list, show, roll back, install a bundle file")
    sub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    q = sub.add_parser("list", help="installed models, one line each")
    q.add_argument("--json", action="store_true", help="print a JSON list")
    q = sub.add_parser("show", help="one model kind: pointer, manifest, integrity, accepted and refused versions")
    q.add_argument("kind", metavar="KIND", help="model kind, e.g. forest or lstm")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q = sub.add_parser("rollback", help="restore the previous version of KIND and refuse the current one")
    q.add_argument("kind", metavar="KIND", help="model kind to roll back, e.g. forest")
    q.add_argument("--reason", default="manual rollback (edge-agent models rollback)", help="recorded and reported")
    q = sub.add_parser("install", help="install a signed bundle file (offline devices; same checks as MQTT)")
    q.add_argument("file", metavar="FILE", help="bundle written by edge-fleet bundle")
    return p


def run(cfg: Any, args: argparse.Namespace) -> int:
    action = args.models_command
    try:
        if action == "list":
            return _list(cfg, args)
        if action == "show":
            return _show(cfg, args)
        if action == "rollback":
            return _rollback(cfg, args)
        if action == "install":
            return _install(cfg, args)
        raise UpdateError(f"unknown action {action!r}")
    except (UpdateError, ValueError) as exc:      # ValueError: an unusable trusted key file
        print(f"edge-agent models {action}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, sqlite3.Error) as exc:
        detail = getattr(exc, "strerror", None) or exc
        print(f"edge-agent models {action}: {detail}", file=sys.stderr)
        return EXIT_USAGE


# -- helpers --------------------------------------------------------------------------------
def _fmt_ts(ts: float | None) -> str:
    return "-" if not ts else datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _label(target: Any) -> str:
    if not isinstance(target, dict):
        return "-"
    return "fleet" if target.get("type") == "fleet" else f"{target.get('type')}:{target.get('id')}"


@contextlib.contextmanager
def _updater(cfg: Any, trusted_keys: tuple[str, ...] = (), *, available: Any = None,
             must_exist: str | None = None) -> Iterator[ModelUpdater]:
    from agent.store import connect

    if must_exist is not None and not cfg.db_path.exists():
        raise UpdateError(f"no {must_exist} model installed (no database at {cfg.db_path})")
    Path(cfg.agent.state_dir).mkdir(parents=True, exist_ok=True)
    conn = connect(cfg.db_path)
    try:
        yield ModelUpdater(cfg.agent.state_dir, conn, list(trusted_keys), cfg.device_id, tuple(cfg.agent.groups),
                           available_metrics=available(conn) if available else None)
    finally:
        conn.close()


def _queue(updater: ModelUpdater, event: dict) -> None:
    """The running (or next) daemon publishes it; the message id makes a re-send harmless."""
    from agent.payloads import new_message_id

    updater.queue_event({**event, "message_id": new_message_id()})


def sampled_metrics(cfg: Any, conn: sqlite3.Connection) -> set[str]:
    """What this device samples: the metric columns stored so far, plus one live reading
    (a device that never ran has no columns yet), counters standing for their rates."""
    from agent.model_manager import available_from

    names = {r[1] for r in conn.execute("PRAGMA table_info(samples)")} - {"seq", "ts_s"}
    try:
        from agent.sampling import PsutilSource, Sampler, SystemClock

        source = PsutilSource(cfg.sampling.mounts, cfg.sampling.per_cpu, cfg.sampling.temperature)
        names.update(Sampler(source, cfg.sampling.mounts, SystemClock()).sample().values)
    except Exception as exc:  # noqa: BLE001 - psutil on an exotic kernel: the stored columns must do
        log.warning("could not take a live sample (%s); checking features against stored metrics only", exc)
    return available_from(names)


# -- actions --------------------------------------------------------------------------------
def _list(cfg: Any, args: argparse.Namespace) -> int:
    models = list_installed(cfg.agent.state_dir)
    if args.json:
        print(json.dumps([{k: v for k, v in m.items() if k != "dir"} | {"target": _label(m["target"])}
                          for m in models], sort_keys=True))
        return EXIT_OK
    if not models:
        print("no models installed")
        return EXIT_OK
    for m in models:
        prev = f"  previous v{m['previous_version']}" if m["previous_version"] is not None else ""
        print(f"{m['kind']:8s} v{m['version']:<5d} {_label(m['target']):20s} {m['state'] or '-':10s} "
              f"installed {_fmt_ts(m['installed_at_s'])}{prev}")
    return EXIT_OK


def _show(cfg: Any, args: argparse.Namespace) -> int:
    with _updater(cfg, must_exist=args.kind) as updater:
        doc = updater.show(args.kind)
    if args.json:
        print(json.dumps(doc, sort_keys=True, default=str))
        return EXIT_OK
    cur = doc.get("current")
    print(f"kind        {doc['kind']}")
    if cur is None:
        print("current     none")
    else:
        prev = cur.get("previous") or {}
        print(f"version     {cur['version']}")
        print(f"target      {_label(cur.get('target'))}")
        print(f"source      {cur.get('source') or '-'}")
        print(f"installed   {_fmt_ts(cur.get('installed_at_s'))}")
        print(f"health      {cur.get('state')}"
              + (f" (anomaly rate {cur['anomaly_rate']:.4f})" if cur.get("anomaly_rate") is not None else ""))
        print(f"previous    {('v' + str(prev['version']) + ' ' + _label(prev.get('target'))) if prev else '-'}")
        print(f"features    {', '.join(cur.get('feature_names') or []) or '-'}")
        integrity = doc.get("integrity")
        print(f"integrity   {integrity if integrity == 'ok' else '; '.join(integrity or [])}")
        print(f"directory   {Path(cfg.agent.state_dir) / 'models' / doc['kind'] / cur['dir']}")
    for hw in doc["accepted_versions"]:
        target = {"type": hw["target_type"], "id": hw["target_id"]}
        print(f"accepted    up to v{hw['version']} for {_label(target)}")
    for r in doc["rejected"]:
        target = {"type": r["target_type"], "id": r["target_id"]}
        print(f"refused     v{r['version']} for {_label(target)} at {_fmt_ts(r['ts_s'])}: {r['reason']}")
    return EXIT_OK


def _rollback(cfg: Any, args: argparse.Namespace) -> int:
    with _updater(cfg, must_exist=args.kind) as updater:
        event = updater.rollback(args.kind, args.reason)
        _queue(updater, event)
    restored = event.get("restored_version")
    now = f"v{restored}" if restored is not None else f"no {args.kind} model (the agent falls back)"
    print(f"{args.kind} v{event['version']} rolled back; now {now}")
    return EXIT_OK


def _install(cfg: Any, args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise UpdateError(f"{path}: no such file")
    started = time.monotonic()
    with _updater(cfg, tuple(cfg.models.trusted_keys), available=lambda conn: sampled_metrics(cfg, conn)) as updater:
        decision = updater.install_file(path)
        _queue(updater, decision.event)
    if not decision.accepted:
        print(f"edge-agent models install: refused: {decision.reason}", file=sys.stderr)
        return EXIT_REFUSED
    log.debug("install took %.3f s", time.monotonic() - started)
    print(f"{decision.reason} (on trial: the agent checks its health on the next samples)")
    return EXIT_OK


__all__ = ["add_parser", "run", "sampled_metrics"]
