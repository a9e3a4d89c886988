"""`edge-agent replay`: run the device's detection pipeline over a CSV, as fast as it can.

INPUT: a ``timestamp`` column (ISO 8601, naive = UTC, or epoch seconds) and one or
more numeric columns (metric names, or ``value``). OUT: one row per input row, in
order: ``timestamp, score, anomaly_score, severity, episode_id`` (CSV, or JSON
lines when the output name ends with .jsonl). ``timestamp`` is copied verbatim.

Training mirrors the device: the first ``train_rows`` samples are the training
window (z-score only while they stream in), then an Isolation Forest is trained
on them (in-process; scikit-learn is imported lazily because replay is a tool
command, never the daemon) and scores the rest. Without scikit-learn, with
fewer rows than the forest's minimum, or with a single value column (the forest
would only repeat the value's z-score, see ``forest_min_metrics``), replay stays
z-score only and logs why.
With ``model_dir`` (a forest model directory) that model is used from row one.

Value columns (unless named): every CSV an ``edge-agent export`` writes must replay, so
columns that are no detector feature (counters, totals, uptime, process count) are
skipped, and when the CSV has any of the device's ``[detect] features`` exactly those
are used, so a replay of a device's export watches what that device watched. Any other
CSV (``value``, a NAB series) uses every remaining column. The skipped columns are named
in one info line and in the summary, never an error.
An ``episode_id`` is written on every row from an episode's start to its end.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from models.detect import DetectParams, Detector, RowResult
from models.features import derived_names, is_detector_feature
from models.forest import ForestModel, load_forest_model

log = logging.getLogger(__name__)

OUT_COLUMNS = ("timestamp", "score", "anomaly_score", "severity", "episode_id")


@dataclass(frozen=True)
class ReplayParams:
    detect: DetectParams = field(default_factory=DetectParams)
    train_fraction: float = 0.15      # training window = min(fraction * rows, train_rows_max) ...
    train_rows_max: int = 750
    train_rows: int | None = None     # ... unless given explicitly
    forest: bool = True               # train a forest after the training window ...
    forest_min_metrics: int = 2       # ... when there are at least this many value columns
    forest_window: int = 0            # >0: forest also sees rolling mean/std/diff over this many rows
    forest_version: int = 1
    value_ranges: tuple[tuple[str, float, float], ...] = ()   # (column, low, high) known up front


@dataclass(frozen=True)
class ReplaySummary:
    rows: int
    value_cols: tuple[str, ...]
    train_rows: int
    detector: str
    episodes: int
    model_version: int | None
    skipped_cols: tuple[str, ...] = ()


def parse_timestamp(text: str) -> float:
    """Epoch seconds from ISO 8601 (naive = UTC) or a number of epoch seconds."""
    s = text.strip()
    try:
        return float(s)
    except ValueError:
        pass
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def choose_value_cols(columns: Sequence[str], device_features: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(value columns, skipped columns) of a CSV without ``--value-cols`` (see the module docstring)."""
    usable = [c for c in columns if is_detector_feature(c)]
    device = [f for f in device_features if f in usable]
    chosen = tuple(device or usable)
    return chosen, tuple(c for c in columns if c not in chosen)


def read_csv(path: str | Path, timestamp_col: str = "timestamp", value_cols: Sequence[str] | None = None,
             device_features: Sequence[str] = ()) -> tuple[list[str], list[float], list[dict], tuple[str, ...]]:
    """(raw timestamps, ts_s, value dicts, value columns); unparsable cells are missing values."""
    cols, _ = read_header(path, timestamp_col, value_cols, device_features)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        raw_ts, ts, rows = [], [], []
        for line in reader:
            raw = line[timestamp_col]
            raw_ts.append(raw)
            ts.append(parse_timestamp(raw))
            vals = {}
            for c in cols:
                try:
                    v = float(line[c])
                except (TypeError, ValueError):
                    continue
                if math.isfinite(v):
                    vals[c] = v
            rows.append(vals)
    return raw_ts, ts, rows, cols


