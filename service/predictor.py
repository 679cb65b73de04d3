"""The predictor: admission, decoding in a thread pool, the batcher feeding the engine, and the answers.

Order of work for a request, chosen so overload costs little (see shared PEERS.md):
1. `admit()` reserves queue slots BEFORE the body is read or decoded, so a refused request costs ~nothing;
2. the images are decoded in the decode pool (off the event loop), all of them before any inference;
3. each image is submitted to the batcher; its one inference thread runs routing-then-specialist on batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.answers import image_prediction
from service.batching import BatcherClosedError, BatchStats, DynamicBatcher, Ticket
from service.bundle import Bundle
from service.engine import Engine
from service.errors import InferenceFailedError, ServiceError, from_image_error
from service.metrics import Metrics
from service.pipeline import ItemPrediction, predict_batch
from service.preprocessing import ImageError, PreparedImage, prepare_image
from service.schemas import ImagePrediction, Timings
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    """One image as it arrived."""

    data: bytes
    name: str
    body_part: str | None = None


@dataclass(frozen=True)
class _Item:
    pixels: np.ndarray  # (224, 224, 3) uint8
    hint: str | None
    want_feature_map: bool


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
        """Decode every upload, then run them through the batcher; answers in upload order.

        Any bad image fails the whole request with its 4xx before any inference runs.
        """
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
            items = [_Item(p.pixels, u.body_part, False) for p, u in zip(prepared, uploads, strict=True)]
        except BaseException:
            release_all(tickets)
            raise
        answers = await asyncio.gather(
            *(self._submit(ticket, item) for ticket, item in zip(tickets, items, strict=True))
        )
        finished = time.perf_counter()
        results = []
        for upload, answer in zip(uploads, answers, strict=True):
            timings = Timings(
                decode_ms=(decoded - started) * 1e3,
                queue_ms=max(0.0, (finished - decoded) * 1e3 - answer.inference_ms),
                inference_ms=answer.inference_ms,
                total_ms=(finished - started) * 1e3,
                batch_size=answer.batch_size,
            )
            results.append(image_prediction(self.manifest, answer.prediction, upload.name, timings))
        self.metrics.images.inc(len(results))
        return results

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
        )
        elapsed_ms = (time.perf_counter() - started) * 1e3
        return [_Answer(p, elapsed_ms, len(items)) for p in predictions]

    def _on_batch(self, stats: BatchStats) -> None:
        if stats.size:
            self.metrics.batch_size.observe(stats.size)
            self.metrics.inference_seconds.observe(stats.run_seconds)
        if stats.skipped:
            self.metrics.skipped.inc(stats.skipped)
