"""The README's commands, run: every ``sh`` block of every section (tests/readme_doctest.py).

A section is one test, so a new command in the quick start or a walkthrough is covered
the day it is written; a block that cannot run here says so in the README
(``<!-- doctest: skip: REASON -->``) and names what covers it instead.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests import readme_doctest as doc

SECTIONS = doc.sections()
RUNNABLE = {name: bs for name, bs in SECTIONS.items() if any(not b.skipped for b in bs)}


def test_the_quick_start_and_the_walkthrough_are_run() -> None:
    assert {"Quick start", "Shipping a model"} <= set(RUNNABLE)


def test_a_skipped_block_says_why() -> None:
    for b in doc.blocks():
        if b.skipped:
            assert len(b.directive.partition(":")[2].strip()) > 10, f"README.md line {b.line}: skip needs a reason"
        else:
            assert b.directive in ("", "background"), f"README.md line {b.line}: unknown directive {b.directive!r}"


def test_make_targets_become_their_recipes() -> None:
    assert ".venv/bin/edge-agent run" in doc.make_recipe("run")
    script = doc.adapt("make run    # comment\nmake test\nsleep 120\nport = 1883\n", broker_port=40001)
    assert "make" not in script and ".venv/bin/edge-agent run" in script
    assert f"sleep {120 / doc.TIME_SCALE:g}" in script and "port = 40001" in script
    assert doc.adapt("sleep 1", 1) == "sleep 1"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("section", sorted(RUNNABLE))
def test_readme_section_runs(section: str, tmp_path: Path, mqtt_broker) -> None:
    result = doc.run_section(RUNNABLE[section], tmp_path, mqtt_broker.port)
    logs = "".join(f"\n--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
                   for p in sorted(tmp_path.rglob("*.log")))
    assert result.returncode == 0, (f"README section {section!r} failed (exit {result.returncode})\n"
                                    f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n"
                                    f"{result.stderr[-4000:]}{logs}")
