"""``edge-agent``: the device command line.

Every command takes ``--config``; configuration and argument errors print one
line and exit 2, never a traceback, because the person reading it is usually
editing a TOML file on a device over SSH.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from datetime import datetime, timezone
from typing import Callable, Sequence

from agent import __version__, cli_models, config as config_mod
from agent.cliopts import GlobalOptions, option
from agent.config import AgentConfig, ConfigError

log = logging.getLogger(__name__)

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad argument value detected after argparse (e.g. an unparseable time)."""


# Accepted by every command, before or after its name (agent/cliopts.py); add new global options here.
GLOBAL_OPTIONS = GlobalOptions(
    option("--config", metavar="PATH", help="configuration file (default: $EDGE_AGENT_CONFIG, "
           "then /etc/edge-agent/agent.toml, then the built-in local default)"),
    option("-v", "--debug", action="store_true", default=False,
           help="log at DEBUG level (overrides agent.log_level)"),
    option("-q", "--quiet", action="store_true", default=False,
           help="no progress bar (there is none anyway when stderr is not a terminal)"),
)


def _cmd_run(cfg: AgentConfig, args: argparse.Namespace) -> int:
    from agent import daemon

    if args.once:
        return _run_once(cfg)
    return daemon.run(cfg)


def _run_once(cfg: AgentConfig) -> int:
    from agent.oneshot import sample_and_score
    from agent.sampling import PsutilSource, SystemClock

    source = PsutilSource(cfg.sampling.mounts, cfg.sampling.per_cpu, cfg.sampling.temperature)
    doc = sample_and_score(cfg, source, SystemClock(), time.sleep)
    print(f"sample      {_fmt_ts(doc['ts_s'])}  device {doc['device_id']}  config {doc['config']}  "
          "(nothing stored or sent)")
    for name, value in sorted(doc["values"].items()):
        print(f"  {name:32s} {format_metric(name, value)}")
    version = f" v{doc['model_version']}" if doc["model_version"] is not None else ""
    print(f"detector    {doc['detector']}{version}, warmed on {doc['warmed_on']} buffered samples"
          + ("" if doc["zscore_ready"] else f" (z-score warming up: needs {cfg.detect.zscore_warmup})"))
    if doc["forest_error"]:
        print(f"  forest not loaded: {doc['forest_error']}")
    forest = "-" if doc["forest_score"] is None else f"{doc['forest_score']:.4g}"
    print(f"scores      score {doc['score']:.3g}  anomaly_score {doc['anomaly_score']:.3g}  "
          f"severity {doc['severity']}  |z| max {doc['z_max']:.3g}  forest {forest}")
    for text in doc["explanation"]:
        print(f"  {text}")
    return 0


def _cmd_config(cfg: AgentConfig, args: argparse.Namespace) -> int:
    if args.sample:
        sys.stdout.write(config_mod.EXAMPLE_PATH.read_text(encoding="utf-8"))
        return 0
    print(f"# effective configuration: {cfg.source} + EDGE_AGENT_* environment"
          + ("" if args.show_secrets else "; secrets masked (--show-secrets)"))
    sys.stdout.write(config_mod.render_toml(cfg, mask_secrets=not args.show_secrets))
    return 0


def _fmt_ts(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


_BYTE_UNITS = ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"))


def format_metric(name: str, value: float) -> str:
    """A sample value for people, in the metric's unit ("6.62 GB", "1.2 kB/s", "12.5 %", "3.2 d"):
    a raw 6.61944e+09 makes an operator count digits."""
    base = re.sub(r"^(system\.cpuUsage)\.\d+$", r"\1", name.split(":", 1)[0])  # per mount, per core
    if base.endswith("Percent") or base == "system.cpuUsage":
        return f"{value:.1f} %"
    is_rate = base.endswith("PerSec")
    if "ytes" in base or re.fullmatch(r"system\.(memory|swap|disk)(Used|Total)", base):
        div, unit = next(((d, u) for d, u in _BYTE_UNITS if abs(value) >= d), (1.0, "B"))
        return f"{value / div:.3g} {unit}" + ("/s" if is_rate else "")
    if base == "system.uptime":
        for div, u in ((86400.0, "d"), (3600.0, "h"), (60.0, "min")):
            if value >= div:
                return f"{value / div:.1f} {u}"
        return f"{value:.0f} s"
    if base.endswith("temperature"):
        return f"{value:.1f} °C"
    return f"{value:.4g}" + ("/s" if is_rate else "")


def _cmd_status(cfg: AgentConfig, args: argparse.Namespace) -> int:
    from agent import status

    from agent import health
    from agent.daemon import health_params

    now = time.time()
    doc = status.collect(cfg, now)
    problems = health.evaluate(doc, now, health_params(cfg), interval_s=cfg.agent.interval_s)
    doc["health"] = {"ok": not problems, "problems": [{"code": p.code, "message": p.message} for p in problems]}
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True, default=str))
        return health.exit_code(problems)
    s = doc["samples"]
    print(f"device      {doc['device_id']}  ({'running' if doc['running'] else 'not running'})")
    print(f"config      {doc['config']}")
    print(f"database    {doc['database']['path']}  {doc['database']['size_bytes'] / 1e6:.1f} MB")
    print(f"samples     {s['count']}  oldest {_fmt_ts(s['oldest'])}  newest {_fmt_ts(s['newest'])}")
    print(f"events      {doc['events']['count']}")
    print(f"outbox      depth {doc['outbox']['depth']}  dropped {doc['outbox']['dropped']}")
    print(f"mqtt        {'connected' if doc['mqtt'].get('connected') else 'disconnected'}")
    models = ", ".join(f"{m['kind']} v{m['version']}" for m in doc["models"]) or "none"
    print(f"models      {models}")
    print(f"health      {'ok' if not problems else 'UNHEALTHY'}")
    for problem in problems:
        print(f"  - {problem.message}")
    if doc["last_sample"]:
        print("last sample")
        for name, value in sorted(doc["last_sample"].items()):
            print(f"  {name:32s} {format_metric(name, value)}")
    return health.exit_code(problems)


