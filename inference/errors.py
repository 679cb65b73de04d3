"""The core's domain errors: what went wrong, in the core's own terms, with a reason a person can read.

No HTTP here: each door decides what an error means to its callers (`service/errors.py` is the one place that
maps these to HTTP statuses; the DICOM node maps them to DIMSE statuses). Admission refusals live with the
batcher (`inference.batching.QueueFullError`, `BatcherClosedError`) and the budgets
(`inference.memory_budget.BudgetExceededError`), which import nothing of this package.
"""

from __future__ import annotations


class InferenceError(Exception):
    """Base of the core's errors; `reason` says what was expected and what came."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def for_image(self, name: str) -> InferenceError:
        """The same error, its reason prefixed with the image it is about (answers name the bad image)."""
        named = type(self).__new__(type(self))
        InferenceError.__init__(named, f"{name}: {self.reason}")
        return named


QUOTED_CHARS = 100  # a value a client sent, as an error's reason may quote it


def shortened(value: str, limit: int = QUOTED_CHARS) -> str:
    """`value` whole when at most `limit` characters, else its start, an ellipsis and its length: `limit` at most.

    Every door passes the core's reasons on, and each quotes what a client sent: a 900 KB body part once came back
    in a 900 KB answer."""
    if len(value) <= limit:
        return value
    tail = f"… ({len(value):,} characters)"
    return value[: max(0, limit - len(tail))] + tail


def forget_traceback(error: BaseException) -> None:
    """Drop the tracebacks of `error` and of the errors it came from. A traceback holds every frame it passed
    through with their locals (an upload's bytes, a parsed data set), and the frames that caught the error hold
    it back: a cycle, freed only when the garbage collector next runs its oldest generation. Whoever keeps an
    error past its handling (to report it later) keeps only the error, then."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__


class ImageError(InferenceError, ValueError):
    """The bytes cannot become a model input."""


class UndecodableImageError(ImageError):
    """Not an image at all, or a PNG/JPEG/DICOM whose data is truncated, corrupt or inconsistent."""


class UnsupportedImageFormatError(ImageError):
    """A real image, but not PNG, JPEG or DICOM (or a DICOM transfer syntax no installed decoder reads)."""


class ImageTooLargeError(ImageError):
    """The header declares more pixels or more decode memory than allowed (checked before decoding)."""


class UnknownBodyPartError(InferenceError, ValueError):
    """A body part named by the caller that the bundle has no specialist for."""


class DicomOutputError(InferenceError, ValueError):
    """A DICOM output was asked for what cannot have one (not a DICOM input, or not exactly one image)."""


class InferenceFailedError(InferenceError):
    """The model call failed for the batch this image was in (the next batch runs as usual)."""
