"""The predictor: admission, decoding in a bounded pool, the batcher feeding the engine, and the answers.

Order of work for a request, chosen so overload costs little and every cost is budgeted:
1. `check_capacity()` refuses at once, before the body is read, when a new image could not start within the
   deadline (the batcher's measured service rate); `admit()` then reserves the slots of the images it holds;
2. every image's decode is planned from its header (pixels, samples, bytes: the working memory it will
   need) and refused with 413 over the per-image limit; decodes then wait their turn under a global memory
   budget and a fixed number of decode slots (no executor queue grows behind them); when one image of a
   request fails, its siblings' decodes are cancelled, and a request whose client went away is dropped;
3. each image is submitted to the batcher; its one inference thread runs routing-then-specialist on batches;
4. only images that asked for a heatmap fetch the feature map and pay for Grad-CAM (in a decode slot).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from service.answers import AbstentionPolicy, PartSource, image_prediction, study_answer, study_part
from service.batching import BatcherClosedError, BatchStats, DynamicBatcher, QueueFullError, Ticket
from service.bundle import Bundle
from service.codec_pool import CodecPool
from service.dicom import body_part_from_dicom
from service.dicom_output import secondary_capture
from service.engine import Engine
from service.errors import InferenceFailedError, ServiceError, from_image_error
from service.heatmap import HeadBank, grad_cam, overlay, png_bytes
from service.memory_budget import ByteBudget
from service.metrics import Metrics
from service.pipeline import ItemPrediction, predict_batch
from service.preprocessing import DecodePlan, ImageError, PreparedImage, plan_decode, prepare_image
from service.schemas import DicomAnswer, HeatmapAnswer, ImagePrediction, StudyResponse, Timings
from service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


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
        decode_threads = settings.resolved_decode_threads()
        self._decode_pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        # Work enters the pool only through these slots, so nothing ever waits inside the executor's own
        # (unbounded, uncancellable once running) queue: a cancelled request leaves before it costs anything.
        self._decode_slots = asyncio.Semaphore(decode_threads)
        processes = settings.resolved_decode_processes()
        self.codec_pool = CodecPool(processes) if processes else None
        self.decode_memory = ByteBudget(settings.decode_memory_budget_bytes, "decode memory budget")
        self.request_memory = ByteBudget(settings.request_memory_budget_bytes, "request memory budget")
        self.batcher: DynamicBatcher[_Item, _Answer] = DynamicBatcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_queue_size=settings.max_queue_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue_wait_ms=settings.max_queue_wait_ms,
            name="inference",
            on_batch=self._on_batch,
        )
        metrics.track_admission(
            queue_depth=lambda: self.batcher.queue_depth,
            expected_wait_s=lambda: self.batcher.expected_wait_s(),
            seconds_per_image=lambda: self.batcher.seconds_per_item,
            decode_bytes_in_use=lambda: self.decode_memory.in_use,
            request_bytes_in_use=lambda: self.request_memory.in_use,
        )
        self.heads = HeadBank.load(bundle.path(self.manifest.heads_file))
        self.policy = AbstentionPolicy.resolve(
            self.manifest, settings.abstain_min_router_probability, settings.abstain_max_colourfulness
        )

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
        """Drain: everything admitted is answered, then the threads stop."""
        await self.batcher.stop(drain=True, timeout_s=timeout_s)
        self._decode_pool.shutdown(wait=True, cancel_futures=True)
        if self.codec_pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.codec_pool.close)

    # -- the work --------------------------------------------------------------------------------------------
    def check_capacity(self, count: int = 1) -> None:
        """Refuse (QueueFullError / BatcherClosedError) if `count` images could not start in time; reserves nothing."""
        try:
            self.batcher.check(count)
        except QueueFullError as error:
            self.metrics.refused.labels(error.reason).inc()
            raise

    def admit(self, count: int = 1, *, deadline: bool = True) -> list[AnswerTicket]:
        """Reserve `count` queue slots at once or none (QueueFullError / BatcherClosedError).

        `deadline=False` for more work of a request already admitted (the count bound still holds).
        """
        try:
            return self.batcher.admit_many(count, deadline=deadline)
        except QueueFullError as error:
            self.metrics.refused.labels(error.reason).inc()
            raise

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
            prepared = await _all_or_nothing([self._decode(u) for u in uploads])
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
            heatmap = await self._in_pool(lambda: self._heatmap(result))
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
            more = self.admit(len(others), deadline=False)  # the study was admitted; this is its own work
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

        def build() -> bytes:
            _, rgb = self._overlay(result)
            return secondary_capture(dicom.dataset, rgb, lines)

        return await self._in_pool(build)

    async def _decode(self, upload: Upload) -> PreparedImage:
        """Plan from the header, wait for the memory the decode needs, then decode in a slot."""
        contract = self.manifest.input
        settings = self.settings
        display_side = settings.heatmap_max_side if upload.heatmap else None
        decoding = False  # set by the decode thread itself: a decode cancelled before it ran was skipped
        pool = self.codec_pool

        def decode(plan: DecodePlan) -> PreparedImage:
            nonlocal decoding
            decoding = True
            return prepare_image(
                upload.data,
                size=contract.height,
                resize=contract.resize,
                max_pixels=settings.max_pixels,
                display_max_side=display_side,
                dicom=upload.dicom,
                max_decode_bytes=settings.max_image_decode_bytes,
                plan=plan,
                frame_decoder=None if pool is None else pool.frame_decoder(upload.data, upload.dicom),
            )

        try:
            plan: DecodePlan = await self._in_pool(
                lambda: plan_decode(
                    upload.data,
                    dicom=upload.dicom,
                    size=contract.height,
                    max_pixels=settings.max_pixels,
                    max_decode_bytes=settings.max_image_decode_bytes,
                    display_max_side=display_side,
                )
            )
            async with self.decode_memory.hold(self._decode_bytes(plan)):
                return await self._in_pool(lambda: decode(plan))
        except ImageError as error:
            raise from_image_error(error, upload.name) from error
        except asyncio.CancelledError:
            if not decoding:
                self.metrics.decodes_skipped.inc()
            raise

    def _decode_bytes(self, plan: DecodePlan) -> int:
        """The plan's working memory, plus the frame's trip back from a codec worker (pickled, then unpickled)."""
        header = plan.dicom
        if self.codec_pool is None or header is None or not header.encapsulated:
            return plan.working_bytes
        frame = header.rows * header.columns * header.samples * header.bytes_per_sample
        return min(plan.working_bytes + 2 * frame, self.decode_memory.total)

    async def _in_pool(self, work: Callable[[], T]) -> T:
        """Run `work` in the decode pool once a slot is free; its slot (and whatever memory the caller holds)
        is kept until the thread has really finished, even when the caller is cancelled meanwhile."""
        async with self._decode_slots:
            future = self._decode_pool.submit(work)
            result = asyncio.wrap_future(future)
            try:
                return await asyncio.shield(result)
            except asyncio.CancelledError:
                if not future.cancel():  # already running: a thread cannot be interrupted, so wait it out
                    await asyncio.wait([result])
                    if not result.cancelled():
                        result.exception()  # retrieved: nobody wants it any more
                raise

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


async def _all_or_nothing(work: Sequence[Awaitable[T]]) -> list[T]:
    """Every result in order, or the first failure with the rest cancelled (their decodes skipped or dropped)."""
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        pending = [task for task in tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    failures = [task.exception() for task in tasks if not task.cancelled()]  # also marks each as retrieved
    first = next((error for error in failures if error is not None), None)
    if first is not None:
        raise first
    return [task.result() for task in tasks]