def _cmd_export(cfg: AgentConfig, args: argparse.Namespace) -> int:
    from agent.export import export
    from agent.store import Store
    from agent.timeparse import parse_time_arg

    now = time.time()
    try:
        since = parse_time_arg(args.since, now) if args.since else None
        until = parse_time_arg(args.until, now) if args.until else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    fmt = args.format or ("jsonl" if args.out and args.out.endswith((".jsonl", ".json")) else "csv")
    if not cfg.db_path.exists():  # opening a Store would create an empty one and "export" nothing
        raise UsageError(f"database {cfg.db_path} does not exist (has the agent run with this configuration?)")
    store = Store(cfg.db_path)
    if not store.available:
        raise UsageError(f"database {cfg.db_path} cannot be opened")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    stored = store.metric_names()
    unknown = sorted(set(metrics or ()) - set(stored))
    if unknown:
        store.close()
        raise UsageError(f"--metrics: no such metric {', '.join(unknown)}; stored: {', '.join(stored)}")
    out = open(args.out, "w", newline="", encoding="utf-8") if args.out and args.out != "-" else sys.stdout
    try:
        rows = export(store, out, fmt, since, until, metrics)
    finally:
        if out is not sys.stdout:
            out.close()
        store.close()
    log.info("exported %d rows", rows)
    return 0


