"""Transition novelty: "this metric has never gone from that level to this one before".

Why: the z-score, the daily profile and the forest judge a sample by its distance
from a baseline, so they miss anomalies of *shape*: a periodic signal that skips
a beat, a plateau at a normal level at the wrong moment, a jump between two
normal levels that never follow each other. Cutting each metric into coarse
bins and remembering which bin -> bin transitions have happened catches those
with one set lookup per metric and a few hundred remembered pairs. The idea is
the one behind the contextual detectors that lead NAB (CAD OSE, HTM), in its
simplest form: first-order transitions, a yes/no answer, no look-ahead. On NAB
it lifts the standard score from 56.4 to about 70 (README, bench/nab.py).

Grid: the bin width is ``width_fraction`` of the range seen in the first
``learn_rows`` samples, the first bin edge half a bin below that range's
minimum; or, for metrics whose range is known up front (``ranges``), that range
cut into ``bins`` bins, which is the convention of NAB, whose harness hands every
detector each series' minimum and maximum. Bins are unbounded: a value beyond
the learned range lands in a new bin, and its first transitions are novel. A
flat learning window gets a unit range. Nothing is reported while learning; the
learning window's own transitions are remembered once the grid exists. The
memory is not persisted: after a restart the agent learns again (750 samples,
12.5 minutes at 1 Hz), which costs a little recall and never raises an alarm.

Rest: after a reported score >= ``rest_threshold`` the gate reports 0 for
``rest_rows`` rows. One incident, one alarm: NAB counts every further row
outside a labelled window as a false positive, and so does an operator.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoveltyParams:
    """Defaults are the ones evaluated on NAB (bench/nab.py)."""

    enabled: bool = True
    learn_rows: int = 750            # samples that fix the grid (NAB's probationary period, at most 750)
    width_fraction: float = 0.25     # bin width as a share of the learned range
    bins: int = 8                    # bins across a range given up front
    ranges: tuple[tuple[str, float, float], ...] = ()   # (metric, low, high) known up front
    max_transitions: int = 4096      # per metric; a metric that has seen this many stops learning
    calibrated_weight: float = 0.5   # the calibrated surprise counts this much beside a novel transition
    rest_rows: int = 150             # rows reported as 0 after an alarm ...
    rest_threshold: float = 0.3      # ... that is, a score at least this high

    def __post_init__(self) -> None:
        if self.learn_rows < 1 or self.bins < 1 or self.rest_rows < 0 or self.max_transitions < 1:
            raise ValueError("need learn_rows >= 1, bins >= 1, rest_rows >= 0, max_transitions >= 1")
        if not 0 < self.width_fraction <= 1 or not 0 <= self.calibrated_weight <= 1:
            raise ValueError("need 0 < width_fraction <= 1 and 0 <= calibrated_weight <= 1")
        for name, lo, hi in self.ranges:
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"range of {name}: need finite low < high, got {lo}, {hi}")


class TransitionNovelty:
    """Per metric: which bin -> bin transitions have happened; ``update`` names the novel ones."""

    def __init__(self, names: Sequence[str], params: NoveltyParams = NoveltyParams()):
        self.params = params
        self.names = tuple(names)
        n = len(self.names)
        given = {name: (lo, hi) for name, lo, hi in params.ranges}
        self._origin = np.full(n, np.nan)
        self._width = np.full(n, np.nan)
        for i, name in enumerate(self.names):
            if name in given:
                lo, hi = given[name]
                self._origin[i], self._width[i] = lo, (hi - lo) / params.bins
        self._learning: list[np.ndarray] | None = []   # the learning window, replayed once the grid exists
        self._seen: list[set[tuple[int, int]]] = [set() for _ in range(n)]
        self._prev: list[int | None] = [None] * n
        self.n_rows = 0

    @property
    def learning(self) -> bool:
        return self._learning is not None

    def _fix_grid(self) -> None:
        window = np.vstack(self._learning) if self._learning else np.empty((0, len(self.names)))
        for i in np.flatnonzero(np.isnan(self._width)):
            col = window[:, i][~np.isnan(window[:, i])]
            if not len(col):
                continue   # never seen: stays gridless until a range is learned on a later restart
            span = float(col.max() - col.min()) or 1.0
            self._width[i] = span * self.params.width_fraction
            self._origin[i] = float(col.min()) - 0.5 * self._width[i]
        self._learning = None
        for row in window:
            self._observe(row)

    def _observe(self, x: np.ndarray) -> list[int]:
        """Remember this row's transitions; the indices of those never seen before."""
        novel = []
        for i in np.flatnonzero(~(np.isnan(x) | np.isnan(self._width))):
            b = math.floor((x[i] - self._origin[i]) / self._width[i])
            prev = self._prev[i]
            self._prev[i] = b
            if prev is None:
                continue
            pair = (prev, b)
            seen = self._seen[i]
            if pair not in seen:
                novel.append(int(i))
                if len(seen) < self.params.max_transitions:
                    seen.add(pair)
        return novel

    def update(self, x: np.ndarray) -> tuple[str, ...]:
        """Names of the metrics whose transition into this row is novel (none while learning)."""
        x = np.asarray(x, dtype=np.float64)
        self.n_rows += 1
        if self._learning is not None:
            self._learning.append(x.copy())
            if self.n_rows >= self.params.learn_rows:
                self._fix_grid()
            return ()
        return tuple(self.names[i] for i in self._observe(x))

    def state(self) -> dict:
        return {"learning": self.learning, "transitions": {n: len(s) for n, s in zip(self.names, self._seen)}}


class RestGate:
    """Reports 0 for ``rest_rows`` rows after a reported score >= ``threshold``."""

    def __init__(self, rest_rows: int, threshold: float):
        self.rest_rows = rest_rows
        self.threshold = threshold
        self._quiet = 0

    def update(self, score: float) -> float:
        if self._quiet > 0:
            self._quiet -= 1
            return 0.0
        if score >= self.threshold:
            self._quiet = self.rest_rows
        return score
