"""The fleet-loop subcommands of ``edge-fleet``: collect, alerts, train, models, retrain, drift.

``register(subparsers)`` adds their parsers and returns {name: handler}; fleet/cli.py
merges that into its command table. A handler takes the parsed arguments and
returns the exit code: 0 success, 1 a check failed (not enough data, a retrain
pass with a failed target), 2 configuration, store or usage errors - printed on
one line, never a traceback. Every subcommand takes ``--config PATH`` (see
fleet.config for the lookup) and ``-v`` for progress logs: edge-fleet declares those once for every
subcommand (GLOBAL_OPTIONS in fleet/cli.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
Handler = Callable[[argparse.Namespace], int]


def _iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _setup_logging(args: argparse.Namespace, level: str | None = None) -> None:
    chosen = "DEBUG" if getattr(args, "verbose", 0) > 1 else "INFO" if getattr(args, "verbose", 0) else level
    if chosen:
        logging.getLogger().setLevel(chosen)
        for h in logging.getLogger().handlers:
            h.setLevel(chosen)


def _config(args: argparse.Namespace) -> Any:
    from fleet.config import load_config

    return load_config(args.config)


def _open(config: Any) -> Any:
    from fleet.store import open_store

    return open_store(config.store_url, config.store.busy_timeout_s)


def _time_arg(text: str | None) -> float | None:
    if text is None:
        return None
    from agent.timeparse import parse_time_arg

    return parse_time_arg(text, time.time())


def _target(args: argparse.Namespace) -> Any:
    from models.bundle import Target, check_target

    if getattr(args, "fleet", False):
        return Target("fleet", "all")
    if getattr(args, "device", None):
        return check_target({"type": "device", "id": args.device})
    if getattr(args, "group", None):
        return check_target({"type": "group", "id": args.group})
    return None


def _progress(args: argparse.Namespace, label: str, unit: str) -> Any:
    """A progress bar on stderr for a long command: only on a terminal and without --quiet."""
    from agent.progress import Progress

    return Progress(label, unit=unit, quiet=getattr(args, "quiet", False))


class _Stop:
    """SIGTERM/SIGINT set an event, so long-running commands flush and exit 0."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._old: dict[int, Any] = {}

    def __enter__(self) -> threading.Event:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, lambda *_: self.event.set())
        return self.event

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _guard(name: str, fn: Handler) -> Handler:
    """Known errors -> one line on stderr and an exit code; the operator never sees a traceback."""
    def run(args: argparse.Namespace) -> int:
        from fleet.bundle_cli import BundleUsageError
        from fleet.config import FleetConfigError
        from fleet.dataset import NotEnoughData
        from fleet.keys import KeyFileError
        from fleet.publish import PublishError
        from fleet.registry import RegistryError
        from fleet.store import StoreError
        from fleet.train import TrainingError

        try:
            return fn(args)
        except (NotEnoughData, TrainingError) as exc:
            print(f"edge-fleet {name}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except (FleetConfigError, StoreError, RegistryError, PublishError, BundleUsageError, KeyFileError,
                ValueError) as exc:
            print(f"edge-fleet {name}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    return run


# -- collect -----------------------------------------------------------------------------------------
def cmd_collect(args: argparse.Namespace) -> int:
    from fleet.collect import collect

    config = _config(args)
    _setup_logging(args, config.fleet.log_level)
    with _Stop() as stop:
        stats = collect(config, stop, duration_s=args.duration)
    print(json.dumps(stats.as_dict()) if args.json else
          f"received {stats.received}, stored {stats.stored}, duplicates {stats.duplicates}, "
          f"samples {stats.samples}, bad {sum(stats.bad.values())} {stats.bad or ''}".rstrip())
    return EXIT_OK


# -- alerts ------------------------------------------------------------------------------------------
def cmd_alerts(args: argparse.Namespace) -> int:
    from fleet import alerts

    config = _config(args)
    _setup_logging(args)
    since = _time_arg(args.since)
    alerts.at_least(args.severity)      # validate before opening anything
    store = _open(config)
    try:
        if args.label:
            device, start, end = args.label
            store.add_label(device, _time_arg(start), _time_arg(end), args.label_name)
            print(f"labelled {device} {start} .. {end} as {args.label_name!r}")
            return EXIT_OK
        if args.confirm:
            return _confirm(store, args.confirm, args.label_name)
        if args.follow:
            with _Stop() as stop:
                alerts.follow(store, lambda d: print(alerts.render_one(d, args.json), flush=True), stop,
                              device=args.device, severity=args.severity, since_s=since, poll_s=args.poll_s)
            return EXIT_OK
        docs = alerts.list_alerts(store, device=args.device, severity=args.severity, since_s=since, limit=args.limit)
        print(alerts.render(docs, args.json))
        return EXIT_OK
    finally:
        store.close()


def _confirm(store: Any, episode_id: str, label: str) -> int:
    from fleet.store import iso_to_s

    docs = [d for d in store.anomaly_episodes(limit=None) if d.get("id") == episode_id]
    if not docs:
        print(f"edge-fleet alerts: no anomaly episode {episode_id!r}", file=sys.stderr)
        return EXIT_FAILED
    d = docs[0]
    start = iso_to_s(d.get("startedAt"))
    end = iso_to_s(d.get("endedAt")) or time.time()
    store.add_label(d["deviceId"], start, end, label)
    print(f"labelled episode {episode_id} of {d['deviceId']} ({_iso(start)} .. {_iso(end)}) as {label!r}")
    return EXIT_OK


# -- train -------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from fleet.train import run_training

    config = _config(args)
    _setup_logging(args)
    target = _target(args)
    store = _open(config)
    shadow = None
    try:
        if (args.source or config.train.source) == "shadow" and config.source.shadow_url:
            from fleet.store import open_store
            shadow = open_store(config.source.shadow_url, config.store.busy_timeout_s)
        from fleet.quiet_stdout import stdout_to_stderr

        with stdout_to_stderr(), _progress(args, f"train {target.label}", "stages") as bar:
            outcome = run_training(store, config, target, use_lstm=False if args.no_lstm else None,
                                   source=args.source, shadow=shadow, publish=False if args.no_publish else None,
                                   force_promote=args.force, since_s=_time_arg(args.since), progress=bar)
    finally:
        store.close()
        if shadow is not None:
            shadow.close()
    if args.json:
        print(json.dumps(outcome.as_dict(), default=str))
    else:
        m = outcome.record.metrics
        print(f"{outcome.target} v{outcome.record.version} ({', '.join(outcome.record.kinds)}): "
              f"{'PROMOTED' if outcome.promoted else 'candidate'} - {outcome.comparison['reason']}")
        print(f"  held-out: clean anomaly rate {_fmt(m.get('clean_anomaly_rate'))}, precision "
              f"{_fmt(m.get('precision'))}, forecast MASE {_fmt(m.get('forecast_mase'))} (naive "
              f"{_fmt(m.get('naive_mase'))}), coverage 80/95 {_fmt(m.get('coverage_80'))}/{_fmt(m.get('coverage_95'))}")
        if m.get("lstm_skipped"):
            print(f"  no LSTM: {m['lstm_skipped']}")
        if outcome.published:
            print(f"  published on {outcome.published[0]}: {outcome.published[1]}")
        if outcome.publish_error:
            print(f"  NOT published: {outcome.publish_error} (edge-fleet retrain retries)")
    return EXIT_FAILED if outcome.publish_error else EXIT_OK


# -- models ------------------------------------------------------------------------------------------
def _record_line(r: Any) -> str:
    m = r.metrics
    return (f"{r.target:24s} v{r.version:<4d} {r.status:9s} parent {_fmt(r.parent_version):4s} "
            f"{','.join(r.kinds):12s} {_iso(r.created_s)}  mase {_fmt(m.get('forecast_mase')):6s} "
            f"cov80 {_fmt(m.get('coverage_80')):6s} clean {_fmt(m.get('clean_anomaly_rate')):7s} "
            f"published {_iso(r.published_s)}{'  ' + r.note if r.note else ''}")


def cmd_models(args: argparse.Namespace) -> int:
    from fleet import registry as reg
    from models.bundle import parse_target

    config = _config(args)
    _setup_logging(args)
    store = _open(config)
    try:
        registry = reg.Registry(store)
        action = args.models_command
        if action == "list":
            target = parse_target(args.target) if args.target else None
            records = registry.list(target, args.status)
            if args.json:
                print(json.dumps([r.as_dict() for r in records], default=str))
            else:
                print("\n".join(_record_line(r) for r in records) if records else "no models")
            return EXIT_OK
        target = parse_target(args.target)
        if action == "show":
            rec = registry.require(target, args.version) if args.version else registry.champion(target)
            if rec is None:
                raise reg.RegistryError(f"{target.label} has no champion")
            print(json.dumps(rec.as_dict(), indent=None if args.json else 1, default=str))
            return EXIT_OK
        if action == "promote":
            rec, sent = reg.promote_version(config, registry, target, args.version, publish=not args.no_publish)
        else:
            rec, sent = reg.rollback(config, registry, target, args.to, publish=not args.no_publish)
        print(f"{target.label}: v{rec.version} is the champion ({rec.note or 'promoted'})"
              + (f"; published on {sent[0]}" if sent else ""))
        return EXIT_OK
    finally:
        store.close()


# -- retrain -----------------------------------------------------------------------------------------
def _print_reports(reports: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(reports, default=str), flush=True)
        return
    if not reports:
        print("no targets (no device has train.min_samples rows yet)", flush=True)
    for r in reports:
        line = f"{r['target']:24s} {r['outcome']:9s}"
        if r.get("version") is not None:
            line += f" v{r['version']}{' promoted' if r.get('promoted') else ''}"
        if r.get("reasons"):
            line += f"  [{'; '.join(r['reasons'])}]"
        if r.get("reason"):
            line += f"  {r['reason']}"
        if r.get("error"):
            line += f"  {r['error']}"
        print(line, flush=True)


def cmd_retrain(args: argparse.Namespace) -> int:
    from fleet import retrain

    config = _config(args)
    _setup_logging(args, config.fleet.log_level)
    use_lstm = False if args.no_lstm else None
    if args.history:
        store = _open(config)
        try:
            rows = retrain.history(store)
        finally:
            store.close()
        print(json.dumps(rows, default=str) if args.json else "\n".join(
            f"{_iso(r['ts_s'])}  {r['target']:24s} {r['outcome']:9s} v{_fmt(r['version'])} "
            f"{'promoted ' if r['promoted'] else ''}[{r['reasons']}] {r['detail']}" for r in rows) or "no runs")
        return EXIT_OK
    if args.loop:
        with _Stop() as stop:
            retrain.run_loop(lambda: _open(config), config, stop, use_lstm=use_lstm,
                             on_pass=lambda reports: _print_reports(reports, args.json))
        return EXIT_OK
    store = _open(config)
    try:
        with _progress(args, "retrain", "targets") as bar:
            reports = retrain.run_once(store, config, dry_run=args.dry_run, use_lstm=use_lstm,
                                       check_drift=not args.no_drift, progress=bar)
    finally:
        store.close()
    _print_reports(reports, args.json)
    return EXIT_FAILED if any(r["outcome"] == "failed" for r in reports) else EXIT_OK


# -- drift -------------------------------------------------------------------------------------------
def cmd_drift(args: argparse.Namespace) -> int:
    from fleet import drift
    from fleet.registry import Registry
    from models.bundle import parse_target

    config = _config(args)
    _setup_logging(args)
    store = _open(config)
    try:
        if args.history:
            rows = drift.recent_reports(store, args.target)
            print(json.dumps(rows, default=str) if args.json else "\n".join(
                f"{_iso(r['ts_s'])}  {r['target']:20s} {r['device_id']:16s} {r['name']:32s} {r['method']:9s} "
                f"{_fmt(r['statistic']):7s} > {_fmt(r['threshold']):5s} {'FLAGGED' if r['flagged'] else 'ok'}"
                for r in rows) or "no drift reports")
            return EXIT_OK
        target = _target(args) or (parse_target(args.target) if args.target else None)
        targets = [target] if target else [parse_target(t) for t in Registry(store).targets()]
        results = [drift.check_target(store, config, t, save=not args.no_save) for t in targets]
    finally:
        store.close()
    if args.json:
        print(json.dumps([h.as_dict() for h in results], default=str))
    elif not results:
        print("no targets with a model yet")
    else:
        for h in results:
            state = "RETRAIN" if h.needs_retraining else "ok"
            print(f"{h.target:24s} v{_fmt(h.model_version)}  {state}  {h.note}".rstrip())
            for v in h.verdicts:
                if v.flagged or args.all:
                    print(f"  {v.device_id:16s} {v.name:32s} {v.method:9s} {_fmt(v.statistic)} "
                          f"(threshold {_fmt(v.threshold)}, n {v.n_ref}/{v.n_recent}) "
                          f"{'FLAGGED' if v.flagged else 'ok'}")
    return EXIT_FAILED if any(h.needs_retraining for h in results) and args.exit_code else EXIT_OK


# -- parsers -----------------------------------------------------------------------------------------
def _target_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--device", metavar="ID", help="one device")
    g.add_argument("--group", metavar="NAME", help="a group ([groups] in the config, or reported by devices)")
    g.add_argument("--fleet", action="store_true", help="every device in the store")


def register(subparsers: Any) -> dict[str, Handler]:
    """Add collect, alerts, train, models, retrain and drift to ``subparsers``; returns their handlers."""
    p = subparsers.add_parser("collect", help="store every device's telemetry, anomalies, forecasts and twin state")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: until SIGTERM)")
    p.add_argument("--json", action="store_true", help="final counts as JSON")

    p = subparsers.add_parser("alerts", help="list or follow anomaly events across the fleet")
    p.add_argument("--device", metavar="ID", help="only this device")
    p.add_argument("--severity", choices=("normal", "warning", "critical"), help="this severity or worse")
    p.add_argument("--since", metavar="T", help="ISO 8601, epoch seconds or an age (24h, 7d)")
    p.add_argument("--limit", type=int, default=100, metavar="N", help="episodes listed (default 100)")
    p.add_argument("--follow", "-f", action="store_true", help="print new anomaly messages as they arrive")
    p.add_argument("--poll-s", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="JSON (an array; one object per line with --follow)")
    p.add_argument("--confirm", metavar="EPISODE_ID", help="label an episode as a real anomaly (for precision)")
    p.add_argument("--label", nargs=3, metavar=("DEVICE", "FROM", "TO"), help="label a time window as anomalous")
    p.add_argument("--label-name", default="anomaly", help=argparse.SUPPRESS)

    p = subparsers.add_parser("train", help="train, evaluate and register a model; promote and publish if it wins")
    _target_args(p, required=True)
    p.add_argument("--no-lstm", action="store_true", help="train the Isolation Forest only")
    p.add_argument("--source", choices=("collected", "shadow"), help="training rows (default: train.source)")
    p.add_argument("--since", metavar="T", help="oldest row (default: train.lookback_s ago)")
    p.add_argument("--no-publish", action="store_true", help="promote if it wins, but do not publish")
    p.add_argument("--force", action="store_true", help="promote even if it does not beat the champion")
    p.add_argument("--json", action="store_true", help="the outcome as JSON")

    p = subparsers.add_parser("models", help="the model registry: list | show | promote | rollback")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION", parser_class=type(p))
    q = msub.add_parser("list", help="every version (filter by --target, --status)")
    q.add_argument("--target", metavar="T", help="device:ID, group:NAME or fleet")
    q.add_argument("--status", choices=("candidate", "champion", "retired"), help="only versions in this state")
    q.add_argument("--json", action="store_true", help="print JSON")
    q = msub.add_parser("show", help="one version with its metrics, data range and parameters")
    q.add_argument("target", metavar="TARGET", help="device:ID, group:NAME or fleet")
    q.add_argument("version", type=int, nargs="?", metavar="VERSION", help="default: the champion")
    q.add_argument("--json", action="store_true", help="compact JSON")
    q = msub.add_parser("promote", help="make a version the champion and publish it (no comparison)")
    q.add_argument("target", metavar="TARGET", help="device:ID, group:NAME or fleet")
    q.add_argument("version", type=int, metavar="VERSION", help="the version to make champion")
    q.add_argument("--no-publish", action="store_true", help="promote, but do not publish")
    q = msub.add_parser("rollback", help="republish the previous champion (as a new version) and make it champion")
    q.add_argument("target", metavar="TARGET", help="device:ID, group:NAME or fleet")
    q.add_argument("--to", type=int, metavar="VERSION", help="this version instead of the previous champion")
    q.add_argument("--no-publish", action="store_true", help="make it champion, but do not publish")

    p = subparsers.add_parser("retrain", help="retrain every target that is due (24 h) or drifting")
    p.add_argument("--loop", action="store_true", help="repeat every retrain.loop_interval_s until SIGTERM")
    p.add_argument("--dry-run", action="store_true", help="only say which targets are due and why")
    p.add_argument("--no-lstm", action="store_true", help="train the Isolation Forest only")
    p.add_argument("--no-drift", action="store_true", help="skip the drift and accuracy checks")
    p.add_argument("--history", action="store_true", help="show past passes' decisions")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = subparsers.add_parser("drift", help="compare recent data and forecast accuracy with each champion")
    _target_args(p, required=False)
    p.add_argument("--target", metavar="T", help="device:ID, group:NAME or fleet (default: every target)")
    p.add_argument("--all", action="store_true", help="show every verdict, not only the flagged ones")
    p.add_argument("--history", action="store_true", help="show stored verdicts instead of checking")
    p.add_argument("--no-save", action="store_true", help="do not store the verdicts")
    p.add_argument("--exit-code", action="store_true", help="exit 1 when a target needs retraining")
    p.add_argument("--json", action="store_true", help="print JSON")

    handlers = {"collect": cmd_collect, "alerts": cmd_alerts, "train": cmd_train, "models": cmd_models,
                "retrain": cmd_retrain, "drift": cmd_drift}
    return {name: _guard(name, fn) for name, fn in handlers.items()}
