"""pytest fixtures for a real Orthanc (loadtest/orthanc.py); a test module imports the ones it uses.

Where Orthanc or its DICOMweb plugin is missing the tests skip with a loud reason, or fail when
BFD_REQUIRE_ORTHANC=1 (CI sets it, so a runner without Orthanc cannot pass by skipping).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from loadtest.orthanc import OrthancServer, OrthancUnavailable, orthanc_available

REQUIRE_ENV = "BFD_REQUIRE_ORTHANC"


def skip_or_fail(reason: str) -> None:
    """Skip loudly, or fail when BFD_REQUIRE_ORTHANC=1."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"Orthanc is required here ({REQUIRE_ENV}=1) but cannot run: {reason}")
    pytest.skip(f"!!! Orthanc tests SKIPPED: {reason} !!!")


def require_orthanc() -> None:
    """Skip (or fail) the calling test or fixture when Orthanc cannot run here."""
    reason = orthanc_available()
    if reason is not None:
        skip_or_fail(reason)


def started_orthanc(**options: Any) -> OrthancServer:
    """A started OrthancServer (options as for its constructor); skips or fails when it cannot start."""
    require_orthanc()
    server = OrthancServer(**options)
    try:
        server.__enter__()
    except OrthancUnavailable as error:
        skip_or_fail(str(error))
    return server


@pytest.fixture(scope="module")
def orthanc() -> Iterator[OrthancServer]:
    """One Orthanc for the module (AE title ORTHANC, no modalities: tests add theirs with set_modality)."""
    server = started_orthanc()
    try:
        yield server
    finally:
        server.__exit__(None, None, None)
