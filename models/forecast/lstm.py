"""Device side of the LSTM forecaster: model.json + forecaster.tflite -> forecasts.

The artefact directory (written by models.training.lstm) holds:

    forecaster.tflite   batch-1 Keras LSTM converted to TFLite
    model.json          {"kind": "lstm", "format_version": 1, "version", "metrics" (= targets),
                         "inputs" (metric names, then "time:tod_sin", "time:tod_cos" if used),
                         "targets", "seq_len", "horizon", "step_s", "scaler": {"center", "scale"}
                         (one per input), "target_mode": "delta", "input_mode": "relative",
                         "input_shape", "output_shape",
                         "stateful", "quantization", "calibration": {"residuals": {metric: [[h]...]}},
                         "validation", "trained_at", "n_windows", "params"}

Encoding (shared with training, so both sides can never drift apart):
inputs are (x - center) / scale per input column over the last ``seq_len``
steps, and with input_mode "relative" the metric columns then have the window's
last value subtracted (time-of-day columns stay as they are). The network
predicts, per step k and target, (y[t+k] - y[t]) / scale - the change from the
last value, which makes "no change" (the naive forecast) the zero output and
lets a small network spend its capacity on the deviations.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from models.forecast.series import TIME_FEATURES, time_features
from models.forecast.tflite_loader import ModelShapeError, TFLiteModel

log = logging.getLogger(__name__)

MODEL_FILE = "forecaster.tflite"
META_FILE = "model.json"
FORMAT_VERSION = 1


class InvalidModel(ValueError):
    """model.json is missing, of another kind, or inconsistent with itself or the .tflite."""


def validate_meta(meta: dict) -> None:
    """Self-consistency of model.json; raises InvalidModel naming the first problem."""
    if meta.get("kind") != "lstm":
        raise InvalidModel(f"model kind {meta.get('kind')!r} is not 'lstm'")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise InvalidModel(f"format_version {meta.get('format_version')} is newer than {FORMAT_VERSION}")
    try:
        inputs, targets = list(meta["inputs"]), list(meta["targets"])
        seq_len, horizon = int(meta["seq_len"]), int(meta["horizon"])
        center, scale = meta["scaler"]["center"], meta["scaler"]["scale"]
        in_shape, out_shape = list(meta["input_shape"]), list(meta["output_shape"])
        float(meta["step_s"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidModel(f"model.json lacks or mangles {exc}") from exc
    if in_shape != [1, seq_len, len(inputs)]:
        raise InvalidModel(f"input_shape {in_shape} != [1, seq_len, n_inputs] = {[1, seq_len, len(inputs)]}")
    if out_shape != [1, horizon, len(targets)]:
        raise InvalidModel(f"output_shape {out_shape} != [1, horizon, n_targets] = {[1, horizon, len(targets)]}")
    if len(center) != len(inputs) or len(scale) != len(inputs) or min(scale) <= 0:
        raise InvalidModel("scaler must have one center and one positive scale per input")
    missing = [t for t in targets if t not in inputs]
    if missing:
        raise InvalidModel(f"targets {missing} are not inputs")
    if meta.get("target_mode", "delta") != "delta":
        raise InvalidModel(f"unknown target_mode {meta.get('target_mode')!r}")
    if meta.get("input_mode", "absolute") not in ("absolute", "relative"):
        raise InvalidModel(f"unknown input_mode {meta.get('input_mode')!r}")


def metric_inputs(meta: dict) -> list[str]:
    return [c for c in meta["inputs"] if c not in TIME_FEATURES]


def encode_window(window: np.ndarray, window_ts_s: np.ndarray, meta: dict) -> np.ndarray:
    """(seq_len, n_metric_inputs) raw values + their step timestamps -> (1, seq_len, n_inputs) float32."""
    window = np.asarray(window, dtype=np.float64)
    cols = []
    mi = 0
    tf_cols = time_features(window_ts_s)
    for name in meta["inputs"]:
        if name in TIME_FEATURES:
            cols.append(tf_cols[:, TIME_FEATURES.index(name)])
        else:
            cols.append(window[:, mi])
            mi += 1
    x = np.stack(cols, axis=1)
    x = (x - np.asarray(meta["scaler"]["center"])) / np.asarray(meta["scaler"]["scale"])
    return relative_inputs(x[None, :, :], meta).astype(np.float32)


def relative_mask(meta: dict) -> np.ndarray:
    """Input columns encoded relative to the window's last value ("relative" input_mode)."""
    if meta.get("input_mode", "absolute") != "relative":
        return np.zeros(len(meta["inputs"]), dtype=bool)
    return np.array([c not in TIME_FEATURES for c in meta["inputs"]])


