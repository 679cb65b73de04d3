"""Shared test fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# Every app a test builds (and every `bfd serve` it starts) keeps its results in a throwaway SQLite file,
# never in the working directory; tests that care pass their own BFD_DATABASE_URL / database_url.
_RESULTS = tempfile.mkdtemp(prefix="bfd-test-results-")
atexit.register(shutil.rmtree, _RESULTS, ignore_errors=True)
os.environ.setdefault("BFD_DATABASE_URL", f"sqlite+aiosqlite:///{_RESULTS}/results.sqlite3")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
