"""The machine a figure was measured on: cores, CPU model, memory, library versions, load."""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

import onnxruntime
import psutil

Json = dict[str, Any]


def machine_description() -> Json:
    """Cores, CPU model, memory and library versions: the context every figure needs."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    return {
        "cpu_model": model,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }
