"""Train the LSTM forecaster with Keras and export it for the device's TFLite interpreter.

Only training commands import this module; TensorFlow is imported lazily inside
the functions (after the TFLite interpreter: when both live in one process the
interpreter must be imported first, otherwise its shared library clashes with
TensorFlow's copy). The device side is models.forecast.lstm, which also owns the
window encoding used here, so training and inference cannot drift apart.

Pipeline:
1. rows of sample dicts or a CSV export -> bucket means over ``step_s``
   (exactly what the device's ForecastEngine sees), forward-filled;
2. windows of ``seq_len`` steps -> the next ``horizon`` changes from the last
   value, scaled (models.forecast.lstm docstring); split in time order into
   train / validation (early stopping) / calibration (never seen while
   training: interval residuals and the reported validation scores), with
   ``horizon`` windows dropped at each boundary so no target leaks across;
3. a small Keras LSTM (one layer, ``units`` cells, MAE loss - the metric the
   selector and MASE use), Adam, early stopping that restores the best weights;
4. the weights are copied into an identical model built with
   ``keras.Input(shape=(seq_len, n), batch_size=1)`` - a fixed batch of 1 is
   what the device runs, and LSTM conversion with a dynamic batch fails - and
   converted to TFLite;
5. the converted model is run in the device interpreter on calibration windows
   and must match Keras (float32: max |diff| <= 1e-3 in scaled units). Optional
   float16 / int8 (dynamic-range) quantisation is kept only if it loads in the
   device interpreter and stays within ``quant_tolerance`` of Keras; otherwise
   the float32 model ships and model.json says why (tflite-runtime 2.14, for
   instance, has no kernel for the int8 FULLY_CONNECTED version TF 2.21 emits);
6. calibration residuals (device interpreter forecasts vs actuals, metric units)
   go into model.json so the device has honest intervals from the first step;
7. forecaster.tflite + model.json are written to a temp directory, fsynced and
   renamed into place (atomic: the daemon never sees half a model).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from models.forecast.lstm import (FORMAT_VERSION, META_FILE, MODEL_FILE, decode_output, relative_inputs,
                                  validate_meta)
from models.forecast.series import (TIME_FEATURES, ffill, infer_step_s, read_csv_columns, resample_mean,
                                    rows_to_columns, time_features)
from models.forecast.tflite_loader import ModelShapeError, TFLiteModel, interpreter_class
from models.atomic import write_dir_atomic

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "float16", "int8")


@dataclass(frozen=True)
class LSTMParams:
    seq_len: int = 50
    horizon: int = 12
    units: int = 32
    epochs: int = 30
    batch_size: int = 64
    patience: int = 4
    learning_rate: float = 3e-3
    val_fraction: float = 0.15
    calib_fraction: float = 0.15
    time_features: bool = True
    max_windows: int = 20000          # training windows are subsampled beyond this (CPU time)
    quantization: str = "none"        # none | float16 | int8 (dynamic range)
    quant_tolerance: float = 0.05     # max |tflite - keras| in scaled units for a quantised model
    calib_keep: int = 500             # calibration residual rows kept in model.json
    unroll: bool = False
    input_mode: str = "relative"      # relative | absolute (models.forecast.lstm.relative_inputs)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.input_mode not in ("relative", "absolute"):
            raise ValueError("input_mode must be relative or absolute")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}")
        if self.seq_len < 2 or self.horizon < 1 or self.units < 1:
            raise ValueError("seq_len >= 2, horizon >= 1, units >= 1 required")
        if not 0 < self.val_fraction < 0.5 or not 0 < self.calib_fraction < 0.5:
            raise ValueError("val_fraction and calib_fraction must be in (0, 0.5)")


class NotEnoughHistory(ValueError):
    pass


class ConversionMismatch(RuntimeError):
    """The float32 TFLite model disagrees with Keras: never ship it."""


def _import_tf():
    """TFLite interpreter first, then TensorFlow (see module docstring)."""
    interpreter_class()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # noqa: WPS433 - training-only dependency
    import keras
    return tf, keras


# -- data ----------------------------------------------------------------------------------------
def prepare_series(ts_s: np.ndarray, X: np.ndarray, step_s: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Raw samples -> (step timestamps, step values, step_s) the way the device aggregates them."""
    ts_s = np.asarray(ts_s, dtype=np.float64)
    order = np.argsort(ts_s, kind="stable")
    ts_s, X = ts_s[order], np.asarray(X, dtype=np.float64)[order]
    native = infer_step_s(ts_s)
    if step_s is None or step_s <= 0 or abs(step_s - native) <= 0.01 * native:
        # already one row per step (a CSV at the forecasting step): keep rows as they are
        return ts_s, ffill(X), native if (step_s is None or step_s <= 0) else float(step_s)
    t, Y = resample_mean(ts_s, X, step_s)
    return t, Y, float(step_s)


