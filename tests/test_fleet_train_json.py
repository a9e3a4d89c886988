"""``edge-fleet train --json`` with an LSTM: stdout holds the JSON result and nothing else.

A real process (TensorFlow writes to file descriptor 1 from C++, which no
in-process capture sees), a real SQLite store, a real (tiny) LSTM.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.store import open_store
from tests.fleet_helpers import ingest, rows

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0


def test_train_json_stdout_is_only_the_result(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    with open_store(f"sqlite:///{tmp_path / 'fleet' / 'fleet.db'}") as store:
        ingest(store, "pi-01", rows(T0, 900, {"system.cpuUsage": (20, 3), "system.memoryPercent": (40, 2)}, 1), "a")
    conf = tmp_path / "fleet.toml"
    conf.write_text(f'[fleet]\nstate_dir = "{tmp_path / "fleet"}"\n'
                    '[train]\nmin_samples = 100\nn_estimators = 20\nlstm = true\nepochs = 2\nunits = 4\n'
                    'seq_len = 10\nhorizon = 3\nmax_eval_origins = 20\n'
                    'forecast_metrics = ["system.cpuUsage"]\n')
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "fleet.cli", "train", "--config", str(conf), "--device", "pi-01",
                           "--json", "--no-publish", "--since", str(T0 - 1)],
                          capture_output=True, text=True, env=env, cwd=str(REPO), timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)            # the whole of stdout is one JSON document
    assert result["version"] == 1 and not result["metrics"].get("lstm_skipped"), result
    assert result["metrics"].get("forecast_mase") is not None, result     # the LSTM was trained and scored
