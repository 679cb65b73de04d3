"""A study's result objects are built in a worker process, because building them is pure Python.

highdicom writes an SR, a GSPS per image and a Secondary Capture per image in about 50 ms of Python per
source image, all of it holding the GIL; in the service process that time is taken from everything else
that needs the GIL: pynetdicom receiving the next instances, the event loop answering HTTP, the batcher.
Measured in `loadtest.bench_dicom` before this module, the service process was GIL-bound (about one core
busy of two) while the node's throughput was a quarter of the HTTP path's. In a worker the build runs on
the other core.

What crosses the process boundary is small: the sources without their pixel data (the builders read the
header alone: `without_pixel_data`), the answers, the 7x7 Grad-CAMs and the overlays; back come the Part
10 bytes. A worker that dies (it should not: the inputs are the core's own) is replaced and the study is
built once more; a second failure is raised to the node, whose study is then reported as failed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from pydicom.dataset import Dataset

from dicom_node.outbox import ResultObject
from inference.dicom_objects import Algorithm, ImageFinding
from inference.dicom_objects.patient_study import with_encoding_of
from inference.dicom_objects.uids import DEFAULT_UID_ROOT
from inference.results import StudyAnswer
from inference.worker_pool import WorkerProcesses

ATTEMPTS = 2
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, Double Float, Pixel Data


def without_pixel_data(source: Dataset) -> Dataset:
    """A data set with every element of `source` but its pixel data (elements shared, `source` untouched), the
    same file meta and original encoding: what the result builders read, at a few kilobytes to copy. `source`
    itself when it has no pixel data."""
    if not any(tag in source for tag in PIXEL_DATA_TAGS):
        return source  # already a header (the analyser lets the pixel data go as soon as it can)
    header = Dataset({tag: element for tag, element in source.items() if int(tag) not in PIXEL_DATA_TAGS})
    return with_encoding_of(source, header)


def build_objects(
    findings: Sequence[ImageFinding],
    study: StudyAnswer,
    algorithm: Algorithm,
    outputs: Sequence[str],
    uid_root: str = DEFAULT_UID_ROOT,
) -> list[ResultObject]:
    """The study's result objects as Part 10 bytes (runs in the worker; also the in-process fallback)."""
    from inference.dicom_objects import part10_bytes, result_objects

    datasets = result_objects(findings, study, algorithm, outputs, uid_root)
    return [ResultObject(str(d.SOPClassUID), str(d.SOPInstanceUID), part10_bytes(d)) for d in datasets]


def _warm() -> None:
    """Worker start-up: highdicom and its standard tables load once, not with the first study."""
    import highdicom._standard_utils as standard

    standard.get_module_attribute_map()
    standard.get_iod_module_map()
    standard.get_sop_class_iod_map()


class ObjectBuilder:
    """Builds result objects in `processes` worker processes (0: in a thread of this process)."""

    def __init__(self, processes: int = 1, uid_root: str = DEFAULT_UID_ROOT) -> None:
        if processes < 0:
            raise ValueError(f"processes must be >= 0, got {processes}")
        self.processes = processes
        self.uid_root = uid_root  # every UID the objects get is under it (BFD_DICOM_UID_ROOT)
        self._workers = WorkerProcesses(processes, _warm, what="DICOM result-object") if processes else None
        self._thread: ThreadPoolExecutor | None = None if processes else ThreadPoolExecutor(1, "dicom-objects")

    def start(self) -> None:
        """Start the workers now (about a second), so the first study does not wait for them."""
        if self._workers is not None:
            executor = self._workers.current()
            for _ in range(self.processes):
                executor.submit(os.getpid)  # any task starts a worker; its initializer (_warm) loads highdicom

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
        if self._thread is not None:
            self._thread.shutdown(wait=True, cancel_futures=True)

    async def build(
        self, findings: Sequence[ImageFinding], study: StudyAnswer, algorithm: Algorithm, outputs: Sequence[str]
    ) -> list[ResultObject]:
        """The objects of one study (`build_objects`), built off this process's GIL."""
        light = [
            ImageFinding(without_pixel_data(f.source), f.answer, f.cam, f.overlay_rgb, f.value_range) for f in findings
        ]
        loop = asyncio.get_running_loop()
        if self._thread is not None:
            return await loop.run_in_executor(
                self._thread, build_objects, light, study, algorithm, tuple(outputs), self.uid_root
            )
        assert self._workers is not None
        for attempt in range(1, ATTEMPTS + 1):
            executor = self._workers.current()
            try:
                return await loop.run_in_executor(
                    executor, build_objects, light, study, algorithm, tuple(outputs), self.uid_root
                )
            except BrokenProcessPool:
                self._workers.replace(executor)
                if attempt == ATTEMPTS:
                    raise
        raise AssertionError("unreachable")
