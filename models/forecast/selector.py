"""Pick the forecaster to publish from the recent out-of-sample error of each.

Every candidate forecasts at every step (they are cheap), and each matured
(origin, step) pair adds |actual - forecast| to that candidate's rolling window,
so all candidates are judged on the same origins. The rule:

- ``preferred`` (the LSTM once one is installed) is used as soon as it can
  forecast - it was validated before shipping - and until evidence says
  otherwise (a model that cannot forecast yet, e.g. an LSTM waiting for a full
  input window, is replaced for that time only);
- a challenger replaces the current choice when both have at least
  ``min_errors`` errors in the window and the challenger's mean absolute error
  is lower by more than ``margin`` (relative), which avoids flapping between two
  models of equal skill; the preferred model wins back the same way.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Iterable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectorParams:
    window: int = 600          # matured (origin, step) errors per candidate (50 origins x 12 steps)
    min_errors: int = 120      # before a switch is considered
    margin: float = 0.1        # relative MAE improvement needed to switch


class RollingError:
    """Rolling mean absolute error with O(1) updates."""

    def __init__(self, window: int) -> None:
        self._q: deque[float] = deque(maxlen=window)
        self._sum = 0.0
        self._updates = 0

    def add(self, abs_err: float) -> None:
        if len(self._q) == self._q.maxlen:
            self._sum -= self._q[0]
        self._q.append(abs_err)
        self._sum += abs_err
        self._updates += 1
        if self._updates % 10_000 == 0:      # bound float drift of the running sum
            self._sum = math.fsum(self._q)

    @property
    def count(self) -> int:
        return len(self._q)

    @property
    def mae(self) -> float:
        return self._sum / len(self._q) if self._q else math.nan


class ModelSelector:
    """Tracks rolling MAE per candidate and names the one to publish."""

    def __init__(self, params: SelectorParams = SelectorParams(), default: str = "fallback") -> None:
        self.params = params
        self.default = default
        self.preferred: str | None = None
        self.current = default
        self.errors: dict[str, RollingError] = {}
        self.switches = 0
        self._wanted: str | None = None     # the choice displaced only because it could not forecast

    def set_preferred(self, name: str | None) -> None:
        """A new preferred model (e.g. an LSTM just installed) takes over at once."""
        self.preferred = name
        self._wanted = None
        if name is not None:
            self.errors.pop(name, None)        # a new model starts with a clean record
            self._switch(name, "preferred model installed")
        elif self.current not in (self.default,):
            self._switch(self.default, "preferred model removed")

    def record(self, name: str, abs_err: float) -> None:
        if math.isfinite(abs_err):
            self.errors.setdefault(name, RollingError(self.params.window)).add(abs_err)

    def record_many(self, name: str, abs_errs) -> None:
        for e in abs_errs:
            self.record(name, float(e))

    def choose(self, available: Iterable[str]) -> str:
        """Current choice among ``available`` candidate names (re-evaluated on each call)."""
        avail = [a for a in available]
        if not avail:
            return self.current
        if self._wanted is not None and self._wanted in avail:
            # e.g. an LSTM that was waiting for a full input window: it gets its turn now
            self._switch(self._wanted, "model available again")
            self._wanted = None
        if self.current not in avail:
            self._wanted = self.current
            if self.preferred in avail:
                fallback = self.preferred
            else:
                fallback = self.default if self.default in avail else avail[0]
            self._switch(fallback, "current model unavailable")
        cur = self.errors.get(self.current)
        if cur is None or cur.count < self.params.min_errors:
            return self.current
        best, best_mae = self.current, cur.mae
        for name in avail:
            e = self.errors.get(name)
            if name == self.current or e is None or e.count < self.params.min_errors:
                continue
            if e.mae < best_mae * (1.0 - self.params.margin):
                best, best_mae = name, e.mae
        if best != self.current:
            self._switch(best, f"rolling MAE {best_mae:.4g} < {cur.mae:.4g}")
        return self.current

    def _switch(self, name: str, why: str) -> None:
        if name != self.current:
            log.info("forecast model %s -> %s (%s)", self.current, name, why)
            self.current = name
            self.switches += 1

    def summary(self) -> dict:
        return {"current": self.current, "preferred": self.preferred, "switches": self.switches,
                "mae": {k: (None if math.isnan(v.mae) else v.mae) for k, v in self.errors.items()},
                "n": {k: v.count for k, v in self.errors.items()}}
