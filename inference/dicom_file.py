"""Reading a DICOM Part 10 file with pydicom, bounded by construction: inflation and element count.

Two ways a small file made pydicom allocate without bound, each now stopped where the memory is taken:
- **Inflation.** pydicom inflates a Deflated Explicit VR Little Endian data set in one `zlib.decompress` call,
  however large the result: a 1.5 MB upload inflated to 1.5 GB. A guard that looks for the transfer syntax
  in the first bytes is one layout away from being bypassed (no preamble, no group length, a long meta
  group), so none is trusted here: the file meta is read first with pydicom's own reader (exactly what
  pydicom decides from) and, when it names the deflated syntax, the rest is inflated here by a decompressor
  whose output is capped (`zlib.decompressobj().decompress(data, max_length)`): once counting, keeping
  nothing, so a file past the cap is refused before any memory is taken and a caller that budgets memory
  learns the exact size first (InflationNotBudgetedError), then keeping what it counted. The inflated data set
  is parsed as the explicit VR little endian data set it is: pydicom is never handed a deflated stream.
- **Element count.** Each element costs pydicom about 300 bytes of Python objects whatever its value: an 8 MB
  file of empty elements took 300 MB and 40 s of CPU to parse. Every read pydicom makes goes through a
  reader that stops the parse past `MAX_READS` (real radiographs need a few hundred), so a file's parse
  costs at most its own bytes plus `parse_overhead_bytes(len(data))`, a bound known before it starts.

Every failure is a DicomError with a reason (ImageTooLargeError past a cap), never a pydicom exception.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from typing import Any

from inference.errors import ImageTooLargeError, UndecodableImageError

DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"
DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"
INFLATE_CHUNK_BYTES = 1 << 20
# pydicom reads an element in one to three calls (tag and VR, length, value); real radiograph headers have a
# few hundred elements, enhanced multi-frame headers some thousands.
MAX_READS = 100_000
# Measured: pydicom keeps 300 bytes of objects per element besides its value (tracemalloc), 360 by peak RSS.
BYTES_PER_ELEMENT = 400
MIN_ELEMENT_BYTES = 8  # tag (4) + VR (2) + length (2): the smallest element a file can hold
DEFAULT_MAX_INFLATED_BYTES = 100_000_000


class DicomError(UndecodableImageError):
    """The DICOM file cannot become an image: malformed, inconsistent, truncated or without pixel data.

    Files too large to decode raise ImageTooLargeError, transfer syntaxes no installed decoder reads
    UnsupportedImageFormatError: the same errors as for PNG and JPEG.
    """


class InflationNotBudgetedError(Exception):
    """The file is deflated and inflates to `inflated_bytes`, more than the caller holds memory for: it may hold
    more and ask again."""

    def __init__(self, inflated_bytes: int) -> None:
        super().__init__(f"the deflated data set inflates to {inflated_bytes:,} bytes")
        self.inflated_bytes = inflated_bytes


@dataclass(frozen=True, eq=False)
class Part10:
    """A parsed file: pydicom's FileDataset and what its parse held beyond the file's own bytes."""

    dataset: Any
    inflated_bytes: int  # the inflated data set's size (0 unless deflated); pydicom holds it and its values
    elements: int  # about how many elements were read (reads / 2), for the parse's object overhead


def looks_like_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble then 'DICM'."""
    return len(data) >= DICOM_MAGIC_OFFSET + 4 and data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC


def parse_overhead_bytes(size: int) -> int:
    """The most pydicom's objects can cost beyond the values when parsing a file of `size` bytes."""
    return min(MAX_READS // 2, size // MIN_ELEMENT_BYTES + 1) * BYTES_PER_ELEMENT


def inflation_cap(max_decode_bytes: int | None) -> int:
    """The inflation allowed for a decode under a per-image limit: the decode holds the inflated data set twice
    (pydicom's buffer and the values) and its frame once more, so past a third of the limit it never fits."""
    return DEFAULT_MAX_INFLATED_BYTES if max_decode_bytes is None else max(1, max_decode_bytes // 3)


def read_part10(
    data: bytes,
    *,
    force: bool,
    max_inflated_bytes: int,
    stop_before_pixels: bool = False,
    inflation_budget_bytes: int | None = None,
) -> Part10:
    """Parse `data` (pixel data read, not decoded) within the caps: a deflated data set inflating past
    `max_inflated_bytes` is refused (ImageTooLargeError) before any of it is kept, and one inflating past
    `inflation_budget_bytes` (when given) raises InflationNotBudgetedError with its size. DicomError for what does
    not parse."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    lenient = force or not looks_like_dicom(data)
    reader = _CountingReader(data)
    try:
        preamble = read_preamble(reader, lenient)
        meta = _read_file_meta_info(reader)
        deflated = meta.get("TransferSyntaxUID") == DEFLATED_SYNTAX
        if not deflated:  # the same meta, the same decision: pydicom reads it as it is, inflating nothing
            reader.restart()
            dataset = _dcmread(reader, lenient, stop_before_pixels)
            return Part10(dataset, 0, reader.reads // 2)
        deflated_data = memoryview(data)[reader.tell() :]
        size = _inflate(deflated_data, max_inflated_bytes, len(data), keep=False).tell()
        if inflation_budget_bytes is not None and size > inflation_budget_bytes:
            raise InflationNotBudgetedError(size)
        inflated = _inflate(deflated_data, size, len(data), keep=True)
        dataset = _read_inflated(inflated, preamble, meta, stop_before_pixels)
        return Part10(dataset, size, (reader.reads + inflated.reads) // 2)
    except (InflationNotBudgetedError, ImageTooLargeError, DicomError):
        raise
    except _TooManyReadsError as error:
        raise DicomError(str(error)) from None
    except RecursionError as error:
        raise DicomError("not a readable DICOM file: its sequences are nested too deeply to read") from error
    except Exception as error:  # pydicom reports broken files with many exception types
        raise DicomError(f"not a readable DICOM file: {type(error).__name__}: {brief(error)}") from error


def _dcmread(reader: _CountingReader, force: bool, stop_before_pixels: bool) -> Any:
    import pydicom

    return pydicom.dcmread(reader, force=force, stop_before_pixels=stop_before_pixels)


def _read_inflated(inflated: _CountingReader, preamble: bytes | None, meta: Any, stop_before_pixels: bool) -> Any:
    """The inflated data set as pydicom's read_partial builds a FileDataset (explicit VR little endian)."""
    from pydicom.dataset import FileDataset
    from pydicom.filereader import read_dataset

    inflated.seek(0)
    dataset = read_dataset(inflated, False, True, stop_when=_at_pixel_data if stop_before_pixels else None)
    parsed = FileDataset(inflated, dataset, preamble, meta, False, True)
    parsed.set_original_encoding(False, True, dataset._character_set)
    return parsed


def _at_pixel_data(tag: Any, _vr: str | None, _length: int) -> bool:
    return int(tag) in (0x7FE00010, 0x7FE00008, 0x7FE00009)


def _inflate(deflated: memoryview, limit: int, sent: int, *, keep: bool) -> _CountingReader:
    """The raw-deflate stream inflated, never more than `limit` bytes (ImageTooLargeError past it); with `keep`
    False only counted: the reader's position is the size, its buffer stays empty."""
    stream = zlib.decompressobj(-zlib.MAX_WBITS)
    out = _CountingReader(b"")
    pending: bytes | memoryview = deflated
    try:
        while pending and not stream.eof:
            chunk = stream.decompress(pending, min(INFLATE_CHUNK_BYTES, limit + 1 - out.tell()))
            if keep:
                out.write(chunk)
            else:
                out.seek(len(chunk), io.SEEK_CUR)
            if out.tell() > limit:
                raise ImageTooLargeError(
                    f"the deflated DICOM data set ({sent:,} bytes sent) inflates to more than the limit of "
                    f"{limit:,} bytes"
                )
            pending = stream.unconsumed_tail
            if not chunk and not pending:
                break
    except zlib.error as error:
        raise DicomError(f"the deflated DICOM data set cannot be inflated: {error}") from error
    if not stream.eof:
        raise DicomError("the deflated DICOM data set is truncated (its deflate stream does not end)")
    return out


class _TooManyReadsError(Exception):
    pass


class _CountingReader(io.BytesIO):
    """A BytesIO that stops a parse past MAX_READS reads (each element costs pydicom one to three)."""

    def __init__(self, initial: bytes) -> None:
        super().__init__(initial)
        self.reads = 0

    def read(self, size: int | None = -1, /) -> bytes:
        self.reads += 1
        if self.reads > MAX_READS:
            raise _TooManyReadsError(
                f"the DICOM file holds more than about {MAX_READS // 2:,} elements; radiographs hold a few hundred"
            )
        return super().read(size)

    def restart(self) -> None:
        self.seek(0)
        self.reads = 0


def brief(error: BaseException, limit: int = 160) -> str:
    text = str(error)
    return text if len(text) <= limit else text[: limit - 3] + "..."
