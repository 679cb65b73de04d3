"""STOW-RS (PS3.18 10.5) without a web framework: the request body's DICOM parts, and the store response.

The HTTP door (`service.dicomweb_api`) reads the body under its limits and hands it here; the node takes the
instances like C-STORE ones. The response is the DICOM JSON store response: ReferencedSOPSequence for what
was accepted, FailedSOPSequence (with a Failure Reason and a warning text) for what was not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header

DICOM_MEDIA_TYPE = "application/dicom"
MAX_PARTS = 1000


class StowRequestError(ValueError):
    """The body is not a multipart/related request of application/dicom parts."""


def dicom_parts(content_type: str, body: bytes) -> list[bytes]:
    """The application/dicom parts of a multipart/related body, in order."""
    media_type, options = parse_options_header(content_type)
    if media_type != b"multipart/related":
        raise StowRequestError(
            f"content-type must be multipart/related, got {media_type.decode('latin-1') or '(none)'}"
        )
    declared = options.get(b"type", b"").strip(b'"').lower()
    if declared and declared != DICOM_MEDIA_TYPE.encode():
        raise StowRequestError(f"multipart/related type must be {DICOM_MEDIA_TYPE}, got {declared.decode('latin-1')}")
    boundary = options.get(b"boundary")
    if not boundary:
        raise StowRequestError("multipart/related without a boundary parameter")
    parts: list[bytes] = []
    types: list[str] = []
    chunks: list[bytes] = []
    headers: dict[str, str] = {}
    field: list[bytes] = []
    value: list[bytes] = []

    def on_part_begin() -> None:
        chunks.clear()
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.append(data[start:end])

    def on_header_end() -> None:
        headers[b"".join(field).decode("latin-1").lower()] = b"".join(value).decode("latin-1").strip()
        field.clear()
        value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunks.append(data[start:end])

    def on_part_end() -> None:
        if len(parts) >= MAX_PARTS:
            raise StowRequestError(f"more than {MAX_PARTS} parts in one request")
        types.append(headers.get("content-type", "").split(";")[0].strip().lower())
        parts.append(b"".join(chunks))

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except StowRequestError:
        raise
    except Exception as error:  # python-multipart's own parse errors
        raise StowRequestError(f"malformed multipart body: {error}") from error
    if not parts:
        raise StowRequestError("the multipart body holds no part")
    wrong = sorted({t or "(none)" for t in types if t != DICOM_MEDIA_TYPE})
    if wrong:
        raise StowRequestError(f"every part must be {DICOM_MEDIA_TYPE}; got {', '.join(wrong)}")
    return parts


@dataclass(frozen=True)
class StoredInstance:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class FailedInstance:
    sop_class_uid: str
    sop_instance_uid: str
    failure_reason: int  # a C-STORE status (PS3.18 Table 10.5.3-1: 0xA700, 0x0122, 0xC000, ...)
    reason: str


def store_response(stored: Sequence[StoredInstance], failed: Sequence[FailedInstance]) -> dict[str, Any]:
    """The DICOM JSON store response (00081199 referenced, 00081198 failed with a Failure Reason each).

    The reasons in words go in the HTTP `Warning` header (`warning_text`), as PS3.18 10.5.3 allows.
    """
    response: dict[str, Any] = {}
    if stored:
        response["00081199"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": {"vr": "UI", "Value": [s.sop_class_uid]},
                    "00081155": {"vr": "UI", "Value": [s.sop_instance_uid]},
                }
                for s in stored
            ],
        }
    if failed:
        response["00081198"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": {"vr": "UI", "Value": [f.sop_class_uid] if f.sop_class_uid else []},
                    "00081155": {"vr": "UI", "Value": [f.sop_instance_uid] if f.sop_instance_uid else []},
                    "00081197": {"vr": "US", "Value": [f.failure_reason]},
                }
                for f in failed
            ],
        }
    return response


def warning_text(failed: Sequence[FailedInstance]) -> str:
    """The failures in words for a `Warning: 299` header (ASCII, one line, bounded)."""
    text = "; ".join(f"{f.sop_instance_uid or 'part'}: {f.reason}" for f in failed)
    return text.encode("ascii", "replace").decode("ascii").replace("\r", " ").replace("\n", " ")[:1000]