def relative_inputs(x: np.ndarray, meta: dict) -> np.ndarray:
    """(w, seq_len, n) scaled windows -> metric columns minus their last value (in place safe copy).

    Why: with absolute levels a level shift after training puts every input
    outside the training range and the network extrapolates wildly; relative
    windows make the LSTM translation invariant (the last value is the anchor
    of the delta targets anyway)."""
    mask = relative_mask(meta)
    if not mask.any():
        return x
    x = np.array(x, copy=True)
    x[:, :, mask] -= x[:, -1:, mask]
    return x


def target_scale(meta: dict) -> np.ndarray:
    inputs = list(meta["inputs"])
    scale = np.asarray(meta["scaler"]["scale"], dtype=np.float64)
    return np.array([scale[inputs.index(t)] for t in meta["targets"]])


def decode_output(out: np.ndarray, last_values: np.ndarray, meta: dict) -> np.ndarray:
    """(1, horizon, n_targets) network output -> (horizon, n_targets) forecasts in metric units."""
    out = np.asarray(out, dtype=np.float64).reshape(int(meta["horizon"]), len(meta["targets"]))
    return np.asarray(last_values, dtype=np.float64)[None, :] + out * target_scale(meta)[None, :]


class LSTMForecaster:
    """A validated TFLite LSTM plus its encoding; ``predict`` returns forecasts in metric units."""

    def __init__(self, meta: dict, model: TFLiteModel, path: Path | None = None) -> None:
        validate_meta(meta)
        if model.input_shape != tuple(meta["input_shape"]) or model.output_shape != tuple(meta["output_shape"]):
            raise InvalidModel(f"tflite shapes {model.input_shape}->{model.output_shape} != model.json "
                               f"{meta['input_shape']}->{meta['output_shape']}")
        self.meta = meta
        self.model = model
        self.path = path
        self.inputs = metric_inputs(meta)
        self.targets = list(meta["targets"])
        self.seq_len = int(meta["seq_len"])
        self.horizon = int(meta["horizon"])
        self.step_s = float(meta["step_s"])
        self.version = int(meta.get("version", 0))
        self._target_idx = [self.inputs.index(t) for t in self.targets]

    @classmethod
    def from_dir(cls, path: str | Path, num_threads: int = 1) -> "LSTMForecaster":
        path = Path(path)
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidModel(f"{path / META_FILE}: {exc}") from exc
        validate_meta(meta)
        try:
            model = TFLiteModel(path / meta.get("artefact", MODEL_FILE), input_shape=meta["input_shape"],
                                output_shape=meta["output_shape"], stateful=bool(meta.get("stateful", False)),
                                num_threads=num_threads)
        except ModelShapeError as exc:
            raise InvalidModel(str(exc)) from exc
        log.info("loaded LSTM forecaster v%s (%s, seq_len %d, horizon %d) from %s", meta.get("version"),
                 ",".join(meta["targets"]), meta["seq_len"], meta["horizon"], path)
        return cls(meta, model, path)

    def predict(self, window: np.ndarray, window_ts_s: np.ndarray) -> np.ndarray:
        """Last ``seq_len`` steps of the metric inputs (oldest first) -> (horizon, n_targets)."""
        window = np.asarray(window, dtype=np.float64)
        if window.shape != (self.seq_len, len(self.inputs)):
            raise ValueError(f"window {window.shape} != ({self.seq_len}, {len(self.inputs)})")
        x = encode_window(window, window_ts_s, self.meta)
        out = self.model.predict(x)
        return decode_output(out, window[-1, self._target_idx], self.meta)

    def calibration_residuals(self, metric: str) -> np.ndarray:
        """(n, horizon) held-out residuals saved at training time; empty when absent."""
        res = (self.meta.get("calibration") or {}).get("residuals", {}).get(metric)
        if not res:
            return np.zeros((0, self.horizon))
        arr = np.asarray(res, dtype=np.float64)
        return arr if arr.ndim == 2 and arr.shape[1] == self.horizon else np.zeros((0, self.horizon))

    def describe(self) -> dict:
        return {"kind": "lstm", "version": self.version, "metrics": self.targets, "seq_len": self.seq_len,
                "horizon": self.horizon, "step_s": self.step_s, "path": str(self.path) if self.path else None,
                "quantization": (self.meta.get("quantization") or {}).get("applied", "none")}
