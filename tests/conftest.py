"""Shared test fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import pytest

# Fixtures of the real servers some tests drive (PostgreSQL; Orthanc, a PACS), for any test module to ask for.
pytest_plugins = ["postgres_server", "orthanc_fixtures"]

# Every app a test builds (and every `bfd serve` it starts) keeps its results in a throwaway SQLite file,
# never in the working directory; tests that care pass their own BFD_DATABASE_URL / database_url.
_RESULTS = tempfile.mkdtemp(prefix="bfd-test-results-")
atexit.register(shutil.rmtree, _RESULTS, ignore_errors=True)
os.environ.setdefault("BFD_DATABASE_URL", f"sqlite+aiosqlite:///{_RESULTS}/results.sqlite3")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _give_memory_back() -> Iterator[None]:
    """After each test that ran TensorFlow, hand its freed memory back (cycles collected, heap trimmed).

    Real ResNet50 conversions run one after another in one process: without this the process keeps every
    test's high-water mark, and a whole run needed about 12 GB; with it each test starts from what is alive.
    """
    yield
    if "tensorflow" in sys.modules:
        from export.memory import release_memory

        release_memory()
