"""The one place the device touches a TFLite interpreter.

tflite-runtime 2.14 is the last wheel for CPython 3.11 on ARM; ai-edge-litert is
its successor with the same API (numpy 2, no armv7l wheel). We try them in that
order and never import TensorFlow here: the daemon must run without it.

A model from the network is validated before use: the interpreter's input and
output shapes must equal what model.json declares (a stale or swapped artefact
fails loudly at load time, not with garbage forecasts). Models converted with a
stateful LSTM keep state in variable tensors between invokes, so
``reset_all_variables()`` runs before every invoke when the model says it is
stateful; our own LSTMs are stateless (the state is rebuilt from the window).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)


class InterpreterUnavailable(ImportError):
    """Neither tflite_runtime nor ai_edge_litert is installed."""


class ModelShapeError(ValueError):
    """The .tflite file does not match the shapes declared in model.json."""


def interpreter_class() -> type:
    """``tflite_runtime.interpreter.Interpreter``, else ``ai_edge_litert.interpreter.Interpreter``."""
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[import-not-found]
        return Interpreter
    except ImportError:
        pass
    try:
        from ai_edge_litert.interpreter import Interpreter  # type: ignore[import-not-found]
        return Interpreter
    except ImportError:
        raise InterpreterUnavailable("no TFLite interpreter: install tflite-runtime (or ai-edge-litert)") from None


def interpreter_name() -> str:
    cls = interpreter_class()
    return cls.__module__.split(".", 1)[0]


class TFLiteModel:
    """A loaded single-input, single-output TFLite model with checked shapes."""

    def __init__(self, model_path: str | Path | None = None, *, model_content: bytes | None = None,
                 input_shape: Sequence[int] | None = None, output_shape: Sequence[int] | None = None,
                 stateful: bool = False, num_threads: int = 1) -> None:
        if (model_path is None) == (model_content is None):
            raise ValueError("give exactly one of model_path or model_content")
        cls = interpreter_class()
        kwargs: dict[str, Any] = {"num_threads": num_threads}
        if model_path is not None:
            kwargs["model_path"] = str(model_path)
        else:
            kwargs["model_content"] = model_content
        try:
            self._interp = cls(**kwargs)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:  # unsupported op version, corrupt flatbuffer
            raise ModelShapeError(f"TFLite model does not load: {exc}") from exc
        inputs = self._interp.get_input_details()
        outputs = self._interp.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelShapeError(f"expected 1 input and 1 output, got {len(inputs)} and {len(outputs)}")
        self._in = inputs[0]
        self._out = outputs[0]
        self.input_shape = tuple(int(d) for d in self._in["shape"])
        self.output_shape = tuple(int(d) for d in self._out["shape"])
        self.input_dtype = self._in["dtype"]
        if input_shape is not None and tuple(input_shape) != self.input_shape:
            raise ModelShapeError(f"input shape {self.input_shape} != declared {tuple(input_shape)}")
        if output_shape is not None and tuple(output_shape) != self.output_shape:
            raise ModelShapeError(f"output shape {self.output_shape} != declared {tuple(output_shape)}")
        self.stateful = bool(stateful)
        self.invocations = 0

    def predict(self, x: np.ndarray) -> np.ndarray:
        """One invoke; ``x`` must already have the input shape (batch 1)."""
        x = np.asarray(x, dtype=self.input_dtype)
        if x.shape != self.input_shape:
            raise ModelShapeError(f"input {x.shape} != model input {self.input_shape}")
        if self.stateful:
            self._interp.reset_all_variables()
        self._interp.set_tensor(self._in["index"], x)
        self._interp.invoke()
        self.invocations += 1
        return np.array(self._interp.get_tensor(self._out["index"]), copy=True)