def make_windows(Xn: np.ndarray, y: np.ndarray, target_scale: np.ndarray, seq_len: int,
                 horizon: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encoded inputs (n, f) + raw targets (n, t) -> (inputs (w, seq_len, f), scaled deltas (w, h, t),
    origin row index (w,))."""
    n = len(Xn)
    origins = np.arange(seq_len - 1, n - horizon)
    if len(origins) == 0:
        return (np.zeros((0, seq_len, Xn.shape[1]), np.float32), np.zeros((0, horizon, y.shape[1]), np.float32),
                origins)
    win = sliding_window_view(Xn, seq_len, axis=0)            # (n - seq_len + 1, f, seq_len)
    inputs = np.transpose(win[origins - seq_len + 1], (0, 2, 1))
    fut = sliding_window_view(y, horizon, axis=0)            # (n - h + 1, t, h)
    future = np.transpose(fut[origins + 1], (0, 2, 1))        # y[t+1 .. t+h]
    deltas = (future - y[origins][:, None, :]) / target_scale[None, None, :]
    return inputs.astype(np.float32), deltas.astype(np.float32), origins


def _scaler(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    center = np.nanmean(X, axis=0)
    scale = np.nanstd(X, axis=0)
    floor = 1e-6 * (1.0 + np.abs(center))
    return center, np.where(np.isfinite(scale) & (scale > floor), scale, np.maximum(floor, 1e-6))


def _split(n: int, params: LSTMParams) -> tuple[slice, slice, slice]:
    n_cal = max(1, int(n * params.calib_fraction))
    n_val = max(1, int(n * params.val_fraction))
    gap = params.horizon
    tr_end = n - n_cal - n_val - 2 * gap
    if tr_end < 10:
        raise NotEnoughHistory(f"{n} windows are too few to split into train/validation/calibration")
    return slice(0, tr_end), slice(tr_end + gap, tr_end + gap + n_val), slice(n - n_cal, n)


# -- model ---------------------------------------------------------------------------------------
def build_model(keras, seq_len: int, n_inputs: int, horizon: int, n_targets: int, units: int,
                batch_size: int | None, unroll: bool = False):
    inp = keras.Input(shape=(seq_len, n_inputs), batch_size=batch_size)
    x = keras.layers.LSTM(units, unroll=unroll)(inp)
    x = keras.layers.Dense(horizon * n_targets)(x)
    out = keras.layers.Reshape((horizon, n_targets))(x)
    return keras.Model(inp, out)


def convert_to_tflite(tf, model, quantization: str = "none") -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]   # dynamic-range int8 weights
    return converter.convert()


def tflite_outputs(content: bytes, inputs: np.ndarray, input_shape, output_shape) -> np.ndarray:
    """Run the device interpreter window by window (batch 1, as on the device)."""
    model = TFLiteModel(model_content=content, input_shape=input_shape, output_shape=output_shape)
    return np.concatenate([model.predict(inputs[i:i + 1]) for i in range(len(inputs))], axis=0)


def write_lstm_dir(out_dir: str | Path, tflite_bytes: bytes, meta: dict, replace: bool = False) -> Path:
    """forecaster.tflite + model.json into a temp dir, fsync, rename into place."""
    validate_meta(meta)
    return write_dir_atomic(out_dir, {MODEL_FILE: tflite_bytes,
                                      META_FILE: json.dumps(meta, indent=1, sort_keys=True).encode("utf-8")},
                            replace=replace)


# -- training ------------------------------------------------------------------------------------
def _quantise(tf, infer_model, params: LSTMParams, ref_out: np.ndarray, probe: np.ndarray,
              shapes: tuple, float_content: bytes) -> tuple[bytes | None, dict]:
    info = {"requested": params.quantization, "applied": "none", "max_abs_diff": None, "reason": ""}
    try:
        content = convert_to_tflite(tf, infer_model, params.quantization)
    except Exception as exc:  # noqa: BLE001 - the converter raises many unrelated types
        info["reason"] = f"conversion failed: {exc}"
        return None, info
    if len(content) >= len(float_content):
        # the converter skips tensors below ~1k elements: a tiny model comes back unquantised
        info["reason"] = f"no smaller than float32 ({len(content)} >= {len(float_content)} bytes)"
        return None, info
    try:
        out = tflite_outputs(content, probe, *shapes)
    except ModelShapeError as exc:
        info["reason"] = f"does not load in the device interpreter: {exc}".splitlines()[0]
        return None, info
    diff = float(np.max(np.abs(out - ref_out)))
    info["max_abs_diff"] = diff
    if diff > params.quant_tolerance:
        info["reason"] = f"max |diff| {diff:.4g} > quant_tolerance {params.quant_tolerance}"
        return None, info
    info["applied"] = params.quantization
    info["size_bytes"] = len(content)
    info["float32_size_bytes"] = len(float_content)
    return content, info


def train_lstm(ts_s: np.ndarray, X: np.ndarray, metrics: Sequence[str], out_dir: str | Path, version: int,
               params: LSTMParams = LSTMParams(), step_s: float | None = None,
               targets: Sequence[str] | None = None, replace: bool = False,
               extra_meta: Mapping | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Samples (ts_s (n,), X (n, len(metrics))) -> model directory; returns model.json's content;
    ``progress(epoch, epochs)`` is told after every training epoch."""
    t0 = time.monotonic()
    metrics = list(metrics)
    targets = list(targets) if targets is not None else list(metrics)
    ts, Y, step = prepare_series(ts_s, X, step_s)
    ok = np.isfinite(Y).all(axis=1)
    first = int(np.argmax(ok)) if ok.any() else len(Y)
    ts, Y = ts[first:], ffill(Y[first:])
    inputs = metrics + (list(TIME_FEATURES) if params.time_features else [])
    feats = np.concatenate([Y, time_features(ts)], axis=1) if params.time_features else Y
    y_t = Y[:, [metrics.index(t) for t in targets]]
    n_win = len(Y) - params.seq_len - params.horizon + 1
    if n_win < 50:
        raise NotEnoughHistory(f"{len(Y)} steps give {max(n_win, 0)} windows; need >= 50 "
                               f"(seq_len {params.seq_len} + horizon {params.horizon} + 50 steps)")
    tr_rows = slice(0, int(len(Y) * (1 - params.val_fraction - params.calib_fraction)))
    center, scale = _scaler(feats[tr_rows])
    if params.time_features:     # sin/cos are already in [-1, 1]: keep them as they are
        center[len(metrics):], scale[len(metrics):] = 0.0, 1.0
    Xn = (feats - center) / scale
    t_scale = np.array([scale[metrics.index(t)] for t in targets])
    W, D, origins = make_windows(Xn, y_t, t_scale, params.seq_len, params.horizon)
    W = relative_inputs(W, {"inputs": inputs, "input_mode": params.input_mode})
    s_tr, s_val, s_cal = _split(len(W), params)
    rng = np.random.default_rng(params.seed)
    tr_idx = np.arange(s_tr.start, s_tr.stop)
    if len(tr_idx) > params.max_windows:
        tr_idx = np.sort(rng.choice(tr_idx, params.max_windows, replace=False))

    tf, keras = _import_tf()
    keras.utils.set_random_seed(params.seed)
    n_in, n_out = Xn.shape[1], len(targets)
    model = build_model(keras, params.seq_len, n_in, params.horizon, n_out, params.units, None, params.unroll)
    model.compile(optimizer=keras.optimizers.Adam(params.learning_rate), loss="mae")
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=params.patience, restore_best_weights=True)
    callbacks = [stop]
    if progress is not None:
        callbacks.append(keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: progress(epoch + 1, params.epochs)))
    hist = model.fit(W[tr_idx], D[tr_idx], validation_data=(W[s_val], D[s_val]), epochs=params.epochs,
                     batch_size=params.batch_size, callbacks=callbacks, verbose=0, shuffle=True)
    epochs_run = len(hist.history["loss"])

    infer = build_model(keras, params.seq_len, n_in, params.horizon, n_out, params.units, 1, params.unroll)
    infer.set_weights(model.get_weights())
    in_shape, out_shape = [1, params.seq_len, n_in], [1, params.horizon, n_out]
    cal_idx = np.arange(s_cal.start, s_cal.stop)[-params.calib_keep:]
    probe = W[cal_idx[-64:]]
    ref = model.predict(probe, verbose=0, batch_size=64)
    content = convert_to_tflite(tf, infer, "none")
    out = tflite_outputs(content, probe, in_shape, out_shape)
    f32_diff = float(np.max(np.abs(out - ref)))
    if f32_diff > 1e-3:
        raise ConversionMismatch(f"TFLite float32 output differs from Keras by {f32_diff:.3g}")
    quant = {"requested": "none", "applied": "none", "max_abs_diff": f32_diff, "reason": ""}
    if params.quantization != "none":
        q_content, quant = _quantise(tf, infer, params, ref, probe, (in_shape, out_shape), content)
        if q_content is not None:
            content = q_content
        else:
            log.warning("quantisation %s not applied: %s; shipping float32", params.quantization, quant["reason"])

    # calibration residuals from the artefact that ships, run by the device interpreter
    meta = {
        "kind": "lstm", "format_version": FORMAT_VERSION, "artefact": MODEL_FILE, "version": int(version),
        "metrics": targets, "inputs": inputs, "targets": targets, "seq_len": params.seq_len,
        "horizon": params.horizon, "step_s": step, "target_mode": "delta", "input_mode": params.input_mode,
        "scaler": {"center": [float(v) for v in center], "scale": [float(v) for v in scale]},
        "input_shape": in_shape, "output_shape": out_shape, "stateful": False,
    }
    raw_out = tflite_outputs(content, W[cal_idx], in_shape, out_shape)
    last = y_t[origins[cal_idx]]
    fc = np.stack([decode_output(raw_out[i:i + 1], last[i], meta) for i in range(len(cal_idx))])  # (w, h, t)
    fut = np.stack([y_t[origins[cal_idx] + k] for k in range(1, params.horizon + 1)], axis=1)      # (w, h, t)
    resid = fut - fc
    val = {"mae": {}, "naive_mae": {}, "n_windows": int(len(cal_idx))}
    for j, t in enumerate(targets):
        val["mae"][t] = float(np.mean(np.abs(resid[:, :, j])))
        val["naive_mae"][t] = float(np.mean(np.abs(fut[:, :, j] - last[:, None, j])))
    meta.update({
        "quantization": quant,
        "calibration": {"residuals": {t: np.round(resid[:, :, j], 6).tolist() for j, t in enumerate(targets)}},
        "validation": val,
        "training": {"epochs_run": epochs_run, "best_val_loss": float(min(hist.history["val_loss"])),
                     "n_train_windows": int(len(tr_idx)), "n_val_windows": int(s_val.stop - s_val.start),
                     "seconds": round(time.monotonic() - t0, 2)},
        "params": asdict(params),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "n_windows": int(len(W)),
        "data": {"first_ts_s": float(ts[0]), "last_ts_s": float(ts[-1]), "n_steps": int(len(ts))},
    })
    if extra_meta:
        meta.update(dict(extra_meta))
    write_lstm_dir(out_dir, content, meta, replace=replace)
    log.info("trained LSTM v%d (%s) on %d windows in %.1fs, %d epochs, val MAE %s vs naive %s -> %s",
             version, ",".join(targets), len(tr_idx), time.monotonic() - t0, epochs_run,
             {k: round(v, 4) for k, v in val["mae"].items()}, {k: round(v, 4) for k, v in val["naive_mae"].items()},
             out_dir)
    return meta


def train_lstm_from_rows(rows: Iterable[tuple[float, Mapping[str, float]] | Mapping[str, float]],
                         metrics: Sequence[str], out_dir: str | Path, version: int,
                         params: LSTMParams = LSTMParams(), step_s: float | None = None, replace: bool = False,
                         progress: Callable[[int, int], None] | None = None) -> dict:
    """(ts_s, values) tuples (store.samples()) or dicts with ``ts_s`` -> model directory."""
    ts, X = rows_to_columns(rows, metrics)
    return train_lstm(ts, X, metrics, out_dir, version, params, step_s=step_s, replace=replace, progress=progress)


def train_lstm_from_csv(path: str | Path, metrics: Sequence[str], out_dir: str | Path, version: int,
                        params: LSTMParams = LSTMParams(), step_s: float | None = None, replace: bool = False) -> dict:
    """A CSV export (``timestamp`` + metric columns, e.g. ``edge-agent export``) -> model directory."""
    ts, cols = read_csv_columns(path, metrics)
    X = np.stack([cols[m] for m in metrics], axis=1)
    return train_lstm(ts, X, metrics, out_dir, version, params, step_s=step_s, replace=replace)
