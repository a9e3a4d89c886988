"""On-device LSTM training is refused, with the reason, when the device lacks the memory TensorFlow needs."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.training import LSTM_TRAIN_MEMORY_BYTES, TrainingError, check_training_memory, train_forecaster

MIB = 1024 * 1024


def test_the_guard_refuses_below_the_measured_need_and_names_the_way_out() -> None:
    check_training_memory(LSTM_TRAIN_MEMORY_BYTES)                    # exactly enough: allowed
    with pytest.raises(TrainingError) as info:
        check_training_memory(300 * MIB)                              # a 1 GB Pi beside the daemon
    message = str(info.value)
    assert "300 MiB is available" in message and "edge-fleet train" in message
    assert f"{LSTM_TRAIN_MEMORY_BYTES // MIB} MiB" in message


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="training extra not installed")
def test_train_forecaster_stops_before_importing_tensorflow(tmp_path: Path) -> None:
    """Run in a fresh interpreter so sys.modules shows what the refused attempt imported."""
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text(f'[agent]\ndevice_id = "t"\nstate_dir = "{tmp_path}/state"\n[mqtt]\nenabled = false\n')
    script = (
        "import sys\n"
        "from agent import config\n"
        "from agent.training import TrainingError, train_forecaster\n"
        f"cfg = config.load({str(cfg_path)!r})\n"
        "try:\n"
        "    train_forecaster(cfg, available_bytes=lambda: 300 * 1024 * 1024)\n"
        "except TrainingError as exc:\n"
        "    print('refused:', exc)\n"
        "print('tensorflow imported:', 'tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "refused: on-device LSTM training needs" in out.stdout
    assert "tensorflow imported: False" in out.stdout
    assert not (tmp_path / "state" / "models").exists()               # nothing installed, nothing lost


def test_enough_memory_passes_the_guard_and_reaches_the_history_check(tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("training extra not installed")
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text(f'[agent]\ndevice_id = "t"\nstate_dir = "{tmp_path}/state"\n[mqtt]\nenabled = false\n')
    cfg = config_mod.load(str(cfg_path))
    with pytest.raises(TrainingError, match="no forecast metric with enough history"):
        train_forecaster(cfg, available_bytes=lambda: 4096 * MIB)    # an empty database, plenty of memory
