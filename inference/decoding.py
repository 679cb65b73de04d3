"""Decoding as admitted work: a bounded pool, a memory budget, codec workers, and cancellation that sticks.

Every image is planned from its header first (`plan_decode`: pixels, samples, bytes, the working memory its
decode will need; refused over the per-image limit), then waits for that memory under the global decode
budget, then decodes in one of a fixed number of slots. Work enters the thread pool only through those
slots, so nothing ever queues inside the executor's own (unbounded, uncancellable once running) queue: a
request that is cancelled while it waits leaves before it costs anything, and a slot with its memory is
held until its thread has really finished, even when its caller was cancelled meanwhile. Compressed DICOM
frames, whose codecs hold the GIL, are decoded in worker processes (`inference.codec_pool`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from inference.bundle import InputContract
from inference.codec_pool import CodecPool
from inference.config import PredictorConfig
from inference.events import PredictorEvents
from inference.memory_budget import ByteBudget
from inference.preprocessing import DecodePlan, PreparedImage, plan_decode, prepare_image

T = TypeVar("T")


class Decoder:
    """Turns uploaded bytes into model inputs under the pool, slot and memory bounds of one predictor."""

    def __init__(self, contract: InputContract, config: PredictorConfig, events: PredictorEvents) -> None:
        self.contract = contract
        self.config = config
        self.events = events
        threads = config.resolved_decode_threads()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self._slots = asyncio.Semaphore(threads)
        processes = config.resolved_decode_processes()
        self.codec_pool = CodecPool(processes) if processes else None
        self.memory = ByteBudget(config.decode_memory_budget_bytes, "decode memory budget")

    async def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.codec_pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.codec_pool.close)

    async def decode(self, data: bytes, *, dicom: bool = False, display: bool = False) -> PreparedImage:
        """Plan from the header, wait for the memory the decode needs, then decode in a slot.

        `display` also returns the grey image at the heatmap overlay's size. Raises an ImageError.
        """
        config, contract = self.config, self.contract
        display_side = config.heatmap_max_side if display else None
        started = False  # set by the decode thread itself: a decode cancelled before it ran was skipped
        pool = self.codec_pool

        def run(plan: DecodePlan) -> PreparedImage:
            nonlocal started
            started = True
            return prepare_image(
                data,
                size=contract.height,
                resize=contract.resize,
                max_pixels=config.max_pixels,
                display_max_side=display_side,
                dicom=dicom,
                max_decode_bytes=config.max_image_decode_bytes,
                plan=plan,
                frame_decoder=None if pool is None else pool.frame_decoder(data, dicom),
            )

        try:
            plan = await self.in_pool(
                lambda: plan_decode(
                    data,
                    dicom=dicom,
                    size=contract.height,
                    max_pixels=config.max_pixels,
                    max_decode_bytes=config.max_image_decode_bytes,
                    display_max_side=display_side,
                )
            )
            async with self.memory.hold(self._working_bytes(plan)):
                return await self.in_pool(lambda: run(plan))
        except asyncio.CancelledError:
            if not started:
                self.events.decode_skipped()
            raise

    def _working_bytes(self, plan: DecodePlan) -> int:
        """The plan's working memory, plus the frame's trip back from a codec worker (pickled, then unpickled)."""
        header = plan.dicom
        if self.codec_pool is None or header is None or not header.encapsulated:
            return plan.working_bytes
        frame = header.rows * header.columns * header.samples * header.bytes_per_sample
        return min(plan.working_bytes + 2 * frame, self.memory.total)

    async def in_pool(self, work: Callable[[], T]) -> T:
        """Run `work` in the decode pool once a slot is free; the slot (and whatever memory the caller holds) is
        kept until the thread has really finished, even when the caller is cancelled meanwhile."""
        async with self._slots:
            future = self._pool.submit(work)
            result = asyncio.wrap_future(future)
            try:
                return await asyncio.shield(result)
            except asyncio.CancelledError:
                if not future.cancel():  # already running: a thread cannot be interrupted, so wait it out
                    await asyncio.wait([result])
                    if not result.cancelled():
                        result.exception()  # retrieved: nobody wants it any more
                raise


async def all_or_nothing(work: Sequence[Awaitable[T]]) -> list[T]:
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
