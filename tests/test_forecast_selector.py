"""The selector switches on evidence, with hysteresis, and prefers a freshly installed LSTM."""
from __future__ import annotations

import numpy as np

from models.forecast.selector import ModelSelector, SelectorParams

P = SelectorParams(window=100, min_errors=20, margin=0.1)


def feed(sel: ModelSelector, errors: dict[str, float], n: int, rng: np.random.Generator) -> list[str]:
    chosen = []
    for _ in range(n):
        for name, scale in errors.items():
            sel.record(name, abs(rng.normal(0, scale)))
        chosen.append(sel.choose(list(errors)))
    return chosen


def test_preferred_model_takes_over_then_loses_to_a_better_fallback_and_wins_back():
    rng = np.random.default_rng(0)
    sel = ModelSelector(P, default="fallback")
    feed(sel, {"fallback": 1.0}, 50, rng)
    sel.set_preferred("lstm")
    assert sel.current == "lstm"                                   # installed: used at once
    chosen = feed(sel, {"fallback": 1.0, "lstm": 2.0}, 60, rng)
    assert chosen[0] == "lstm"                                     # no evidence yet
    assert chosen[-1] == "fallback"                                # worse recent error -> fallback
    chosen = feed(sel, {"fallback": 1.0, "lstm": 0.5}, 150, rng)
    assert chosen[-1] == "lstm"
    assert sel.switches >= 3


def test_no_flapping_between_equal_models():
    rng = np.random.default_rng(1)
    sel = ModelSelector(SelectorParams(), default="fallback")      # the defaults the device runs
    sel.set_preferred("lstm")
    before = sel.switches
    chosen = feed(sel, {"fallback": 1.0, "lstm": 1.0}, 3000, rng)
    assert sel.switches - before <= 2
    assert chosen.count(chosen[-1]) > 2000


def test_unavailable_current_model_falls_back_and_removal_restores_default():
    sel = ModelSelector(P, default="fallback")
    sel.set_preferred("lstm")
    assert sel.choose(["fallback"]) == "fallback"                  # LSTM has no window yet
    assert sel.choose(["fallback", "lstm"]) == "lstm"              # displaced only while unavailable
    sel.set_preferred(None)
    assert sel.current == "fallback" and sel.preferred is None
