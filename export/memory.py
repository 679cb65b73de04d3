"""Handing memory back between heavy steps of an export (conversions, quantization) in one process."""

from __future__ import annotations

import contextlib
import ctypes
import gc


def release_memory() -> None:
    """Hand freed memory back to the system after a conversion, so several exports in one process (a test
    run, a training run exporting its models) do not stack their peaks: the converter's graphs hold reference
    cycles only the cyclic collector frees, and glibc keeps freed heap pages unless asked to trim them."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
