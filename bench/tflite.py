"""One LSTM forecast through the device's TFLite interpreter vs Keras ``model.predict``, same run.

    .venv/bin/python bench/tflite.py [--units 32] [--seq-len 50] [--inputs 3] [--repeat 2000]

Prints: median latency of a single-window forecast in Keras predict, a direct
Keras call and the TFLite interpreter (batch 1, one thread), the ratio
(target: TFLite >= 300x faster than Keras predict), the .tflite sizes (float32,
float16), and the RSS of a fresh subprocess that imports only numpy and the
interpreter, loads the model and runs it (what the daemon pays).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from models.forecast.tflite_loader import TFLiteModel, interpreter_name  # noqa: E402  (before TensorFlow)

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
def rss():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out
import numpy as np
base = rss()
from models.forecast.tflite_loader import TFLiteModel
m = TFLiteModel(sys.argv[2])
x = np.zeros(m.input_shape, dtype=np.float32)
for _ in range(200):
    m.predict(x)
after = rss()
print(json.dumps({"numpy_only": base, "with_model": after,
                  "tensorflow_imported": "tensorflow" in sys.modules,
                  "modules": sorted(k for k in ("tflite_runtime", "ai_edge_litert", "keras") if k in sys.modules)}))
"""


def median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--inputs", type=int, default=3, help="input columns (1 metric + 2 time-of-day)")
    ap.add_argument("--horizon", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=2000)
    args = ap.parse_args(argv)

    from models.training.lstm import _import_tf, build_model, convert_to_tflite
    tf, keras = _import_tf()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(256, args.seq_len, args.inputs)).astype(np.float32)
    Y = rng.normal(size=(256, args.horizon, 1)).astype(np.float32)
    model = build_model(keras, args.seq_len, args.inputs, args.horizon, 1, args.units, None)
    model.compile(optimizer="adam", loss="mae")
    model.fit(X, Y, epochs=1, batch_size=64, verbose=0)
    infer = build_model(keras, args.seq_len, args.inputs, args.horizon, 1, args.units, 1)
    infer.set_weights(model.get_weights())
    f32 = convert_to_tflite(tf, infer, "none")
    f16 = convert_to_tflite(tf, infer, "float16")
    x = X[:1]
    device = TFLiteModel(model_content=f32, input_shape=(1, args.seq_len, args.inputs),
                         output_shape=(1, args.horizon, 1))
    assert np.allclose(device.predict(x), infer.predict(x, verbose=0), atol=1e-4)

    for _ in range(5):                      # warm up graph tracing / allocation
        infer.predict(x, verbose=0)
        infer(x, training=False)
        device.predict(x)
    keras_predict = median_s(lambda: infer.predict(x, verbose=0), 50)
    keras_call = median_s(lambda: infer(x, training=False), 200)
    tflite = median_s(lambda: device.predict(x), args.repeat)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "forecaster.tflite"
        path.write_bytes(f32)
        out = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(path)], capture_output=True, text=True,
                             check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        child = json.loads(out.stdout.strip().splitlines()[-1])

    mib = 1024 * 1024
    print(f"interpreter: {interpreter_name()} (1 thread); model LSTM({args.units}) seq_len {args.seq_len} "
          f"x {args.inputs} inputs -> {args.horizon} steps")
    print(f"keras model.predict (1 window): {keras_predict * 1e3:8.3f} ms")
    print(f"keras model(x) direct call:     {keras_call * 1e3:8.3f} ms")
    print(f"tflite invoke (1 window):       {tflite * 1e3:8.3f} ms")
    print(f"speed-up vs predict: {keras_predict / tflite:7.0f}x  (target >= 300x)   vs direct call: "
          f"{keras_call / tflite:5.0f}x")
    print(f"model size: float32 {len(f32) / 1024:.1f} KiB, float16 {len(f16) / 1024:.1f} KiB")
    print(f"subprocess RSS: numpy only {child['numpy_only']['VmRSS'] / mib:.1f} MiB -> numpy + interpreter + "
          f"model after 200 invokes {child['with_model']['VmRSS'] / mib:.1f} MiB (peak "
          f"{child['with_model']['VmHWM'] / mib:.1f} MiB); tensorflow imported: {child['tensorflow_imported']}; "
          f"modules: {child['modules']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
