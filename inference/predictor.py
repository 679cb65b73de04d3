"""The predictor: admission, decoding, the batcher feeding the engine, and the answers, for one bundle.

Every door (HTTP, the DICOM node, the desktop, `bfd predict`) runs images through this one object, so they
share one admission, one decode pool and one set of models. Order of work for a request, chosen so overload
costs little and every cost is budgeted:
1. `check_capacity()` refuses at once, before anything is read, when a new image could not start within the
   deadline (the batcher's measured service rate); `admit()` then reserves the slots of the images it holds;
2. every image is decoded as admitted work (`inference.decoding`: planned from its header, under a memory
   budget, in bounded slots); when one image of a request fails, its siblings' decodes are cancelled;
3. each image is submitted to the batcher; its one inference thread runs routing-then-specialist on batches;
4. only images that asked for a heatmap fetch the feature map and pay for Grad-CAM (in a decode slot).
Errors are the core's own (`inference.errors`, `QueueFullError`, `BatcherClosedError`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inference.answers import AbstentionPolicy, PartSource, image_prediction, study_answer, study_part, summary_lines
from inference.batching import BatcherClosedError, DynamicBatcher, QueueFullError, Ticket
from inference.bundle import Bundle
from inference.config import PredictorConfig
from inference.decoding import Decoder, all_or_nothing
from inference.dicom import body_part_from_dicom
from inference.dicom_objects.findings import Algorithm
from inference.dicom_output import secondary_capture
from inference.engine import Engine
from inference.errors import DicomOutputError, ImageError, InferenceFailedError, UnknownBodyPartError, shortened
from inference.events import PredictorEvents
from inference.heatmap import HeadBank, grad_cam, overlay, png_bytes
from inference.memory_budget import ByteBudget
from inference.pipeline import ItemPrediction, predict_batch
from inference.preprocessing import PreparedImage
from inference.results import DicomAnswer, HeatmapAnswer, ImagePrediction, StudyResponse, Timings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    """One image as it arrived."""

    data: bytes
    name: str
    body_part: str | None = None
    heatmap: bool = False
    dicom: bool = False  # sent as DICOM: parse as DICOM even without the Part 10 preamble


@dataclass(frozen=True)
class _Item:
    pixels: np.ndarray  # (224, 224, 3) uint8
    hint: str | None
    want_feature_map: bool
    route_hinted: bool = False


@dataclass(frozen=True)
class ImageResult:
    """One image through the models, with what its answer needs."""

    upload: Upload
    prepared: PreparedImage
    prediction: ItemPrediction
    source: PartSource
    timings: Timings


@dataclass(frozen=True)
class Explained:
    """An image's answer with its (7, 7) Grad-CAM and (H, W, 3) uint8 overlay, when a heatmap was asked for."""

    answer: ImagePrediction
    cam: np.ndarray | None
    overlay_rgb: np.ndarray | None


@dataclass(frozen=True)
class _Answer:
    prediction: ItemPrediction
    inference_ms: float
    batch_size: int


AnswerTicket = Ticket[_Item, _Answer]


def release_all(tickets: Sequence[AnswerTicket]) -> None:
    """Give back reserved queue slots of a request that will not submit (bad input, refusal, cancellation)."""
    for ticket in tickets:
        ticket.release()


