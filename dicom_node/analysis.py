"""A received study through the core, and its DICOM result objects: the same predictor, admission and
batcher as HTTP traffic, so DICOM and HTTP share one queue and one set of models.

Each instance is decoded, answered and explained on its own as soon as it is taken (`begin`), while the rest
of its study is still arriving, so receiving and analysing overlap and a study is answered soon after its
last instance: only the study's answer and the result objects wait for the study to be complete. Once an
instance is analysed, all it keeps of its source is what the result objects read (`results_header`: no pixel
data, no private or other elements), measured for the held-bytes budget. One instance that cannot be decoded
is reported as refused with its reason, and keeps nothing else: not its bytes, not the error's traceback (which
held the upload and the parsed data set until the study was answered). Instances were already acknowledged to
the sender, so a full queue here is waited out, never a loss.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from dicom_node.object_builder import ObjectBuilder
from dicom_node.outbox import ResultObject
from dicom_node.studies import ReceivedInstance, ReceivedStudy
from inference.batching import QueueFullError
from inference.dicom_objects import ImageFinding
from inference.dicom_objects.patient_study import header_bytes, results_header
from inference.errors import InferenceError, forget_traceback
from inference.predictor import AnswerTicket, Explained, ImageResult, Predictor, Upload
from inference.results import StudyResponse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refused:
    """An instance whose analysis was refused: its reason, and nothing of the attempt (no traceback)."""

    reason: str


Prepared = tuple[ImageResult, Explained, int] | Refused  # the result, its explanation, the header's bytes


@dataclass(frozen=True)
class StudyOutcome:
    """What came of a study: the result objects and, for the audit, the answers in brief (no patient data)."""

    objects: list[ResultObject]
    images: list[dict[str, Any]]
    refused: list[dict[str, str]]
    study: dict[str, Any] | None
    thresholds: dict[str, Any] = field(default_factory=dict)


class StudyAnalyser:
    def __init__(self, predictor: Predictor, outputs: Sequence[str], builder: ObjectBuilder | None = None) -> None:
        self.predictor = predictor
        self.outputs = tuple(outputs)
        self.algorithm = predictor.algorithm
        self.builder = builder or ObjectBuilder(0)
        self._early: dict[int, asyncio.Task[Prepared]] = {}  # by id() of the instance

    @property
    def in_progress(self) -> int:
        """Instances whose analysis has begun and whose study has not been answered yet."""
        return len(self._early)

    def begin(self, instance: ReceivedInstance, done: Callable[[ReceivedInstance, int], None] | None = None) -> None:
        """Start an instance's analysis now, while its study is still arriving (`analyse` picks it up).
        `done(instance, kept_bytes)` is called once it is over (answered or refused), not when it was dropped;
        `kept_bytes` is what the analysis keeps until the study's answer (`kept_bytes`)."""
        task = asyncio.get_running_loop().create_task(self._prepare(instance), name="dicom-instance")
        if done is not None:
            task.add_done_callback(
                lambda finished: None if finished.cancelled() else done(instance, kept_bytes(finished))
            )
        self._early[id(instance)] = task

    def drop(self, instance: ReceivedInstance) -> None:
        """Forget an instance's analysis (the same SOP Instance UID arrived again and replaced it)."""
        task = self._early.pop(id(instance), None)
        if task is not None:
            task.cancel()
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: nobody wants it any more

    async def analyse(self, study: ReceivedStudy) -> StudyOutcome:
        instances = list(study.instances.values())
        runs = await asyncio.gather(*(self._prepared(i) for i in instances), return_exceptions=True)
        results: list[ImageResult] = []
        explained: list[Explained] = []
        refused: list[dict[str, str]] = []
        for instance, run in zip(instances, runs, strict=True):
            if isinstance(run, Refused):
                refused.append({"sop_instance_uid": instance.sop_instance_uid, "reason": run.reason})
            elif isinstance(run, BaseException):
                raise run
            else:
                results.append(run[0])
                explained.append(run[1])
        if not results:
            return StudyOutcome([], [], refused, None, self._thresholds())
        response: StudyResponse = await self.predictor.study_of(results, [e.answer for e in explained])
        findings = [
            ImageFinding(
                source=_source_dataset(result),
                answer=item.answer,
                cam=item.cam,
                overlay_rgb=item.overlay_rgb,
                value_range=_value_range(result),  # the GSPS window without decoding the source again
            )
            for result, item in zip(results, explained, strict=True)
        ]
        objects: list[ResultObject] = await self.builder.build(findings, response.study, self.algorithm, self.outputs)
        images = [
            {
                "sop_instance_uid": result.upload.name,
                "body_part": item.answer.body_part.label,
                "fracture": item.answer.fracture.label,
                "p_fractured": round(item.answer.fracture.probability, 6),
                "abstained": item.answer.abstained,
            }
            for result, item in zip(results, explained, strict=True)
        ]
        summary = {
            "body_part": response.study.body_part.label,
            "fracture": response.study.fracture.label,
            "p_fractured": round(response.study.fracture.probability, 6),
            "abstained": response.study.abstained,
            "trained": self.algorithm.trained,
        }
        return StudyOutcome(objects, images, refused, summary, self._thresholds())

    def _thresholds(self) -> dict[str, Any]:
        return {part: t.model_dump(mode="json") for part, t in self.predictor.manifest.thresholds.items()}

    async def _prepared(self, instance: ReceivedInstance) -> Prepared:
        task = self._early.pop(id(instance), None)
        return await (task if task is not None else self._prepare(instance))

    async def _prepare(self, instance: ReceivedInstance) -> Prepared:
        """Decode, answer and explain one instance; its result keeps what the result objects read of its header.

        A refusal is returned, not raised, and without the error's traceback: a kept error held every frame's
        locals (the upload's bytes, the parsed data set) until the study was answered or the garbage collector
        found the cycle."""
        try:
            result, explained = await self._explained(instance)
        except InferenceError as error:
            forget_traceback(error)  # its frames held the upload's bytes and the parsed data set, in a cycle
            return Refused(str(error))
        # What the study's answer and objects do not need goes now: the received bytes and the parsed data set
        # (each as large as the file; private elements too), the full-size rendering (5 MB for a 2000x2500
        # radiograph), the display image and the feature map (the model input, the overlay and the Grad-CAM
        # were made from them). The header kept is measured where it is cut, in a decode slot.
        dicom = result.prepared.dicom
        header_size = 0
        if dicom is not None:
            kept, header_size = await self.predictor.decoder.in_pool(partial(_kept_header, dicom.dataset))
            dicom = replace(dicom, dataset=kept, pixels=NO_PIXELS)
        result = replace(
            result,
            upload=replace(result.upload, data=b""),
            prepared=replace(result.prepared, dicom=dicom, display=None),
            prediction=replace(result.prediction, feature_map=None),
        )
        return result, explained, header_size

    async def _explained(self, instance: ReceivedInstance) -> tuple[ImageResult, Explained]:
        tickets = await self._admit()
        upload = Upload(instance.data, instance.sop_instance_uid, heatmap=True, dicom=True)
        (result,) = await self.predictor.run_images(tickets, [upload])
        return result, await self.predictor.explain(result)

    async def _admit(self) -> list[AnswerTicket]:
        """A queue slot, waited for: the sender was told 'stored', so this work cannot be refused any more."""
        while True:
            try:
                return self.predictor.admit(1, deadline=False)
            except QueueFullError as error:
                await asyncio.sleep(min(error.retry_after_s, 2.0))


