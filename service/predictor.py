"""The predictor: admission, decoding in a thread pool, the batcher feeding the engine, and the answers.

Order of work for a request, chosen so overload costs little (see shared PEERS.md):
1. `admit()` reserves queue slots BEFORE the body is read or decoded, so a refused request costs ~nothing;
2. the images are decoded in the decode pool (off the event loop), all of them before any inference;
3. each image is submitted to the batcher; its one inference thread runs routing-then-specialist on batches;
4. only images that asked for a heatmap fetch the feature map and pay for Grad-CAM (in the decode pool).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.answers import AbstentionPolicy, PartSource, image_prediction, study_answer, study_part
from service.batching import BatcherClosedError, BatchStats, DynamicBatcher, Ticket
from service.bundle import Bundle
from service.dicom import body_part_from_dicom
from service.dicom_output import secondary_capture
from service.engine import Engine
from service.errors import InferenceFailedError, ServiceError, from_image_error
from service.heatmap import HeadBank, grad_cam, overlay, png_bytes
from service.metrics import Metrics
from service.pipeline import ItemPrediction, predict_batch
from service.preprocessing import ImageError, PreparedImage, prepare_image
from service.schemas import DicomAnswer, HeatmapAnswer, ImagePrediction, StudyResponse, Timings
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    """One image as it arrived."""

    data: bytes
    name: str
    body_part: str | None = None
    heatmap: bool = False
    dicom: bool = False  # sent as application/dicom: parse as DICOM even without the Part 10 preamble


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
    """Owns the engine, the batcher and the decode pool for one bundle."""

    def __init__(self, bundle: Bundle, settings: Settings, metrics: Metrics) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.settings = settings
        self.metrics = metrics
        self.engine = Engine(
            bundle,
            providers=settings.providers,
            intra_op_threads=settings.resolved_intra_op_threads(),
            spinning=settings.ort_spinning,
        )
        self._decode_pool = ThreadPoolExecutor(settings.resolved_decode_threads(), thread_name_prefix="decode")
        self.batcher: DynamicBatcher[_Item, _Answer] = DynamicBatcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_queue_size=settings.max_queue_size,
            max_wait_ms=settings.max_wait_ms,
            name="inference",
            on_batch=self._on_batch,
        )
        metrics.track_queue_depth(lambda: self.batcher.queue_depth)
        self.heads = HeadBank.load(bundle.path(self.manifest.heads_file))
        self.policy = AbstentionPolicy.resolve(
            self.manifest, settings.abstain_min_router_probability, settings.abstain_max_colourfulness
        )

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Warm up (first runs allocate and tune kernels), then accept work."""
        contract = self.manifest.input
        warm = np.zeros((1, contract.height, contract.width, 3), dtype=np.uint8)
        await asyncio.get_running_loop().run_in_executor(None, predict_batch, self.engine, warm)
        await self.batcher.start()

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Drain: everything admitted is answered, then the threads stop."""
        await self.batcher.stop(drain=True, timeout_s=timeout_s)
        self._decode_pool.shutdown(wait=True, cancel_futures=True)

    # -- the work --------------------------------------------------------------------------------------------
    def admit(self, count: int = 1) -> list[AnswerTicket]:
        """Reserve `count` queue slots at once or none (QueueFullError / BatcherClosedError)."""
        tickets: list[AnswerTicket] = []
        try:
            for _ in range(count):
                tickets.append(self.batcher.admit())
        except BaseException:
            release_all(tickets)
            raise
        return tickets

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
                    raise ServiceError(
                        422,
                        "unknown_body_part",
                        f"{upload.name}: unknown body_part {upload.body_part!r}; "
                        f"this bundle knows {self.manifest.body_parts}",
                    )
            started = time.perf_counter()
            prepared = await asyncio.gather(*(self._decode(u) for u in uploads))
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
        self.metrics.images.inc(len(answers))
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

    def _part_source(self, upload: Upload, prepared: PreparedImage) -> tuple[str | None, PartSource]:
        """The body-part hint and who gave it: the client, else a DICOM BodyPartExamined we know, else none."""
        if upload.body_part is not None:
            return upload.body_part, "client"
        if prepared.dicom is not None:
            part = body_part_from_dicom(prepared.dicom.body_part_examined, self.manifest.body_parts)
            if part is not None:
                return part, "dicom"
        return None, "router"

    async def answer(self, result: ImageResult) -> ImagePrediction:
        """The answer a person reads, with the heatmap (computed off the event loop) when asked for."""
        heatmap = None
        if result.upload.heatmap:
            loop = asyncio.get_running_loop()
            heatmap = await loop.run_in_executor(self._decode_pool, self._heatmap, result)
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

    def _overlay(self, result: ImageResult) -> tuple[np.ndarray, np.ndarray]:
        """(7, 7) Grad-CAM and the (H, W, 3) overlay for one image that asked for a heatmap."""
        feature_map = result.prediction.feature_map
        display = result.prepared.display
        if feature_map is None or display is None:
            raise RuntimeError("a heatmap was asked for but the feature map or display image is missing")
        cam = grad_cam(feature_map, self.heads.specialist(result.prediction.body_part))
        return cam, overlay(display, cam)

    def _heatmap(self, result: ImageResult) -> HeatmapAnswer:
        cam, rgb = self._overlay(result)
        return HeatmapAnswer(
            body_part=result.prediction.body_part,
            grid=np.round(cam, 4).tolist(),
            overlay_png_base64=base64.b64encode(png_bytes(rgb)).decode("ascii"),
            width=int(rgb.shape[1]),
            height=int(rgb.shape[0]),
        )

    async def predict_study(self, tickets: Sequence[AnswerTicket], uploads: Sequence[Upload]) -> StudyResponse:
        """Per-image answers plus the study's: one body part for the study, the mean of its images' P."""
        results = await self.run_images(tickets, uploads)
        images = list(await asyncio.gather(*(self.answer(result) for result in results)))
        part, mean_probs, source = study_part(self.manifest, images)
        # Images another specialist answered run again under the study's part (only those; usually none).
        others = [r for r in results if r.prediction.body_part != part]
        rerun: list[_Answer] = []
        if others:
            more = self.admit(len(others))
            rerun = list(
                await asyncio.gather(
                    *(
                        self._submit(ticket, _Item(r.prepared.pixels, part, False))
                        for ticket, r in zip(more, others, strict=True)
                    )
                )
            )
        under_part = {id(r): a.prediction.p_fractured for r, a in zip(others, rerun, strict=True)}
        p_values = [under_part.get(id(r), r.prediction.p_fractured) for r in results]
        study = study_answer(self.manifest, images, part, mean_probs, source, p_values, self.policy)
        first = images[0]
        return StudyResponse(study=study, predictions=images, model=first.model, warnings=self._warnings(images))

    def _warnings(self, images: Sequence[ImagePrediction]) -> list[str]:
        seen: list[str] = []
        for image in images:
            seen.extend(w for w in image.warnings if w not in seen)
        return seen

    async def dicom_report(self, result: ImageResult, answer: ImagePrediction) -> bytes:
        """A DICOM Secondary Capture of the overlay and the result, in the source image's study."""
        dicom = result.prepared.dicom
        if dicom is None:
            raise ServiceError(422, "dicom_output_needs_dicom", "output=dicom needs a DICOM input image")
        lines = [
            "RESEARCH USE ONLY - not a diagnosis",
            f"Body part: {answer.body_part.label} ({answer.body_part.source})",
            f"P(fractured) {answer.fracture.probability:.3f}, threshold {answer.fracture.threshold:.3f}: "
            f"{answer.fracture.label.upper()}",
            f"Model {answer.model.name} {answer.model.version}, trained={str(answer.model.trained).lower()}",
        ]
        if answer.abstained:
            lines.insert(1, f"ABSTAINED: {answer.abstention_reason}")
        if not answer.model.trained:
            lines.insert(1, "UNTRAINED MODEL: meaningless, not a result")
        loop = asyncio.get_running_loop()

        def build() -> bytes:
            _, rgb = self._overlay(result)
            return secondary_capture(dicom.dataset, rgb, lines)

        return await loop.run_in_executor(self._decode_pool, build)

    async def _decode(self, upload: Upload) -> PreparedImage:
        contract = self.manifest.input
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._decode_pool,
                lambda: prepare_image(
                    upload.data,
                    size=contract.height,
                    resize=contract.resize,
                    max_pixels=self.settings.max_pixels,
                    display_max_side=self.settings.heatmap_max_side if upload.heatmap else None,
                    dicom=upload.dicom,
                ),
            )
        except ImageError as error:
            raise from_image_error(error, upload.name) from error

    async def _submit(self, ticket: AnswerTicket, item: _Item) -> _Answer:
        try:
            return await ticket.submit(item)
        except (ServiceError, BatcherClosedError):
            raise
        except Exception as error:  # the handler's own failure: only this batch's requests see it
            raise InferenceFailedError(f"{type(error).__name__}: {error}") from error

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

    def _on_batch(self, stats: BatchStats) -> None:
        if stats.size:
            self.metrics.batch_size.observe(stats.size)
            self.metrics.inference_seconds.observe(stats.run_seconds)
        if stats.skipped:
            self.metrics.skipped.inc(stats.skipped)
