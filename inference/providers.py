"""onnxruntime provider names and the default thread count, without importing onnxruntime.

Settings validate provider names at start-up, and loading settings must not load onnxruntime (a CLI asking
for `--help`, the desktop talking to a server): so the names live here and `inference.engine` uses them.
"""

from __future__ import annotations

import os

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
AUTO_ORDER = ("cuda", "cpu")


def default_intra_op_threads() -> int:
    """All cores this process may use: onnxruntime and the decode pool are sized against this."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
