"""The node's audit log: one JSON line per event, so who sent what, what came of it and where it went can be
traced for every study.

Events: `received` (a study's instances, the calling AE and host, the door), `answered` (the result, model
name/version/sha256 and thresholds in force, the SOP Instance UIDs produced), `refused` (instances not
analysed and why), `delivery` (each attempt: destination, UIDs, status). UIDs identify objects, not people:
no patient name, ID, birth date or accession number is ever written here (tests/test_dicom_node.py reads
the whole file for them).
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class AuditLog:
    """Appends JSON lines to `path` (created with its folder); writes are whole lines, from any thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            log.error("audit log folder %s cannot be made: %s", self.path.parent, error)

    def write(self, event: str, **fields: Any) -> None:
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event, **fields}
        line = json.dumps(record, ensure_ascii=True, default=str) + "\n"
        with self._lock:
            try:
                with self.path.open("a", encoding="ascii") as handle:
                    handle.write(line)
            except OSError as error:  # an audit that cannot be written is loud, but never stops the node
                log.error("audit log %s not written (%s): %s", self.path, error, event)

    def read(self) -> list[dict[str, Any]]:
        """Every record so far (for tests and operators)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="ascii").splitlines() if line.strip()]
