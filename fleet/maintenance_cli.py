"""``edge-fleet simulate`` and ``edge-fleet maintenance train|evaluate``: parsers and handlers.

Registered from fleet/cli.py (``COMMANDS.update(register(sub))``); handlers
import their work lazily so ``edge-fleet --help`` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any, Callable

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
Handler = Callable[[argparse.Namespace], int]


def cmd_simulate(args: argparse.Namespace) -> int:
    from fleet.simulate import SimParams, publish_mqtt, simulate_fleet, summary, write_csv, write_store

    if not (args.out or args.store or args.mqtt):
        print("edge-fleet simulate: say where: --out DIR, --store URL or --mqtt", file=sys.stderr)
        return EXIT_USAGE
    try:
        params = SimParams(devices=args.devices, days=args.days, seed=args.seed, step_s=args.step_s,
                           drift_devices=args.drift_devices,
                           failure_rate_per_device_day=args.failure_rate,
                           sudden_share=args.sudden_share, use_nab=not args.no_nab,
                           **({"start_ts_s": args.start} if args.start is not None else {}))
    except ValueError as exc:
        print(f"edge-fleet simulate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from fleet.simulate import find_nab

    found, tried = find_nab(args.datasets or "")
    if params.use_nab and found is None:
        where = ", ".join(str(p / "nab") for p in tried)
        if args.datasets:
            print(f"edge-fleet simulate: --datasets: no NAB data at {where}", file=sys.stderr)
            return EXIT_USAGE
        print(f"edge-fleet simulate: no NAB data at {where}: synthetic noise (--datasets DIR or $EDGE_DATASETS)",
              file=sys.stderr)
    if params.use_nab and found is not None:
        params = dataclasses.replace(params, datasets_dir=str(found))
    from fleet.commands import _progress

    with _progress(args, "simulate", "devices") as bar:
        fleet = simulate_fleet(params, progress=bar)
    out: dict[str, Any] = {"summary": summary(fleet)}
    out["noise"] = f"NAB traces from {found / 'nab'}" if fleet.noise == "nab" and found else "synthetic"
    if args.out:
        write_csv(fleet, args.out)
        out["out"] = str(args.out)
    if args.store:
        from fleet.store import StoreError, open_store

        try:
            with open_store(args.store) as store:
                out["store"] = write_store(fleet, store)
        except StoreError as exc:
            print(f"edge-fleet simulate: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if args.truth:
            from pathlib import Path

            Path(args.truth).write_text(json.dumps(fleet.truth(), indent=1), encoding="utf-8")
    if args.mqtt:
        try:
            out["published"] = publish_mqtt(fleet, args.host, args.port, topic_prefix=args.topic_prefix)
        except OSError as exc:
            print(f"edge-fleet simulate: cannot publish to {args.host}:{args.port}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        if args.report_store:
            from fleet.simulate import delivery_report
            from fleet.store import StoreError, open_store

            try:
                with open_store(args.report_store) as store:
                    out["delivery"] = delivery_report(fleet, store, wait_s=args.wait_s)
            except StoreError as exc:
                print(f"edge-fleet simulate: {exc}", file=sys.stderr)
                return EXIT_USAGE
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        s = out["summary"]
        print(f"{s['devices']} devices, {s['days']} days, seed {s['seed']}: {s['samples']} samples, "
              f"{s['failures']} failures {s['by_cause']}")
        print(f"noise: {out['noise']}")
        for k in ("out", "store", "published"):
            if k in out:
                print(f"{k}: {out[k]}")
        if "delivery" in out:
            d = out["delivery"]
            print(f"delivery: published {d['published']}, stored {d['stored']}, lost {d['lost']}"
                  + (f" (first missing: {', '.join(d['missing'][:5])})" if d["lost"] else ""))
    return EXIT_FAILED if out.get("delivery", {}).get("lost") else EXIT_OK


def cmd_maintenance(args: argparse.Namespace) -> int:
    from fleet.maintenance import run_command

    return run_command(args)


def register(subparsers: Any) -> dict[str, Handler]:
    p = subparsers.add_parser("simulate", help="simulate a fleet's histories with known failures")
    p.add_argument("--devices", type=int, default=30, metavar="N", help="devices (default 30)")
    p.add_argument("--days", type=float, default=14.0, metavar="D", help="days of history (default 14)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed: same seed, same fleet")
    p.add_argument("--step-s", type=float, default=300.0, metavar="S", help="sample interval (default 300)")
    p.add_argument("--start", type=float, metavar="EPOCH_S", help="first sample time (default 1.7e9)")
    p.add_argument("--drift-devices", type=int, default=0, metavar="N",
                   help="devices that drift into another role's behaviour")
    p.add_argument("--failure-rate", type=float, default=0.06, metavar="R", help="failures per device-day")
    p.add_argument("--sudden-share", type=float, default=0.25, metavar="F", help="share without precursor")
    p.add_argument("--no-nab", action="store_true", help="synthetic noise instead of NAB traces")
    p.add_argument("--datasets", metavar="DIR", help="the directory holding nab/ (default: $EDGE_DATASETS, "
                   "then ../shared/datasets from the working directory, then beside the repository)")
    p.add_argument("--out", metavar="DIR", help="write <device>.csv, events.jsonl and truth.json here")
    p.add_argument("--store", metavar="URL", help="write into a fleet store (sqlite:///PATH or postgresql://)")
    p.add_argument("--truth", metavar="PATH", help="with --store: write the ground truth JSON here")
    p.add_argument("--mqtt", action="store_true", help="publish as the devices would")
    p.add_argument("--host", default="localhost", help="with --mqtt: broker host")
    p.add_argument("--port", type=int, default=1883, help="with --mqtt: broker port")
    p.add_argument("--topic-prefix", default="devices/{device_id}", help="with --mqtt: the devices' topic prefix")
    p.add_argument("--report-store", metavar="URL",
                   help="with --mqtt: the store the collectors write; report published vs stored (exit 1 if lost)")
    p.add_argument("--wait-s", type=float, default=60.0, metavar="S",
                   help="with --report-store: wait this long for the collectors to catch up (default 60)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = subparsers.add_parser("maintenance", help="predictive maintenance: train | evaluate")
    msub = p.add_subparsers(dest="maintenance_command", metavar="ACTION", required=True)
    for name, text in (("train", "build the dataset from the store, train, register (and publish)"),
                       ("evaluate", "score a registered (or given) model on the store's history")):
        q = msub.add_parser(name, help=text)
        q.add_argument("--store", metavar="URL", help="fleet store URL (default: the config's)")
        q.add_argument("--since", type=float, metavar="EPOCH_S", help="oldest sample used")
        q.add_argument("--json", action="store_true", help="print JSON")
        if name == "train":
            q.add_argument("--out", metavar="DIR", help="also write the model directory here")
            q.add_argument("--trees", type=int, default=100, help="trees in the random forest (default 100)")
            q.add_argument("--max-depth", type=int, default=8, help="tree depth limit (default 8)")
            q.add_argument("--seed", type=int, default=0, help="random seed")
            q.add_argument("--no-register", action="store_true", help="do not add it to the registry")
            q.add_argument("--publish", action="store_true", help="promote and publish to the fleet")
        else:
            q.add_argument("--model", metavar="DIR", help="a model directory (default: the fleet champion)")
    return {"simulate": cmd_simulate, "maintenance": cmd_maintenance}
