"""``edge-agent export``: a time range of samples as CSV or JSON lines, streamed.

Streaming (a cursor, one row at a time) keeps memory flat on a 1 GB device even
for a week of 1 Hz data.  CSV columns are the union of the metrics stored, so
the file loads straight into pandas, the forecaster trainer or ``replay``.
"""
from __future__ import annotations

import csv
import json
from typing import IO, Sequence

from agent.store import Store
from agent.timeparse import iso_utc


def export(
    store: Store,
    out: IO[str],
    fmt: str = "csv",
    since_s: float | None = None,
    until_s: float | None = None,
    metrics: Sequence[str] | None = None,
) -> int:
    """Write samples to ``out``; returns the number of rows written."""
    names = [m for m in (metrics or store.metric_names())]
    rows = 0
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(["timestamp", *names])
        for ts_s, values in store.iter_samples(since_s, until_s, names):
            writer.writerow([iso_utc(ts_s), *(repr(values[n]) if n in values else "" for n in names)])
            rows += 1
    elif fmt == "jsonl":
        for ts_s, values in store.iter_samples(since_s, until_s, names):
            out.write(json.dumps({"timestamp": iso_utc(ts_s), "ts_s": ts_s, **values}) + "\n")
            rows += 1
    else:
        raise ValueError(f"unknown export format {fmt!r}; expected csv or jsonl")
    return rows
