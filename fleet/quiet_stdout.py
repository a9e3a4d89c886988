"""Keep a command's stdout for its result while library code that prints runs.

TensorFlow writes to file descriptor 1 from C++ (oneDNN and CUDA notices) and
Keras prints progress bars through ``sys.stdout``; ``edge-fleet train --json``
must print one JSON document and nothing else. Inside ``stdout_to_stderr()``
both the descriptor and ``sys.stdout`` point at stderr, and TensorFlow's own
C++ log level is raised (``TF_CPP_MIN_LOG_LEVEL=2``: warnings and errors only,
on stderr) unless the operator set it.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stdout.flush()
    try:
        out_fd, err_fd = sys.__stdout__.fileno(), sys.__stderr__.fileno()
    except (AttributeError, OSError, ValueError):       # no real descriptors (embedded): Python level only
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    saved = os.dup(out_fd)
    try:
        os.dup2(err_fd, out_fd)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, out_fd)
        os.close(saved)
