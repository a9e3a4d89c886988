"""``edge-agent backtest`` output format on a real NAB series."""
from __future__ import annotations

import argparse
import csv
import io
import os
from pathlib import Path

import pytest

from agent.backtest import COLUMNS, add_arguments, backtest, run

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("EDGE_DATASETS", REPO.parent / "shared" / "datasets"))
NAB_CSV = DATASETS / "nab" / "data" / "realAWSCloudwatch" / "ec2_cpu_utilization_53ea38.csv"


@pytest.fixture
def nab_head(tmp_path: Path) -> Path:
    if not NAB_CSV.exists():
        pytest.skip(f"NAB data not found at {NAB_CSV} (set EDGE_DATASETS)")
    lines = NAB_CSV.read_text(encoding="utf-8").splitlines()[:1001]      # header + 1000 rows (~3.5 days)
    path = tmp_path / "head.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_backtest_writes_the_documented_columns(nab_head: Path, tmp_path: Path):
    out = tmp_path / "out.csv"
    summary = backtest(nab_head, "value", out)
    header, rows = read_rows(out)
    assert tuple(header) == COLUMNS
    assert len(rows) == summary["rows"] > 0
    with open(nab_head, newline="", encoding="utf-8") as f:
        inp = list(csv.DictReader(f))
    index = {r["timestamp"]: i for i, r in enumerate(inp)}
    by_origin: dict[str, list[dict]] = {}
    for r in rows:
        by_origin.setdefault(r["origin"], []).append(r)
    assert len(by_origin) == summary["origins"]
    for origin, group in by_origin.items():
        i = index[origin]                                        # origin is an input timestamp, verbatim
        steps = [int(r["step"]) for r in group]
        assert steps == list(range(1, len(group) + 1)) and len(group) <= 12
        assert len(group) == min(12, len(inp) - 1 - i)           # only steps that exist in INPUT
        for r in group:
            assert float(r["actual"]) == float(inp[i + int(r["step"])]["value"])
            lo95, lo80, hi80, hi95 = (float(r[k]) for k in ("lower_95", "lower_80", "upper_80", "upper_95"))
            assert lo95 <= lo80 <= hi80 <= hi95
            assert r["model"].startswith("fallback:") or r["model"] == "naive"
    # the first origin is the first row with calibrated intervals; every later row is an origin
    first = index[rows[0]["origin"]]
    assert summary["origins"] == len(inp) - 1 - first
    s = summary["scores"]["all"]
    assert 0.85 <= s["coverage_95"] <= 1.0 and 0.65 <= s["coverage_80"] <= 0.95
    assert s["mase"] > 0


def test_backtest_every_and_warmup(nab_head: Path, tmp_path: Path):
    out = tmp_path / "thin.csv"
    summary = backtest(nab_head, "system.cpuUsage", out, every=50, warmup=100)   # no such column: 'value'
    _, rows = read_rows(out)
    origins = sorted({r["origin"] for r in rows})
    with open(nab_head, newline="", encoding="utf-8") as f:
        ts = [r["timestamp"] for r in csv.DictReader(f)]
    idx = sorted(ts.index(o) for o in origins)
    assert idx[0] == 100 and all(b - a == 50 for a, b in zip(idx, idx[1:]))
    assert summary["origins"] == len(idx)


def test_cli_arguments_and_errors(nab_head: Path, tmp_path: Path):
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    args = ap.parse_args([str(nab_head), "--metric", "value", "--out", str(tmp_path / "o.csv"), "--every", "20"])
    buf = io.StringIO()
    assert run(args, stdout=buf) == 0
    assert "coverage95" in buf.getvalue() and (tmp_path / "o.csv").exists()
    bad = ap.parse_args([str(tmp_path / "missing.csv"), "--metric", "value", "--out", str(tmp_path / "x.csv")])
    assert run(bad, stdout=io.StringIO()) == 2
