"""The progress bar (agent/progress.py): drawn on a terminal only, quiet otherwise or with --quiet."""
from __future__ import annotations

import csv
import io
import json
import math

from agent import cli
from agent.progress import Progress, render
from tests.fakes import FakeClock


class TTY(io.StringIO):
    """A real text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_render_shows_share_count_rate_and_eta() -> None:
    text = render("replay", 2500, 10_000, 2.0)
    assert text.startswith("replay [######" + "." * 18 + "]")
    assert " 25% 2,500/10,000 rows " in text and "1,250 rows/s" in text and text.endswith("ETA 0:06")
    assert render("x", 10, 10, 5.0).endswith("ETA 0:00")
    assert "ETA 1:00:00" in render("x", 1, 3601, 1.0, unit="steps") and "1 steps/s" in render("x", 1, 3601, 1.0,
                                                                                                  unit="steps")
    assert render("x", 0, 10, 0.0).endswith("ETA --:--")
    assert render("x", 7, 0, 1.0) == "x 7 rows 7 rows/s"        # unknown total: a counter


def test_draws_on_a_terminal_at_most_every_interval_and_ends_the_line() -> None:
    clock = FakeClock()
    tty = TTY()
    bar = Progress("replay", stream=tty, min_interval_s=0.5, clock=clock.monotonic)
    for i in range(1, 101):
        clock.advance(0.01)
        bar(i, 100)
    bar.close()
    out = tty.getvalue()
    assert out.endswith("\n") and out.count("\r") == 3     # first row, 0.5 s later, the last row
    assert "100% 100/100 rows 100 rows/s ETA 0:00" in out.splitlines()[-1]


def test_silent_when_not_a_terminal_or_quiet() -> None:
    plain = io.StringIO()
    bar = Progress("replay", stream=plain)
    bar(1, 2), bar(2, 2), bar.close()
    quiet_tty = TTY()
    bar = Progress("replay", stream=quiet_tty, quiet=True)
    bar(1, 2), bar(2, 2), bar.close()
    assert plain.getvalue() == quiet_tty.getvalue() == ""
    assert bar.done == 2                       # still counts, for callers that want the figure


def _series(path, n=400):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "value"])
        for i in range(n):
            w.writerow([1_700_000_000 + 60 * i, 10 + math.sin(i / 5) + (30 if i == 300 else 0)])


def test_replay_and_backtest_draw_on_a_terminal_and_not_with_quiet(tmp_path, monkeypatch, capsys) -> None:
    src = tmp_path / "in.csv"
    _series(src)
    for argv, label in ((["replay", str(src), "--out", str(tmp_path / "o.csv")], "replay ["),
                        (["backtest", str(src), "--metric", "value", "--out", str(tmp_path / "b.csv")], "backtest [")):
        tty = TTY()
        monkeypatch.setattr("sys.stderr", tty)
        assert cli.main(argv) == 0
        assert f"\r{label}" in tty.getvalue() and "rows/s" in tty.getvalue() and "ETA" in tty.getvalue()
        assert "100% 400/400 rows" in tty.getvalue()
        tty = TTY()
        monkeypatch.setattr("sys.stderr", tty)
        assert cli.main(["--quiet", *argv]) == 0
        assert "\r" not in tty.getvalue()
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[0])["rows"] == 400        # stdout keeps the result, untouched


def test_fleet_simulate_draws_per_device_on_a_terminal(tmp_path, monkeypatch) -> None:
    from fleet import cli as fleet_cli

    tty = TTY()
    monkeypatch.setattr("sys.stderr", tty)
    assert fleet_cli.main(["simulate", "--devices", "3", "--days", "1", "--no-nab", "--out", str(tmp_path)]) == 0
    assert "\rsimulate [" in tty.getvalue() and "100% 3/3 devices" in tty.getvalue()
    tty = TTY()
    monkeypatch.setattr("sys.stderr", tty)
    assert fleet_cli.main(["-q", "simulate", "--devices", "3", "--days", "1", "--no-nab", "--out", str(tmp_path)]) == 0
    assert tty.getvalue() == ""
