"""Text a DICOM peer chose (AE titles, pynetdicom's messages about its PDUs) made safe for one log line.

A calling AE title is whatever bytes the peer put in its A-ASSOCIATE-RQ: a newline in it forged a log line, and
pynetdicom logged a full traceback for each malformed request. Here control characters are escaped, the text
is shortened, and pynetdicom's log records lose their tracebacks (the exception's type and message stay).
"""

from __future__ import annotations

import logging

MAX_CHARS = 300
_ESCAPES = {i: f"\\x{i:02x}" for i in [*range(0x20), 0x7F]} | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def printable(text: str, limit: int = MAX_CHARS) -> str:
    """`text` on one line: control characters escaped, at most `limit` characters (the rest counted)."""
    escaped = text.translate(_ESCAPES)
    if len(escaped) <= limit:
        return escaped
    return f"{escaped[:limit]}... ({len(escaped) - limit} more characters)"


class OneLineRecords(logging.Filter):
    """Makes every record of the logger it is on one printable line without a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            message = f"{message} ({type(error).__name__}: {error})"
        record.msg, record.args = printable(message), None
        record.exc_info = record.exc_text = None
        record.stack_info = None
        return True


def quiet_pynetdicom() -> None:
    """pynetdicom's records, from any of its loggers, one printable line each (idempotent)."""
    logger = logging.getLogger("pynetdicom")
    if not any(isinstance(f, OneLineRecords) for f in logger.filters):
        logger.addFilter(OneLineRecords())
