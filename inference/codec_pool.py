"""Compressed DICOM frames are decoded in worker processes, because their codecs hold the GIL.

OpenJPEG (JPEG 2000), CharLS (JPEG-LS), the RLE decoders and GDCM keep Python's GIL for as long as they
decode. In a decode thread, one 2000x2500 JPEG 2000 frame stalled the event loop for 1.5 s (measured: no
request was accepted, refused or answered meanwhile) and every other thread with it. In a worker process
they stall nothing but that worker. A codec that crashes on hostile data takes down a worker, not the
service: the pool is rebuilt, the frame is tried once more (other images in flight were only bystanders),
and an image that crashes it again is refused with 422.

Pillow (PNG, JPEG) and numpy release the GIL, so everything else stays in the decode threads, and so does the
rendering of a frame once decoded (its lookup tables are numpy). Only the frame's pixels cross the process
boundary: the worker parses the file again, which costs little next to the decode it then does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from inference.dicom import decode_first_frame
from inference.dicom_header import DicomError, DicomHeader, parse_dicom
from inference.errors import ImageError
from inference.worker_pool import WorkerProcesses

log = logging.getLogger(__name__)

FrameDecoder = Callable[[DicomHeader], tuple[np.ndarray, str]]
ATTEMPTS = 2  # a crash breaks every frame in flight: each gets one more try on the rebuilt pool


@dataclass(frozen=True)
class WorkerFailure:
    """An ImageError as it crosses the process boundary (exceptions with their own __init__ pickle badly)."""

    error: type[ImageError]
    reason: str


def _warm() -> None:
    """Worker start-up: import pydicom and its pixel-data plugins once, not on the first image."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    get_decoder(JPEG2000Lossless).is_available  # noqa: B018 - importing the plugins is the point


def _decode_in_worker(data: bytes, force: bool) -> tuple[np.ndarray, str] | WorkerFailure:
    try:
        return decode_first_frame(parse_dicom(data, force=force))
    except ImageError as error:
        return WorkerFailure(type(error), error.reason)


class CodecPool:
    """Worker processes for GIL-holding codecs; `frame_decoder()` is what `prepare_image` calls per frame.

    The workers start with the first compressed frame (about a second, once), so a service that never sees
    one, and every short-lived app in the tests, never pays for them.
    """

    def __init__(
        self, processes: int, worker: Callable[[bytes, bool], tuple[np.ndarray, str] | WorkerFailure] | None = None
    ) -> None:
        self._workers = WorkerProcesses(processes, _warm, what="DICOM codec")  # checks processes >= 1
        self.processes = processes
        self._worker = worker or _decode_in_worker  # a module-level function: it is pickled by name
        self.crashes = 0

    def close(self) -> None:
        self._workers.close()

    def decode(self, data: bytes, force: bool) -> tuple[np.ndarray, str]:
        """The first frame of the DICOM file `data` and its photometric, decoded in a worker (blocks)."""
        for attempt in range(1, ATTEMPTS + 1):
            pool = self._workers.current()
            try:
                outcome = pool.submit(self._worker, data, force).result()
            except BrokenProcessPool:
                if self._workers.replace(pool):
                    self.crashes += 1
                if attempt == ATTEMPTS:
                    raise DicomError("the DICOM pixel data crashed its decoder (corrupt or hostile data)") from None
                continue
            if isinstance(outcome, WorkerFailure):
                raise outcome.error(outcome.reason)
            return outcome
        raise AssertionError("unreachable")

    def frame_decoder(self, data: bytes, force: bool) -> FrameDecoder:
        """Compressed frames go to a worker; native (uncompressed) ones are decoded in the calling thread."""

        def decode(header: DicomHeader) -> tuple[np.ndarray, str]:
            return self.decode(data, force) if header.encapsulated else decode_first_frame(header)

        return decode