class Predictor:
    """Owns the engine, the batcher and the decoder for one bundle."""

    def __init__(
        self, bundle: Bundle, config: PredictorConfig | None = None, events: PredictorEvents | None = None
    ) -> None:
        config = config or PredictorConfig()
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.config = config
        self.events = events or PredictorEvents()
        self.engine = Engine(
            bundle,
            providers=config.providers,
            intra_op_threads=config.resolved_intra_op_threads(),
            spinning=config.ort_spinning,
        )
        self.decoder = Decoder(self.manifest.input, config, self.events)
        # Request bodies are the doors' to hold (HTTP uploads, DICOM associations); the budget is shared here
        # so that every door counts against the same memory.
        self.request_memory = ByteBudget(config.request_memory_budget_bytes, "request memory budget")
        self.batcher: DynamicBatcher[_Item, _Answer] = DynamicBatcher(
            self._run_batch,
            max_batch_size=config.max_batch_size,
            max_queue_size=config.max_queue_size,
            max_wait_ms=config.max_wait_ms,
            max_queue_wait_ms=config.max_queue_wait_ms,
            name="inference",
            on_batch=self.events.batch,
        )
        self.heads = HeadBank.load(bundle.path(self.manifest.heads_file))
        self.algorithm = Algorithm.of_bundle(bundle)  # who made the DICOM outputs (the bundle's sha256 included)
        self.policy = AbstentionPolicy.resolve(
            self.manifest, config.abstain_min_router_probability, config.abstain_max_colourfulness
        )

    @property
    def decode_memory(self) -> ByteBudget:
        return self.decoder.memory

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Warm up (first runs allocate and tune kernels), then accept work."""
        contract = self.manifest.input
        warm = np.zeros((1, contract.height, contract.width, 3), dtype=np.uint8)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, predict_batch, self.engine, warm)  # allocations and kernel tuning
        started = time.perf_counter()
        await loop.run_in_executor(None, predict_batch, self.engine, warm)
        # Until real batches are measured, admission assumes an image costs what a warm inference does.
        self.batcher.seed_seconds_per_item(time.perf_counter() - started)
        await self.batcher.start()

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Drain: everything admitted is answered, then the threads and workers stop."""
        await self.batcher.stop(drain=True, timeout_s=timeout_s)
        await self.decoder.close()

    # -- admission -------------------------------------------------------------------------------------------
    def check_capacity(self, count: int = 1) -> None:
        """Refuse (QueueFullError / BatcherClosedError) if `count` images could not start in time; reserves nothing."""
        try:
            self.batcher.check(count)
        except QueueFullError as error:
            self.events.refused(error.reason)
            raise

    def admit(self, count: int = 1, *, deadline: bool = True) -> list[AnswerTicket]:
        """Reserve `count` queue slots at once or none (QueueFullError / BatcherClosedError).

        `deadline=False` for more work of a request already admitted (the count bound still holds).
        """
        try:
            return self.batcher.admit_many(count, deadline=deadline)
        except QueueFullError as error:
            self.events.refused(error.reason)
            raise

    # -- the work --------------------------------------------------------------------------------------------
    async def predict(self, tickets: Sequence[AnswerTicket], uploads: Sequence[Upload]) -> list[ImagePrediction]:
        """Every upload's answer, in upload order (any bad image fails the whole request before inference)."""
        results = await self.run_images(tickets, uploads)
        return list(await asyncio.gather(*(self.answer(result) for result in results)))

    async def run_images(self, tickets: Sequence[AnswerTicket], uploads: Sequence[Upload]) -> list[ImageResult]:
        """Decode every upload, then run them through the batcher; results in upload order."""
        if len(tickets) != len(uploads):
            raise ValueError(f"{len(tickets)} tickets for {len(uploads)} uploads")
        try:
            for upload in uploads:
                if upload.body_part is not None and upload.body_part not in self.manifest.body_parts:
                    raise UnknownBodyPartError(
                        f"{upload.name}: unknown body_part {shortened(upload.body_part)!r}; "
                        f"this bundle knows {self.manifest.body_parts}"
                    )
            started = time.perf_counter()
            prepared = await all_or_nothing([self._decode(u) for u in uploads])
            decoded = time.perf_counter()
            sources = [self._part_source(u, p) for u, p in zip(uploads, prepared, strict=True)]
            items = [
                _Item(p.pixels, hint, u.heatmap, route_hinted=source == "dicom")
                for p, u, (hint, source) in zip(prepared, uploads, sources, strict=True)
            ]
        except BaseException:
            release_all(tickets)
            raise
        answers = await asyncio.gather(
            *(self._submit(ticket, item) for ticket, item in zip(tickets, items, strict=True))
        )
        finished = time.perf_counter()
        self.events.answered(len(answers))
        return [
            ImageResult(
                upload=upload,
                prepared=image,
                prediction=answer.prediction,
                source=source,
                timings=Timings(
                    decode_ms=(decoded - started) * 1e3,
                    queue_ms=max(0.0, (finished - decoded) * 1e3 - answer.inference_ms),
                    inference_ms=answer.inference_ms,
                    total_ms=(finished - started) * 1e3,
                    batch_size=answer.batch_size,
                ),
            )
            for upload, image, answer, (_, source) in zip(uploads, prepared, answers, sources, strict=True)
        ]

    async def _decode(self, upload: Upload) -> PreparedImage:
        try:
            return await self.decoder.decode(upload.data, dicom=upload.dicom, display=upload.heatmap)
        except ImageError as error:
            raise error.for_image(upload.name) from error

    def _part_source(self, upload: Upload, prepared: PreparedImage) -> tuple[str | None, PartSource]:
        """The body-part hint and who gave it: the client, else a DICOM BodyPartExamined we know, else none."""
        if upload.body_part is not None:
            return upload.body_part, "client"
        if prepared.dicom is not None:
            part = body_part_from_dicom(prepared.dicom.body_part_examined, self.manifest.body_parts)
            if part is not None:
                return part, "dicom"
        return None, "router"

    async def answer(self, result: ImageResult, heatmap: HeatmapAnswer | None = None) -> ImagePrediction:
        """The answer a person reads, with the heatmap (computed off the event loop) when asked for."""
        if heatmap is None and result.upload.heatmap:
            heatmap = await self.decoder.in_pool(lambda: self._heatmap(result))
        dicom = result.prepared.dicom
        return image_prediction(
            self.manifest,
            result.prediction,
            result.upload.name,
            result.timings,
            policy=self.policy,
            colourfulness=result.prepared.colourfulness,
            source=result.source,
            heatmap=heatmap,
            dicom=None
            if dicom is None
            else DicomAnswer(
                body_part_examined=dicom.body_part_examined,
                photometric_interpretation=dicom.photometric,
                bits_stored=dicom.bits_stored,
                transfer_syntax=dicom.transfer_syntax,
            ),
        )

    async def explain(self, result: ImageResult) -> Explained:
        """The answer with its Grad-CAM grid and overlay as arrays, computed once (for the DICOM outputs).

        The answer's heatmap carries the grid but no PNG: the DICOM objects embed the overlay themselves.
        """
        if not result.upload.heatmap:
            return Explained(await self.answer(result), None, None)
        cam, rgb = await self.decoder.in_pool(lambda: self.overlay(result))
        answer = await self.answer(result, heatmap=self._heatmap_answer(result, cam, rgb, png=False))
        return Explained(answer, cam, rgb)

    def overlay(self, result: ImageResult) -> tuple[np.ndarray, np.ndarray]:
        """(7, 7) Grad-CAM and the (H, W, 3) uint8 overlay for one image that asked for a heatmap."""
        feature_map = result.prediction.feature_map
        display = result.prepared.display
        if feature_map is None or display is None:
            raise RuntimeError("a heatmap was asked for but the feature map or display image is missing")
        cam = grad_cam(feature_map, self.heads.specialist(result.prediction.body_part))
        return cam, overlay(display, cam)

    def _heatmap(self, result: ImageResult) -> HeatmapAnswer:
        cam, rgb = self.overlay(result)
        return self._heatmap_answer(result, cam, rgb, png=True)

    @staticmethod
    def _heatmap_answer(result: ImageResult, cam: np.ndarray, rgb: np.ndarray, *, png: bool) -> HeatmapAnswer:
        return HeatmapAnswer(
            body_part=result.prediction.body_part,
            grid=np.round(cam, 4).tolist(),
            overlay_png_base64=base64.b64encode(png_bytes(rgb)).decode("ascii") if png else None,
            width=int(rgb.shape[1]),
            height=int(rgb.shape[0]),
        )

    async def predict_study(self, tickets: Sequence[AnswerTicket], uploads: Sequence[Upload]) -> StudyResponse:
        """Per-image answers plus the study's: one body part for the study, the mean of its images' P."""
        results = await self.run_images(tickets, uploads)
        images = list(await asyncio.gather(*(self.answer(result) for result in results)))
        return await self.study_of(results, images)

    async def study_of(self, results: Sequence[ImageResult], images: Sequence[ImagePrediction]) -> StudyResponse:
        """The study's answer from its images' results and answers (MURA's study rule)."""
        part, mean_probs, source = study_part(self.manifest, images)
        # Images another specialist answered are scored under the study's part: read from the one pass that
        # scored every part (a fused graph), else run again (a split graph; only those, usually none).
        p_values: list[float | None] = [_p_under(r.prediction, part) for r in results]
        others = [i for i, p in enumerate(p_values) if p is None]
        if others:
            more = self.admit(len(others), deadline=False)  # the study was admitted; this is its own work
            rerun = await asyncio.gather(
                *(
                    self._submit(ticket, _Item(results[i].prepared.pixels, part, False))
                    for ticket, i in zip(more, others, strict=True)
                )
            )
            for i, answer in zip(others, rerun, strict=True):
                p_values[i] = answer.prediction.p_fractured
        scores = [p for p in p_values if p is not None]
        if len(scores) != len(results):
            raise RuntimeError("an image of the study has no P(fractured) under the study's part")
        study = study_answer(self.manifest, images, part, mean_probs, source, scores, self.policy)
        first = images[0]
        return StudyResponse(
            study=study, predictions=list(images), model=first.model, warnings=_distinct_warnings(images)
        )

    async def dicom_report(self, result: ImageResult) -> bytes:
        """A DICOM Secondary Capture of the overlay and the answer's summary, in the source image's study
        (Grad-CAM and the overlay computed once, for the answer and the image alike)."""
        dicom = result.prepared.dicom
        if dicom is None:
            raise DicomOutputError("output=dicom needs a DICOM input image")
        explained = await self.explain(result)
        lines = summary_lines(explained.answer)

        def build() -> bytes:
            rgb = explained.overlay_rgb if explained.overlay_rgb is not None else self.overlay(result)[1]
            return secondary_capture(
                dicom.dataset, rgb, lines, algorithm=self.algorithm, uid_root=self.config.dicom_uid_root
            )

        return await self.decoder.in_pool(build)

    async def _submit(self, ticket: AnswerTicket, item: _Item) -> _Answer:
        try:
            return await ticket.submit(item)
        except BatcherClosedError:
            raise
        except Exception as error:  # the handler's own failure: only this batch's requests see it
            raise InferenceFailedError(f"inference failed for this batch: {type(error).__name__}: {error}") from error

    def _run_batch(self, items: list[_Item]) -> list[_Answer]:
        """Runs in the batcher's one inference thread."""
        started = time.perf_counter()
        predictions = predict_batch(
            self.engine,
            np.stack([item.pixels for item in items]),
            hints=[item.hint for item in items],
            want_feature_map=[item.want_feature_map for item in items],
            route_hinted=[item.route_hinted for item in items],
        )
        elapsed_ms = (time.perf_counter() - started) * 1e3
        return [_Answer(p, elapsed_ms, len(items)) for p in predictions]


def _p_under(prediction: ItemPrediction, part: str) -> float | None:
    """P(fractured) of an image under `part`'s specialist when known without running it again."""
    if prediction.body_part == part:
        return prediction.p_fractured
    return None if prediction.p_fractured_by_part is None else prediction.p_fractured_by_part.get(part)


def _distinct_warnings(images: Sequence[ImagePrediction]) -> list[str]:
    seen: list[str] = []
    for image in images:
        seen.extend(w for w in image.warnings if w not in seen)
    return seen
