"""``edge-agent export``: a time range of samples as CSV or JSON lines, streamed.

Streaming (a cursor, one row at a time) keeps memory flat on a 1 GB device even
for a week of 1 Hz data.  CSV columns are the union of the metrics stored, so
the file loads straight into pandas, the forecaster trainer or ``replay``.

The query goes through sqlite-utils (identifier quoting, the filtered, ordered
SELECT as dict rows), which this one-shot command can afford; the daemon's hot path
stays on plain sqlite3 (agent/store.py says why).
"""
from __future__ import annotations

import csv
import json
from typing import IO, Iterator, Sequence

import sqlite_utils
from sqlite_utils.db import quote_identifier

from agent.store import Store, time_range
from agent.timeparse import iso_utc


def _rows(store: Store, names: Sequence[str], since_s: float | None,
          until_s: float | None) -> Iterator[tuple[float, dict[str, float]]]:
    """(ts_s, {metric: value}) in sample order; absent values are left out."""
    # leave the connection as it is: no plugins, no PRAGMA recursive_triggers
    table = sqlite_utils.Database(store.conn, recursive_triggers=False, execute_plugins=False)["samples"]
    known = set(store.metric_names())
    cols = [n for n in names if n in known]
    where, args = time_range(since_s, until_s)
    select = ", ".join(quote_identifier(c) for c in ("ts_s", *cols))
    for row in table.rows_where(where or None, args, order_by="seq", select=select):
        yield row["ts_s"], {n: row[n] for n in cols if row[n] is not None}


def export(
    store: Store,
    out: IO[str],
    fmt: str = "csv",
    since_s: float | None = None,
    until_s: float | None = None,
    metrics: Sequence[str] | None = None,
) -> int:
    """Write samples to ``out``; returns the number of rows written."""
    if fmt not in ("csv", "jsonl"):
        raise ValueError(f"unknown export format {fmt!r}; expected csv or jsonl")
    names = list(metrics or store.metric_names())
    rows = 0
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(["timestamp", *names])
        for ts_s, values in _rows(store, names, since_s, until_s):
            writer.writerow([iso_utc(ts_s), *(repr(values[n]) if n in values else "" for n in names)])
            rows += 1
    else:
        for ts_s, values in _rows(store, names, since_s, until_s):
            out.write(json.dumps({"timestamp": iso_utc(ts_s), "ts_s": ts_s, **values}) + "\n")
            rows += 1
    return rows
