"""Every hostile upload of tests/hostile_inputs.py is refused by `prepare_image` with its 4xx, never a 5xx.

Pinned here:

* Each case raises the ImageError subclass of its expected status (413 ImageTooLargeError, 415
  UnsupportedImageFormatError, 422 UndecodableImageError) with a reason a client can read; no other
  exception escapes (an empty VOI LUT Sequence, Rows with two values or deep nesting used to answer 500).
* The 413 cases are refused by `plan_decode` from the header alone, before any decoding.
* The decompression bombs (a 4.6 MB RLE file declaring 7000x7000 RGB 16-bit, a 450 MB deflate bomb in every
  file layout, PNG headers declaring billions of pixels, a file of 500,000 empty elements) cost the process
  almost no memory: measured as the RSS high-water
  rise of a fresh child process, they are refused by the estimate, not after allocating.
* The cases stay small, so an end-to-end test can post them all.
"""

from __future__ import annotations

import warnings

import pytest
from hostile_inputs import (
    DICOM,
    SERVICE_LIMITS,
    HostileCase,
    deflate_bomb,
    element_bomb,
    hostile_cases,
    measure_decode,
    rle_bomb,
)

from inference.dicom_file import parse_overhead_bytes
from inference.preprocessing import (
    ImageError,
    ImageTooLargeError,
    UndecodableImageError,
    UnsupportedImageFormatError,
    plan_decode,
    prepare_image,
)
from service.errors import http_status

CASES = hostile_cases()
ERROR_FOR_STATUS = {413: ImageTooLargeError, 415: UnsupportedImageFormatError, 422: UndecodableImageError}


SMALL_BUDGET_BYTES = 32_000_000  # the statuses must not depend on how the service sizes its decode budget


def _prepare(case: HostileCase, max_decode_bytes: int) -> ImageError:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom and Pillow warn about the very defects under test
        with pytest.raises(ImageError) as caught:
            prepare_image(
                case.body,
                dicom=case.content_type == DICOM,
                max_pixels=SERVICE_LIMITS["max_pixels"],
                max_decode_bytes=max_decode_bytes,
            )
    return caught.value


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_case_is_refused_with_its_status(case: HostileCase) -> None:
    for budget in (SERVICE_LIMITS["max_decode_bytes"], SMALL_BUDGET_BYTES):
        error = _prepare(case, budget)
        status = http_status(error)
        assert status in case.expected_status, f"{case.name} at {budget} bytes: {status} {error.reason}"
        assert type(error) is ERROR_FOR_STATUS[status]
        assert len(error.reason) > 10
        assert "0x7f" not in error.reason  # no object addresses for clients


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.expected_status == {413}], ids=[c.name for c in CASES if c.expected_status == {413}]
)
def test_too_large_cases_are_refused_by_the_header_alone(case: HostileCase) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageTooLargeError) as caught:
            plan_decode(case.body, dicom=case.content_type == DICOM, **SERVICE_LIMITS)
    assert http_status(caught.value) == 413


def test_rle_bomb_reason_gives_the_figure_and_the_limit() -> None:
    body = rle_bomb()
    assert len(body) < 5_000_000  # 4.6 MB on the wire ...
    with pytest.raises(ImageTooLargeError) as caught:
        plan_decode(body, dicom=True, **SERVICE_LIMITS)
    reason = caught.value.reason
    assert "7000x7000 px x 3 samples x 2 bytes" in reason
    assert "GB" in reason  # ... declaring more than a gigabyte of decode
    assert "the limit per image is 400 MB" in reason


@pytest.mark.parametrize(
    ("name", "body", "dicom"),
    [
        ("rle-bomb", rle_bomb(), True),
        ("deflate-bomb", deflate_bomb(), True),
        ("deflate-bomb-no-preamble", deflate_bomb(preamble=False), True),
        ("deflate-bomb-no-group-length", deflate_bomb(group_length=False), True),
        ("deflate-bomb-syntax-past-4k", deflate_bomb(meta_padding=5000), True),
        ("element-bomb", element_bomb(), True),
        ("png-60000x60000", next(c.body for c in CASES if c.name == "png-ihdr-60000x60000-tiny-idat"), False),
        ("png-rgba-over-budget", next(c.body for c in CASES if c.name == "png-declaring-7000x7000-rgba"), False),
    ],
)
def test_bombs_are_refused_before_allocating(name: str, body: bytes, dicom: bool) -> None:
    measured = measure_decode(body, dicom=dicom, **SERVICE_LIMITS)
    assert measured["status"] == (422 if name == "element-bomb" else 413), measured
    rise = int(measured["peak_rise"])  # type: ignore[call-overload]
    # The bombs declare 1.2 GB (RLE), 450 MB (deflate, in every layout), 3.6 Gpx (PNG), 150 MB of pydicom objects
    # (elements): the refusal costs about one copy of the body, plus the objects of the elements read before it.
    bound = 2 * len(body) + 8_000_000 + (parse_overhead_bytes(len(body)) if dicom else 0)
    assert rise < bound, f"{name}: memory rose by {rise} bytes before the refusal"


def test_cases_are_small_enough_to_post() -> None:
    assert len(CASES) >= 40
    assert max(len(case.body) for case in CASES) <= 5_000_000
    assert {case.content_type for case in CASES} == {DICOM, "image/png", "image/jpeg"}
    assert all(case.expected_status <= {413, 415, 422} for case in CASES)
