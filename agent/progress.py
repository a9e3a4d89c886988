"""A one-line progress bar on stderr for long one-shot commands (replay, backtest, train, simulate).

Why a tiny one here rather than tqdm: the device side keeps its dependencies to
numpy, psutil and paho, and this is twenty lines. It draws only when the stream is
a terminal and the user did not ask for ``--quiet``, so logs, pipes, CI and the
systemd journal never get carriage returns. Library code takes a plain
``progress(done, total)`` callable (or None) and stays free of output; the CLI
builds the bar and passes it in.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

ProgressFn = Callable[[int, int], None]

BAR_WIDTH = 24


def _clock_text(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def render(label: str, done: int, total: int, elapsed_s: float, unit: str = "rows") -> str:
    """The bar's text, e.g. ``replay [######......] 25% 2,500/10,000 rows 1,234 rows/s ETA 0:06``."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    speed = f"{rate:,.0f} {unit}/s" if rate >= 10 else f"{rate:.2g} {unit}/s"
    if total > 0:
        frac = min(max(done / total, 0.0), 1.0)
        filled = int(frac * BAR_WIDTH)
        eta = _clock_text((total - done) / rate) if rate > 0 and done < total else "--:--" if done < total else "0:00"
        return (f"{label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {frac * 100:3.0f}% "
                f"{done:,}/{total:,} {unit} {speed} ETA {eta}")
    return f"{label} {done:,} {unit} {speed}"


class Progress:
    """Callable ``(done, total)``; redraws at most every ``min_interval_s``; ``close()`` ends the line."""

    def __init__(self, label: str, *, unit: str = "rows", stream: TextIO | None = None, quiet: bool = False,
                 min_interval_s: float = 0.2, clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = not quiet and bool(isatty and isatty())
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._started = clock()
        self._last_draw: float | None = None
        self._width = 0
        self._drawn: tuple[int, int] | None = None
        self.done = self.total = 0

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if not self.enabled:
            return
        now = self._clock()
        if self._last_draw is not None and now - self._last_draw < self.min_interval_s and done < total:
            return
        self._draw(now)

    def _draw(self, now: float) -> None:
        text = render(self.label, self.done, self.total, now - self._started, self.unit)
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)
        self._last_draw = now
        self._drawn = (self.done, self.total)

    def close(self) -> None:
        """End the line (after drawing the final state if the last draw was skipped)."""
        if self.enabled and self._last_draw is not None:
            if self._drawn != (self.done, self.total):
                self._draw(self._clock())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Progress", "ProgressFn", "render"]