NO_PIXELS = np.zeros((0, 0), dtype=np.uint8)  # an analysed instance's rendering, once let go
ANSWER_ALLOWANCE_BYTES = 32 * 1024  # the answer and the objects around the arrays and the header counted
REFUSED_BYTES = 1024  # a refusal's reason


def _kept_header(source: Any) -> tuple[Any, int]:
    header = results_header(source)
    return header, header_bytes(header)


def kept_bytes(finished: asyncio.Task[Prepared]) -> int:
    """What an analysed instance keeps until its study is answered: the overlay, the model input and the
    Grad-CAM, its results header as measured, and an allowance for its answer; a refused one, its reason."""
    if finished.exception() is not None:  # not an analysis refusal: a failure the study's answer raises
        return REFUSED_BYTES
    prepared = finished.result()
    if isinstance(prepared, Refused):
        return REFUSED_BYTES
    result, explained, header_size = prepared
    arrays = (explained.overlay_rgb, explained.cam, result.prepared.pixels)
    return ANSWER_ALLOWANCE_BYTES + header_size + sum(a.nbytes for a in arrays if a is not None)


def _value_range(result: ImageResult) -> tuple[float, float] | None:
    return result.prepared.dicom.value_range if result.prepared.dicom is not None else None


def _source_dataset(result: ImageResult) -> Any:
    dicom = result.prepared.dicom
    if dicom is None:  # the node sends only DICOM uploads
        raise RuntimeError(f"{result.upload.name}: no DICOM data set")
    return dicom.dataset
