"""A received study through the core, and its DICOM result objects: the same predictor, admission and
batcher as HTTP traffic, so DICOM and HTTP share one queue and one set of models.

Each instance is decoded and answered on its own (concurrently, so they still share batches): one instance
that cannot be decoded is reported as refused, with its reason, and the rest of the study is answered.
Instances were already acknowledged to the sender, so a full queue here is waited out, never a loss.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dicom_node.object_builder import ObjectBuilder
from dicom_node.outbox import ResultObject
from dicom_node.studies import ReceivedStudy
from inference.batching import QueueFullError
from inference.dicom_objects import ImageFinding
from inference.errors import InferenceError
from inference.predictor import AnswerTicket, Explained, ImageResult, Predictor, Upload
from inference.results import StudyResponse

log = logging.getLogger(__name__)


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

    async def analyse(self, study: ReceivedStudy) -> StudyOutcome:
        instances = list(study.instances.values())
        runs = await asyncio.gather(*(self._run(i.sop_instance_uid, i.data) for i in instances), return_exceptions=True)
        results: list[ImageResult] = []
        refused: list[dict[str, str]] = []
        for instance, run in zip(instances, runs, strict=True):
            if isinstance(run, InferenceError):
                refused.append({"sop_instance_uid": instance.sop_instance_uid, "reason": str(run)})
            elif isinstance(run, BaseException):
                raise run
            else:
                results.append(run)
        if not results:
            return StudyOutcome([], [], refused, None, self._thresholds())
        explained: list[Explained] = list(await asyncio.gather(*(self.predictor.explain(r) for r in results)))
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

    async def _run(self, name: str, data: bytes) -> ImageResult:
        tickets = await self._admit()
        (result,) = await self.predictor.run_images(tickets, [Upload(data, name, heatmap=True, dicom=True)])
        return result

    async def _admit(self) -> list[AnswerTicket]:
        """A queue slot, waited for: the sender was told 'stored', so this work cannot be refused any more."""
        while True:
            try:
                return self.predictor.admit(1, deadline=False)
            except QueueFullError as error:
                await asyncio.sleep(min(error.retry_after_s, 2.0))


def _value_range(result: ImageResult) -> tuple[float, float] | None:
    return result.prepared.dicom.value_range if result.prepared.dicom is not None else None


def _source_dataset(result: ImageResult) -> Any:
    dicom = result.prepared.dicom
    if dicom is None:  # the node sends only DICOM uploads
        raise RuntimeError(f"{result.upload.name}: no DICOM data set")
    return dicom.dataset
