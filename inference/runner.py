"""The core for synchronous callers: a Predictor on its own event-loop thread, one call per image.

The desktop window and `bfd predict` run images in-process without a web server: they get the same answers as
the HTTP API because they call the same Predictor (the same admission, decoding, batching and answers), just
not through HTTP.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Self, TypeVar

from inference.bundle import load_bundle
from inference.config import PredictorConfig
from inference.predictor import Predictor, Upload
from inference.results import ImagePrediction

T = TypeVar("T")


class LocalPredictor:
    """A started Predictor on `bundle`; `predict()` blocks until the answer (or the core's error) is there."""

    def __init__(self, bundle: Path, config: PredictorConfig | None = None) -> None:
        self.bundle = Path(bundle)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bfd-local-predictor", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            loaded = load_bundle(self.bundle)
            self.predictor = Predictor(loaded, config or PredictorConfig())
            self._run(self.predictor.start())  # the bundle is loaded and warmed up here
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def predict(
        self, data: bytes, name: str, *, body_part: str | None = None, heatmap: bool = False, dicom: bool = False
    ) -> ImagePrediction:
        """One image's answer (an ImageError, QueueFullError, ... of the core when it cannot have one)."""
        if self._closed:
            raise RuntimeError("this LocalPredictor is closed")
        upload = Upload(data, name, body_part, heatmap, dicom)

        async def one() -> ImagePrediction:
            (answer,) = await self.predictor.predict(self.predictor.admit(1), [upload])
            return answer

        return self._run(one())

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self.predictor.stop())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
