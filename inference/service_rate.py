"""How fast the pipeline drains work, measured while it is busy: the basis of deadline-aware admission.

A fixed count of queued images bounds latency only by accident: 64 small JPEGs take a second, 64 large 16-bit
PNGs several. So admission asks "how long would a new image wait?" = (work ahead of it) x (seconds the
pipeline spends per image), where the seconds per image come from what the pipeline actually achieved on
the recent mix: the busy time between consecutive batch completions divided by the images they completed.
That interval includes everything that kept the next batch from starting sooner (decoding, memory waits,
decode threads competing with inference for the cores), which the inference time alone would hide.

Pure and synchronous (the caller passes the clock), so tests drive it with made-up times.
"""

from __future__ import annotations

import math

DEFAULT_ALPHA = 0.2  # weight of the newest batch in the moving average


class ServiceRate:
    """An exponentially weighted moving average of busy seconds per completed item."""

    def __init__(self, *, alpha: float = DEFAULT_ALPHA) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self._alpha = alpha
        self._seconds_per_item: float | None = None
        self._mark: float | None = None  # start of the busy interval the next completion closes

    @property
    def seconds_per_item(self) -> float | None:
        """The current estimate, or None before any batch completed (and nothing was seeded)."""
        return self._seconds_per_item

    def seed(self, seconds_per_item: float) -> None:
        """A first guess (e.g. the warm-up inference) until real batches have been measured."""
        if self._seconds_per_item is None and seconds_per_item > 0 and math.isfinite(seconds_per_item):
            self._seconds_per_item = seconds_per_item

    def busy(self, now: float) -> None:
        """Work arrived: the interval starts now unless one is already open."""
        if self._mark is None:
            self._mark = now

    def idle(self) -> None:
        """Nothing is left: time until the next arrival is not the pipeline's doing."""
        self._mark = None

    def completed(self, items: int, now: float, run_seconds: float) -> None:
        """A batch of `items` finished at `now` after `run_seconds` inside the model."""
        if items < 1:
            return
        interval = run_seconds if self._mark is None else now - self._mark
        sample = max(interval, run_seconds) / items
        previous = self._seconds_per_item
        self._seconds_per_item = sample if previous is None else self._alpha * sample + (1 - self._alpha) * previous
        self._mark = now

    def wait_s(self, items_ahead: int) -> float | None:
        """Expected seconds until an item behind `items_ahead` others starts; None without an estimate."""
        if self._seconds_per_item is None:
            return None
        return max(0, items_ahead) * self._seconds_per_item
