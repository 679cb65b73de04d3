"""Decoding as admitted work: a bounded pool, a memory budget, codec workers, and cancellation that sticks.

Every image is planned from its header first (`plan_decode`: pixels, samples, bytes, the working memory its
decode will need; refused over the per-image limit), then waits for that memory under the global decode
budget, then decodes in one of a fixed number of slots. Planning a DICOM file parses it, which allocates
about the file's size (and, deflated, its inflated size): that parse runs under a hold of the budget too,
sized before it starts from the file's length (`inference.dicom_file` caps what a parse can take beyond it),
and the hold then grows to the decode's working memory without waiting; when it cannot, the parsed data set
is let go and the image waits in line for its whole working memory, to be parsed again. No image ever holds
memory while it waits for more, so images cannot hold each other up. Work enters the thread pool only through those
slots, so nothing ever queues inside the executor's own (unbounded, uncancellable once running) queue: a
request that is cancelled while it waits leaves before it costs anything, and a slot with its memory is
held until its thread has really finished, even when its caller was cancelled meanwhile. Compressed DICOM
frames, whose codecs hold the GIL, are decoded in worker processes (`inference.codec_pool`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

from inference.bundle import InputContract
from inference.codec_pool import CodecPool
from inference.config import PredictorConfig
from inference.decode_plan import with_slack
from inference.dicom_file import InflationNotBudgetedError, inflation_cap, looks_like_dicom, parse_overhead_bytes
from inference.dicom_header import read_dataset
from inference.events import PredictorEvents
from inference.memory_budget import BudgetExceededError, ByteBudget
from inference.preprocessing import DecodePlan, PreparedImage, plan_decode, prepare_image

# A deflated data set is held twice while parsed: pydicom's inflated buffer and the values read from it.
INFLATED_COPIES = 2

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

        held = 0
        try:
            plan, held = await self._plan(data, dicom, display_side)
            return await self.in_pool(lambda: run(plan))
        except asyncio.CancelledError:
            if not started:
                self.events.decode_skipped()
            raise
        finally:
            self.memory.give(held)

    async def _plan(self, data: bytes, dicom: bool, display_side: int | None) -> tuple[DecodePlan, int]:
        """The plan, and the bytes now held for its decode (the caller gives them back).

        The parse is made under `_parsed`'s hold, which then becomes the decode's working memory: grown without
        waiting, or, when that cannot be, given back whole (the parsed data set with it) before waiting in line."""
        config = self.config
        plan_with = partial(
            plan_decode,
            data,
            dicom=dicom,
            size=self.contract.height,
            max_pixels=config.max_pixels,
            max_decode_bytes=config.max_image_decode_bytes,
            display_max_side=display_side,
        )
        plan, held = await self._parsed(data, dicom, lambda inflation: plan_with(inflation_budget_bytes=inflation))
        working = self._working_bytes(plan)
        if working <= held:
            self.memory.give(held - working)  # the parse was held for more than the decode needs
            return plan, working
        if not held:  # nothing held: wait in line for it, as every decode does
            await self.memory.take(working)
            return plan, working
        try:
            self.memory.try_take(working - held)
        except BudgetExceededError:  # never wait while holding: let the parse go and wait in line for it all
            self.memory.give(held)
            plan = replace(plan, dicom=None)  # prepare_image parses it again, under the whole hold
            await self.memory.take(working)
        return plan, working

    async def read_header(self, data: bytes, *, force: bool, extract: Callable[[Any], T]) -> T:
        """`extract(dataset)` of `data`'s DICOM data set read without its pixel data, in a slot under a hold of the
        decode budget (a door's look at an instance's attributes: never on the event loop, whatever its size or
        layout); `extract` runs there too, so only what it returns outlives the hold. ImageError if unreadable."""
        read = partial(
            read_dataset,
            data,
            force=force,
            max_inflated_bytes=inflation_cap(self.config.max_image_decode_bytes),
            stop_before_pixels=True,
        )
        found, held = await self._parsed(data, True, lambda inflation: extract(read(inflation_budget_bytes=inflation)))
        self.memory.give(held)
        return found

    async def _parsed(self, data: bytes, dicom: bool, parse: Callable[[int], T]) -> tuple[T, int]:
        """`parse(inflation_budget_bytes)` in a slot under a hold of what parsing `data` can allocate, and the bytes
        still held (the caller gives them back). A deflated DICOM first says how far it inflates (nothing kept)
        and is parsed again under a hold that covers that too; a failure holds nothing."""
        wanted = parse_hold_bytes(data, dicom)
        inflation = 0  # none at first: most files are not deflated
        while True:
            held = min(wanted, self.memory.total)
            if held:  # PNG and JPEG headers are read lazily: they plan without holding (or waiting for) anything
                await self.memory.take(held)
            try:
                return await self.in_pool(partial(parse, inflation)), held
            except InflationNotBudgetedError as needed:
                self.memory.give(held)
                inflation = needed.inflated_bytes
                wanted += INFLATED_COPIES * inflation
            except BaseException:  # a refused image, or the request cancelled: nothing stays held
                self.memory.give(held)
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


def parse_hold_bytes(data: bytes, dicom: bool) -> int:
    """What planning `data` can allocate before its plan says more: a DICOM parse copies every value of the file
    and builds pydicom's objects (capped by `inference.dicom_file`); Pillow reads PNG and JPEG headers lazily."""
    if not (dicom or looks_like_dicom(data)):
        return 0
    return with_slack(len(data) + parse_overhead_bytes(len(data)))


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