def _cmd_train(cfg: AgentConfig, args: argparse.Namespace) -> int:
    from agent import training
    from agent.progress import Progress

    try:
        if args.kind == "forest":
            with Progress("train forest", unit="stages", quiet=args.quiet) as bar:
                result = training.train_forest(cfg, progress=bar)
        else:
            with Progress("train lstm", unit="epochs", quiet=args.quiet) as bar:
                result = training.train_forecaster(cfg, progress=bar)
    except training.TrainingError as exc:
        print(f"edge-agent train: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 used to mean "the default" without saying so)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _value_range(text: str) -> tuple[str, float, float]:
    """COLUMN=LOW:HIGH -> (column, low, high); ValueError names the bad part."""
    col, sep, span = text.rpartition("=")
    lo, sep2, hi = span.partition(":")
    try:
        if not (col and sep and sep2):
            raise ValueError
        return col, float(lo), float(hi)
    except ValueError:
        raise ValueError(f"--value-range {text!r}: expected COLUMN=LOW:HIGH, e.g. value=0:100") from None


def _cmd_replay(cfg: AgentConfig, args: argparse.Namespace) -> int:
    from agent import replay
    from agent.detection import detect_params
    from agent.progress import Progress

    # [detect] thresholds and windows apply; the features are the CSV's (agent/replay.py chooses them)
    value_cols = args.value_cols.split(",") if args.value_cols else None
    try:
        params = replay.ReplayParams(detect=detect_params(cfg.detect), train_rows=args.train_rows,
                                     value_ranges=tuple(_value_range(v) for v in args.value_range))
        with Progress("replay", quiet=args.quiet) as bar:
            summary = replay.replay(args.input, args.out, timestamp_col=args.timestamp_col, value_cols=value_cols,
                                    model_dir=args.model, params=params, progress=bar)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(str(exc)) from None
    if summary.skipped_cols:   # the one info line: what the replay did not watch, and why
        print(f"edge-agent replay: skipped {len(summary.skipped_cols)} column(s) that are no detector feature "
              f"(counters, totals, uptime, process count) or not in [detect] features: "
              f"{', '.join(summary.skipped_cols)}", file=sys.stderr)
    print(json.dumps({"rows": summary.rows, "train_rows": summary.train_rows, "detector": summary.detector,
                      "episodes": summary.episodes, "model_version": summary.model_version, "out": args.out,
                      "value_cols": list(summary.value_cols), "skipped_cols": list(summary.skipped_cols)}))
    return 0


def _cmd_backtest(cfg: AgentConfig, args: argparse.Namespace) -> int:
    from agent import backtest
    from agent.forecasting import params_from_section

    # [forecast] settings apply (season, limits, intervals); one CSV row is one step, --horizon rows ahead
    return backtest.run(args, params=params_from_section(cfg.forecast).engine)


def _cmd_report(cfg: AgentConfig, args: argparse.Namespace) -> int:
    from agent.report import ReportError, write_report
    from agent.timeparse import parse_time_arg

    now = time.time()
    try:
        since = parse_time_arg(args.since, now) if args.since else None
        until = parse_time_arg(args.until, now) if args.until else None
        size = write_report(cfg, args.out, now, since, until, args.points)
    except (ValueError, ReportError) as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {args.out} ({size / 1e3:.0f} kB)")
    return 0


COMMANDS: dict[str, Callable[[AgentConfig, argparse.Namespace], int]] = {
    "run": _cmd_run,
    "config": _cmd_config,
    "status": _cmd_status,
    "export": _cmd_export,
    "train": _cmd_train,
    "replay": _cmd_replay,
    "report": _cmd_report,
    "backtest": _cmd_backtest,
    "models": lambda cfg, args: cli_models.run(cfg, args),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description="On-device metrics, anomaly detection and forecasting.")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the agent in the foreground")
    p.add_argument("--once", "--test", dest="once", action="store_true",
                   help="print one sample and its scores (detector warmed on the buffer), store and send nothing")

    p = sub.add_parser("config", help="print the effective configuration as TOML (or a sample one)")
    p.add_argument("--sample", action="store_true", help="print the documented sample configuration instead")
    p.add_argument("--show-secrets", action="store_true", help="print passwords and tokens instead of ***")

    p = sub.add_parser("status", help="show samples, events, outbox, connection and models")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("export", help="write a time range of samples as CSV or JSON lines")
    p.add_argument("--since", help="start: ISO 8601, epoch seconds or an age such as 24h")
    p.add_argument("--until", help="end: ISO 8601, epoch seconds or an age")
    p.add_argument("--metrics", help="comma-separated metric names (default: all)")
    p.add_argument("--format", choices=("csv", "jsonl"), help="default: from --out's extension, else csv")
    p.add_argument("--out", help="output file (default: standard output)")

    p = sub.add_parser("train", help="train a model on this device's history and install it")
    p.add_argument("--kind", choices=("forest", "forecast"), default="forest",
                   help="forest: Isolation Forest (scikit-learn); forecast: LSTM (TensorFlow)")
    p.add_argument("--forecast", dest="kind", action="store_const", const="forecast", help="same as --kind forecast")

    p = sub.add_parser("replay", help="run the detection pipeline over a CSV as fast as it can")
    p.add_argument("input", help="CSV with a timestamp column (ISO 8601 or epoch s) and numeric columns")
    p.add_argument("--out", required=True, help="output .csv (timestamp, score, anomaly_score, severity, episode_id) "
                   "or .jsonl")
    p.add_argument("--timestamp-col", default="timestamp", help="the timestamp column (default: timestamp)")
    p.add_argument("--value-cols", help="comma-separated value columns (default: the [detect] features the CSV "
                   "has, else every column that is no counter, total, uptime or process count)")
    p.add_argument("--model", help="a forest model directory to use instead of training on the first rows")
    p.add_argument("--train-rows", type=_positive_int, help="rows used as the training window (default: 15%%, at most 750)")
    p.add_argument("--value-range", action="append", default=[], metavar="COLUMN=LOW:HIGH",
                   help="a column's known range: its novelty bins are that range cut in 8 instead of "
                        "being learned on the training window (repeatable; NAB's harness gives every series')")

    from agent.backtest import add_arguments as add_backtest_arguments

    p = sub.add_parser("backtest", help="rolling-origin evaluation of the device's forecasters over a CSV")
    add_backtest_arguments(p)

    p = sub.add_parser("report", help="write the device page (charts, forecast, events) as one self-contained HTML file")
    p.add_argument("--since", default="24h", help="start: ISO 8601, epoch seconds or an age (default: 24h)")
    p.add_argument("--until", help="end (default: the newest sample)")
    p.add_argument("--points", type=_positive_int, default=2000, help="values per chart at most (min/max downsampling)")
    p.add_argument("--out", required=True, help="output .html file")

    cli_models.add_parser(sub)
    return GLOBAL_OPTIONS.install(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args = GLOBAL_OPTIONS.parse(build_parser(), argv)
    try:
        cfg = config_mod.load(args.config)
    except ConfigError as exc:
        print(f"edge-agent: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from agent import logsetup

    # One-shot commands print their own result and errors; the daemon's log level is for `run`.
    level = cfg.agent.log_level if args.command == "run" or cfg.agent.log_level == "DEBUG" else "ERROR"
    if getattr(args, "debug", False):
        level = "DEBUG"
    logsetup.setup(level, cfg.agent.log_format)
    try:
        return COMMANDS[args.command](cfg, args)
    except UsageError as exc:
        print(f"edge-agent {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `edge-agent export | head`: the reader left, which is fine
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at interpreter exit
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