def read_header(path: str | Path, timestamp_col: str = "timestamp", value_cols: Sequence[str] | None = None,
                device_features: Sequence[str] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(value columns, skipped columns) of ``path``; ValueError when there is nothing to replay."""
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
    if header is None or timestamp_col not in header:
        raise ValueError(f"{path}: no {timestamp_col!r} column")
    others = [c for c in header if c != timestamp_col]
    if value_cols:
        missing = [c for c in value_cols if c not in header]
        if missing:
            raise ValueError(f"{path}: value columns missing: {missing}")
        refused = [c for c in value_cols if not is_detector_feature(c)]
        if refused:
            raise ValueError(f"--value-cols: {', '.join(refused)} never a detector feature "
                             "(a counter, a total, uptime or the process count)")
        return tuple(value_cols), tuple(c for c in others if c not in value_cols)
    cols, skipped = choose_value_cols(others, device_features)
    if not cols:
        raise ValueError(f"{path}: no value column to replay (only {', '.join(skipped) or 'a timestamp'})")
    return cols, skipped


def _train_forest(rows: list[dict], names: Sequence[str], version: int) -> ForestModel | None:
    try:
        from models.training.forest import ForestParams, NotEnoughSamples, train_forest_from_rows
    except ImportError as e:  # scikit-learn absent on this machine
        log.info("replay: no forest (%s); z-score only", e)
        return None
    with tempfile.TemporaryDirectory(prefix="replay-forest-") as tmp:
        out = Path(tmp) / "model"
        try:
            train_forest_from_rows(rows, names, ForestParams(), out, version)
        except NotEnoughSamples as e:
            log.info("replay: no forest (%s); z-score only", e)
            return None
        return load_forest_model(out)


def numeric_columns(rows: Sequence[dict], cols: Sequence[str], *, explicit: bool, source: str) -> tuple[str, ...]:
    """The value columns that hold at least one number; ValueError when none do.

    Why: a column of text parses to no value at all, and a detector fed nothing scores every
    row 0, which reads as "no anomaly" instead of "wrong input".
    """
    if not rows:
        raise ValueError(f"{source}: no data rows")
    empty = [c for c in cols if not any(c in r for r in rows)]
    if explicit and empty:
        raise ValueError(f"{source}: value columns without a single number: {', '.join(empty)}")
    kept = tuple(c for c in cols if c not in empty)
    if not kept:
        raise ValueError(f"{source}: no numeric value column (columns: {', '.join(cols)})")
    if empty:
        log.info("replay: columns without numbers left out: %s", ", ".join(empty))
    return kept


def replay_rows(ts: Sequence[float], rows: Sequence[dict], value_cols: Sequence[str],
                params: ReplayParams = ReplayParams(), model: ForestModel | None = None,
                progress: Callable[[int, int], None] | None = None
                ) -> tuple[list[RowResult], list[dict], ReplaySummary]:
    """Pure-ish core: results per row (episode ids filled over whole episodes) and close events;
    ``progress(done, total)`` is told after every row."""
    n = len(rows)
    if params.train_rows is not None:
        train_n = min(params.train_rows, n)
    else:
        train_n = min(int(params.train_fraction * n), params.train_rows_max)
    # the novelty grid is learned on the training window and rests a fifth of it after an alarm
    novelty = replace(params.detect.novelty, learn_rows=max(train_n, 1), rest_rows=train_n // 5,
                      ranges=params.value_ranges or params.detect.novelty.ranges)
    # rows of a value column keep their names; rate-like names are log1p-transformed as on the device
    dparams = replace(params.detect, features=tuple(value_cols), novelty=novelty)
    det = Detector(dparams, forest=model)
    want_forest = model is None and params.forest and dparams.use_forest
    if want_forest and len(value_cols) < params.forest_min_metrics:
        # one metric: the forest is a 1-D density test the value's z-score already does, and its
        # saturating score (any value beyond the training range isolates alike) only adds ties
        log.info("replay: no forest for %d value column(s) (< %d); z-score only",
                 len(value_cols), params.forest_min_metrics)
        want_forest = False
    results: list[RowResult] = []
    closed: list[dict] = []
    for i in range(n):
        if want_forest and i == train_n:
            names = derived_names(value_cols, params.forest_window) if params.forest_window > 0 else tuple(value_cols)
            forest = _train_forest(list(rows[:train_n]), names, params.forest_version)
            if forest is not None:
                det.set_forest(forest)
            want_forest = False
        r, events = det.update(ts[i], rows[i])
        results.append(r)
        closed.extend(e for e in events if e["action"] == "close")
        if progress is not None:
            progress(i + 1, n)
    closed.extend(det.flush())
    # an episode covers [start_ts_s, end_ts_s]: label every row inside, including its opening run
    ids: list[str | None] = [None] * n
    ordered = all(ts[i] <= ts[i + 1] for i in range(n - 1))
    for ep in closed:
        if ordered:
            lo, hi = bisect_left(ts, ep["start_ts_s"]), bisect_right(ts, ep["end_ts_s"])
            span = range(lo, hi)
        else:
            span = [i for i in range(n) if ep["start_ts_s"] <= ts[i] <= ep["end_ts_s"]]
        for i in span:
            ids[i] = ep["id"]
    labelled = [r if r.episode_id == ids[i] else replace(r, episode_id=ids[i]) for i, r in enumerate(results)]
    summary = ReplaySummary(rows=n, value_cols=tuple(value_cols), train_rows=train_n,
                            detector=det.detector_name, episodes=len(closed), model_version=det.model_version)
    return labelled, closed, summary


def _fmt(v: float) -> str:
    return repr(round(float(v), 9))


def replay(input_csv: str | Path, out_csv: str | Path, timestamp_col: str = "timestamp",
           value_cols: Sequence[str] | None = None, model_dir: str | Path | None = None,
           params: ReplayParams = ReplayParams(),
           progress: Callable[[int, int], None] | None = None) -> ReplaySummary:
    cols, skipped = read_header(input_csv, timestamp_col, value_cols, params.detect.features)
    if skipped:
        log.debug("replay: skipped %d column(s) that are no detector feature or not in [detect] features: %s",
                 len(skipped), ", ".join(skipped))
    raw_ts, ts, rows, cols = read_csv(input_csv, timestamp_col, cols)
    cols = numeric_columns(rows, cols, explicit=bool(value_cols), source=str(input_csv))
    model = load_forest_model(model_dir) if model_dir is not None else None
    if model is not None:
        unknown = [f for f in model.feature_names if f.split("|", 1)[0] not in cols]
        if unknown:
            raise ValueError(f"model needs columns absent from {input_csv}: {unknown}")
    results, _, summary = replay_rows(ts, rows, cols, params, model, progress)
    summary = replace(summary, skipped_cols=skipped)
    out = Path(out_csv)
    if out.suffix == ".jsonl":
        with open(out, "w", encoding="utf-8") as f:
            for raw, r in zip(raw_ts, results):
                f.write(json.dumps({"timestamp": raw, "score": r.score, "anomaly_score": r.anomaly_score,
                                    "severity": r.severity, "episode_id": r.episode_id or ""}) + "\n")
    else:
        with open(out, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(OUT_COLUMNS)
            for raw, r in zip(raw_ts, results):
                w.writerow([raw, _fmt(r.score), _fmt(r.anomaly_score), r.severity, r.episode_id or ""])
    log.info("replay: %d rows, %d training rows, detector %s, %d episodes -> %s",
             summary.rows, summary.train_rows, summary.detector, summary.episodes, out)
    return summary

