"""Hostile and malformed uploads, generated in code, each with the HTTP status the service answers it with.

`hostile_cases()` is used by tests/test_hostile_decoding.py (through `prepare_image`) and by the end-to-end
test against a real server. Every case is small (at most a few MB) and generated in well under a second;
the decompression bombs declare gigabytes of decoded pixels and must be refused from their headers.

The statuses hold for the service's defaults (`SERVICE_LIMITS`: `max_pixels` 50 M, `max_image_decode_bytes`
400 MB) and for any decode budget down to 32 MB: the 413 cases need far more, the others declare little.

Also here: `radiograph` / `encode` to build DICOM files, and `measure_decode`, which runs one decode in a
fresh child process and reports its real peak memory (Pillow's buffers are invisible to tracemalloc, so the
RSS high-water mark is read).
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

DICOM = "application/dicom"
PNG = "image/png"
JPEG = "image/jpeg"
DIGITAL_XRAY = UID("1.2.840.10008.5.1.4.1.1.1.1")
SERVICE_LIMITS = {"max_pixels": 50_000_000, "max_decode_bytes": 400_000_000}
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class HostileCase:
    """One upload the service must refuse, and how."""

    name: str
    body: bytes
    content_type: str  # "application/dicom", "image/png", "image/jpeg"
    expected_status: frozenset[int]  # what the service answers, e.g. {422}, {413}, {415}
    note: str = ""  # what is wrong with it, for failure messages


# --- DICOM builders ------------------------------------------------------------------------------------------------


def radiograph(
    pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **tags: object
) -> Dataset:
    """A minimal DX dataset (Explicit VR Little Endian) holding `pixels` uncompressed.

    `pixels`: (rows, columns) or (frames, rows, columns) grey of uint8/uint16/int16, or (rows, columns, 3)
    colour. Tags override the defaults (NumberOfFrames is set when `pixels` has a frame axis and is grey).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DIGITAL_XRAY
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DIGITAL_XRAY
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
    frames = pixels.ndim == 3 and not colour
    rows, columns = pixels.shape[1:3] if frames else pixels.shape[:2]
    ds.Rows, ds.Columns = int(rows), int(columns)
    if frames:
        ds.NumberOfFrames = int(pixels.shape[0])
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    bits = 8 * pixels.dtype.itemsize
    stored = bits_stored if bits_stored is not None else (8 if bits == 8 else 12)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, stored, stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds["PixelData"].VR = "OW" if bits > 8 else "OB"  # explicit, so a broken BitsAllocated can still be written
    return ds


def encode(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file: 128-byte preamble, 'DICM', file meta, data set."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def encapsulated(ds: Dataset, syntax: str, frames: list[bytes]) -> bytes:
    """`ds` with its pixel data replaced by these compressed frames under `syntax`, encoded."""
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    return encode(ds)


def patched(data: bytes, placeholder: bytes, replacement: bytes) -> bytes:
    """Replace a value written as a valid placeholder by bytes pydicom would refuse to write (same length)."""
    assert len(placeholder) == len(replacement), "a patch must keep element lengths"
    assert data.count(placeholder) == 1, f"placeholder {placeholder!r} must occur exactly once"
    return data.replace(placeholder, replacement)


def _grey(rows: int = 64, columns: int = 64) -> np.ndarray:
    ramp = np.linspace(100, 3000, columns)[None, :] + np.zeros((rows, 1))
    return np.rint(ramp).astype(np.uint16)


def _with(mutate: Callable[[Dataset], object], pixels: np.ndarray | None = None) -> bytes:
    ds = radiograph(_grey() if pixels is None else pixels)
    mutate(ds)
    return encode(ds)


def _retagged(keyword_tag: int, vr: str, value: object) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        del ds[keyword_tag]
        ds.add_new(keyword_tag, vr, value)

    return mutate


def _nested_undefined(depth: int) -> bytes:
    """ContentSequence nested `depth` levels, undefined lengths (pydicom parses these while reading)."""
    head = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack(
        "<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    tail = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return head * depth + tail * depth


def _nested_defined(depth: int) -> bytes:
    """ContentSequence nested `depth` levels, defined lengths (pydicom parses these lazily, level by level)."""
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
        inner = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, len(item)) + item
    return inner


def _insert_before_pixel_data(data: bytes, element: bytes) -> bytes:
    at = data.index(struct.pack("<HH", 0x7FE0, 0x0010))
    return data[:at] + element + data[at:]


def rle_bomb(rows: int = 7000, columns: int = 7000, samples: int = 3, bits: int = 16) -> bytes:
    """An RLE DICOM whose segments are all maximal replicate runs: 4.6 MB declaring 7000x7000 RGB 16-bit.

    Every 2 bytes (0x81 = repeat 128 times, then the byte) decode to 128 bytes, the most PS3.5 G.3.1
    allows, so the segments are consistent with the header: only the decode budget can refuse it.
    """
    per_segment = rows * columns
    runs, rest = divmod(per_segment, 128)
    segment = b"\x81\x00" * runs + (bytes([257 - rest, 0]) if rest > 1 else b"\x00\x00" if rest else b"")
    count = samples * bits // 8
    offsets = [64 + i * len(segment) for i in range(count)]
    header = struct.pack("<16I", count, *offsets, *([0] * (15 - count)))
    ds = radiograph(np.zeros((2, 2, 3) if samples == 3 else (2, 2), dtype=np.uint16), photometric="RGB")
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    return encapsulated(ds, RLELossless, [header + segment * count])


def _rle_frame(segments: list[bytes]) -> bytes:
    offsets, position = [], 64
    for segment in segments:
        offsets.append(position)
        position += len(segment)
    return struct.pack("<16I", len(segments), *offsets, *([0] * (15 - len(segments)))) + b"".join(segments)


def _jpeg(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.arange(size * size) % 251).astype(np.uint8).reshape(size, size)).save(buffer, "JPEG")
    return buffer.getvalue()


def _j2k_codestream(width: int, height: int, components: int = 1, bits: int = 8) -> bytes:
    """SOC + SIZ (ISO 15444-1 A.5.1) + EOC: enough for the size check, which runs before any decoder."""
    siz = struct.pack(">HIIIIIIIIH", 0, width, height, 0, 0, width, height, 0, 0, components)
    siz += bytes([bits - 1, 1, 1]) * components
    return b"\xff\x4f\xff\x51" + struct.pack(">H", len(siz) + 2) + siz + b"\xff\xd9"


def _jpegls_codestream(width: int, height: int, components: int = 1, bits: int = 8) -> bytes:
    """SOI + SOF55 + SOS (ISO 14495-1) + EOI: the JPEG-LS frame header the size check reads."""
    sof = struct.pack(">BHHB", bits, height, width, components)
    sof += b"".join(bytes([i + 1, 0x11, 0]) for i in range(components))
    sos = bytes([components]) + b"".join(bytes([i + 1, 0]) for i in range(components)) + b"\x00\x00\x00"
    return (
        b"\xff\xd8\xff\xf7"
        + struct.pack(">H", len(sof) + 2)
        + sof
        + b"\xff\xda"
        + struct.pack(">H", len(sos) + 2)
        + sos
        + b"\xff\xd9"
    )


def deflate_bomb(
    inflated_bytes: int = 450_000_000, *, preamble: bool = True, group_length: bool = True, meta_padding: int = 0
) -> bytes:
    """A Deflated Explicit VR Little Endian file whose data set inflates to `inflated_bytes` (a private OB of zeros).

    Deflate after a full flush restarts with an empty history, so one compressed megabyte of zeros can be
    repeated: about 1 kB per inflated MB. The layouts a pre-scan of the first bytes missed: no preamble, no
    (0002,0000) group length, or a File Meta Information Version `meta_padding` bytes long, which puts the
    transfer syntax past byte 4096.
    """
    ds = radiograph(np.zeros((8, 8), dtype=np.uint8))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    plain = io.BytesIO()
    ds.save_as(plain, enforce_file_format=True, implicit_vr=False, little_endian=True)
    body = plain.getvalue()
    meta_end = 144 + struct.unpack_from("<I", body, 140)[0]
    chunk = 1 << 20
    count = inflated_bytes // chunk
    head = body[meta_end:].split(struct.pack("<HH", 0x7FE0, 0x0010))[0]
    pixel = body[meta_end + len(head) :]
    private = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 8) + b"HOSTILE "
    big = struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, count * chunk)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = compressor.compress(head + private + big) + compressor.flush(zlib.Z_FULL_FLUSH)
    zeros = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    end = compressor.compress(pixel) + compressor.flush()
    meta = DicomBytesIO()
    meta.write(b"\x00" * 128 + b"DICM" if preamble else b"")  # without: the meta group from byte 0
    file_meta = ds.file_meta
    if meta_padding:
        file_meta.FileMetaInformationVersion = b"\x00\x01" + b"\x00" * meta_padding
    if group_length and not meta_padding:
        write_file_meta_info(meta, file_meta, enforce_standard=True)
    else:
        if "FileMetaInformationGroupLength" in file_meta:
            del file_meta.FileMetaInformationGroupLength
        if not group_length:
            file_meta.FileMetaInformationVersion = b"\x00\x01"
        write_file_meta_info(meta, file_meta, enforce_standard=False)
    return meta.getvalue() + start + zeros * count + end


def element_bomb(elements: int = 500_000) -> bytes:
    """A DICOM radiograph followed by `elements` empty private elements: 8 bytes each in the file, about 300
    bytes each of pydicom's objects (an 8 MB file took 300 MB and 40 s to parse)."""
    body = encode(radiograph(_grey(64, 64)))
    tags = ((group, element) for group in range(0x0011, 0x7FE0, 2) for element in range(0x1000, 0x1100))
    empty = b"".join(struct.pack("<HH2sH", g, e, b"LO", 0) for (g, e), _ in zip(tags, range(elements), strict=False))
    pixel = body.index(struct.pack("<HH", 0x7FE0, 0x0010))
    return body[:pixel] + empty + body[pixel:]


# --- PNG / JPEG builders -------------------------------------------------------------------------------------------


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def png_claiming_size(width: int, height: int, mode: str = "L") -> bytes:
    """A valid 1x1 PNG whose IHDR is patched (CRC fixed) to declare width x height: a tiny IDAT, a huge image."""
    data = bytearray(_png(Image.new(mode, (1, 1))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _jpeg_with_sof(height: int, width: int, components: int | None = None) -> bytes:
    data = bytearray(_jpeg(32))
    at = data.index(b"\xff\xc0") + 5  # SOF0: marker, length (2), precision (1), then height, width, components
    data[at : at + 4] = struct.pack(">HH", height, width)
    if components is not None:
        data[at + 4] = components
    return bytes(data)


# --- the cases -----------------------------------------------------------------------------------------------------


@cache
def hostile_cases() -> list[HostileCase]:
    """Every hostile case, generated once per process (the whole list takes well under a second)."""
    f422, f413, f415 = frozenset({422}), frozenset({413}), frozenset({415})
    good = encode(radiograph(_grey()))
    cases = [
        HostileCase("dicom-rows-two-values", _with(lambda ds: setattr(ds, "Rows", [64, 64])), DICOM, f422),
        HostileCase("dicom-rows-a-string", _with(_retagged(0x00280010, "LO", "abc")), DICOM, f422),
        HostileCase("dicom-rows-negative", _with(_retagged(0x00280010, "SS", -64)), DICOM, f422),
        HostileCase("dicom-rows-zero", _with(lambda ds: setattr(ds, "Rows", 0)), DICOM, f422),
        HostileCase("dicom-rows-missing", _with(lambda ds: delattr(ds, "Rows")), DICOM, f422),
        HostileCase(
            "dicom-absurd-size",
            _with(_set(Rows=65535, Columns=65535)),
            DICOM,
            f413,
        ),
        HostileCase("dicom-bits-allocated-77", _with(lambda ds: setattr(ds, "BitsAllocated", 77)), DICOM, f422),
        HostileCase("dicom-bits-allocated-a-string", _with(_retagged(0x00280100, "LO", "sixteen")), DICOM, f422),
        HostileCase("dicom-bits-stored-over-allocated", _with(lambda ds: setattr(ds, "BitsStored", 20)), DICOM, f422),
        HostileCase("dicom-samples-per-pixel-2", _with(lambda ds: setattr(ds, "SamplesPerPixel", 2)), DICOM, f422),
        HostileCase(
            "dicom-samples-per-pixel-two-values", _with(lambda ds: setattr(ds, "SamplesPerPixel", [1, 1])), DICOM, f422
        ),
        HostileCase(
            "dicom-pixel-representation-7", _with(lambda ds: setattr(ds, "PixelRepresentation", 7)), DICOM, f422
        ),
        HostileCase(
            "dicom-photometric-unknown", _with(lambda ds: setattr(ds, "PhotometricInterpretation", "HSV")), DICOM, f422
        ),
        HostileCase(
            "dicom-rgb-with-one-sample", _with(lambda ds: setattr(ds, "PhotometricInterpretation", "RGB")), DICOM, f422
        ),
        HostileCase(
            "dicom-voi-lut-sequence-empty", _with(lambda ds: setattr(ds, "VOILUTSequence", Sequence([]))), DICOM, f422
        ),
        HostileCase(
            "dicom-voi-lut-sequence-without-data", _with(_lut_item_without_data("VOILUTSequence")), DICOM, f422
        ),
        HostileCase("dicom-voi-lut-bits-9", _with(_lut_item_bits("VOILUTSequence", 9)), DICOM, f422),
        HostileCase(
            "dicom-modality-lut-sequence-empty",
            _with(lambda ds: setattr(ds, "ModalityLUTSequence", Sequence([]))),
            DICOM,
            f422,
        ),
        HostileCase(
            "dicom-modality-lut-without-data", _with(_lut_item_without_data("ModalityLUTSequence")), DICOM, f422
        ),
        HostileCase(
            "dicom-window-centre-not-a-number",
            patched(_with(_window("9876.543", "500")), b"9876.543", b"abcdefgh"),
            DICOM,
            f422,
        ),
        HostileCase(
            "dicom-window-width-second-value-text",
            patched(_with(_window("2000", ["100", "1234"])), b"100\\1234", b"100\\abcd"),
            DICOM,
            f422,
        ),
        HostileCase(
            "dicom-window-centre-infinite",
            patched(_with(_window("9876.543", "500")), b"9876.543", b"inf     "),
            DICOM,
            f422,
        ),
        HostileCase(
            "dicom-rescale-slope-not-a-number",
            patched(_with(_rescale("1.234567", "0")), b"1.234567", b"abcdefgh"),
            DICOM,
            f422,
        ),
        HostileCase("dicom-rescale-intercept-two-values", _with(_rescale("1", ["0", "1"])), DICOM, f422),
        HostileCase(
            "dicom-number-of-frames-not-a-number",
            patched(_with(lambda ds: setattr(ds, "NumberOfFrames", "87654321")), b"87654321", b"abcdefgh"),
            DICOM,
            f422,
        ),
        HostileCase(
            "dicom-nested-2000-levels-undefined-length",
            _insert_before_pixel_data(good, _nested_undefined(2000)),
            DICOM,
            f422,
        ),
        HostileCase(
            "dicom-nested-200-levels-defined-length", _insert_before_pixel_data(good, _nested_defined(200)), DICOM, f422
        ),
        HostileCase("dicom-truncated-in-pixel-data", good[: len(good) - 3000], DICOM, f422),
        HostileCase("dicom-truncated-in-header", good[:300], DICOM, f422),
        HostileCase(
            "dicom-pixel-data-shorter-than-declared",
            _with(_set(Rows=512, Columns=512)),
            DICOM,
            f422,
        ),
        HostileCase(
            "dicom-multi-frame-declared-data-missing",
            _with(lambda ds: setattr(ds, "NumberOfFrames", 1000)),
            DICOM,
            f422,
        ),
        HostileCase("dicom-no-pixel-data", _with(lambda ds: delattr(ds, "PixelData")), DICOM, f422),
        HostileCase("dicom-float-pixel-data-16-bits", _float_data_with_bits(16), DICOM, f422),
        HostileCase("dicom-rle-bomb-7000x7000-rgb-16bit", rle_bomb(), DICOM, f413, "4.6 MB declaring 1.18 GB"),
        HostileCase(
            "dicom-rle-segment-count-mismatch",
            encapsulated(radiograph(_grey(512, 512)), RLELossless, [_rle_frame([b"\x81\x00" * 2048])]),
            DICOM,
            f422,
        ),
        HostileCase(
            "dicom-rle-segment-too-short-for-its-size",
            encapsulated(radiograph(_grey(512, 512)), RLELossless, [_rle_frame([b"\x81\x00" * 50, b"\x81\x00" * 50])]),
            DICOM,
            f422,
            "100-byte segments cannot decode to 512x512 bytes",
        ),
        HostileCase(
            "dicom-jpeg-sof-disagrees-with-rows",
            encapsulated(_header_only(512, 512, 8), JPEGBaseline8Bit, [_jpeg(64)]),
            DICOM,
            f422,
        ),
        HostileCase(
            "dicom-jpeg2000-siz-disagrees-with-rows",
            encapsulated(_header_only(512, 512, 16), JPEG2000Lossless, [_j2k_codestream(64, 64, bits=12)]),
            DICOM,
            f422,
        ),
        HostileCase(
            "dicom-jpegls-sof-disagrees-with-columns",
            encapsulated(_header_only(64, 640, 16), JPEGLSLossless, [_jpegls_codestream(64, 64, bits=12)]),
            DICOM,
            f422,
        ),
        HostileCase(
            "dicom-jpeg-frame-is-not-a-codestream",
            encapsulated(_header_only(64, 64, 8), JPEGBaseline8Bit, [b"\x00" * 100]),
            DICOM,
            f422,
        ),
        HostileCase("dicom-encapsulation-broken", _broken_encapsulation(), DICOM, f422),
        HostileCase("dicom-private-transfer-syntax", _private_syntax(), DICOM, f415),
        HostileCase("dicom-deflate-bomb-450MB", deflate_bomb(), DICOM, f413, "450 kB inflating to 450 MB"),
        HostileCase(
            "dicom-deflate-bomb-no-preamble",
            deflate_bomb(preamble=False),
            DICOM,
            f413,
            "meta from byte 0: the old guard counted nothing",
        ),
        HostileCase(
            "dicom-deflate-bomb-no-group-length",
            deflate_bomb(group_length=False),
            DICOM,
            f413,
            "no (0002,0000): the old guard counted nothing",
        ),
        HostileCase(
            "dicom-deflate-bomb-syntax-past-4k",
            deflate_bomb(meta_padding=5000),
            DICOM,
            f413,
            "the transfer syntax UID past byte 4096",
        ),
        HostileCase(
            "dicom-element-bomb-500k-empty-elements", element_bomb(), DICOM, f422, "4 MB: 150 MB of pydicom objects"
        ),
        HostileCase("dicom-random-bytes", _random(4096, seed=7), DICOM, f422),
        HostileCase("dicom-zero-bytes", b"", DICOM, f422),
        HostileCase("png-ihdr-60000x60000-tiny-idat", png_claiming_size(60000, 60000), PNG, f413),
        HostileCase("png-16bit-declaring-8000x8000", png_claiming_size(8000, 8000, "I;16"), PNG, f413),
        HostileCase(
            "png-declaring-7000x7000-rgba",
            png_claiming_size(7000, 7000, "RGBA"),
            PNG,
            f413,
            "49 Mpx, under the pixel limit, over the decode budget",
        ),
        HostileCase("png-truncated", _png(_noise(256))[:-2000], PNG, f422),
        HostileCase("png-rgb-truncated", _png(_noise(256).convert("RGB"))[:-2000], PNG, f422, "RGB PNG"),
        HostileCase("png-zero-bytes", b"", PNG, f422),
        HostileCase("png-random-bytes", _random(4096, seed=1), PNG, f422),
        HostileCase("png-signature-only", b"\x89PNG\r\n\x1a\n", PNG, f422),
        HostileCase("jpeg-sof-zero-size", _jpeg_with_sof(0, 0), JPEG, f422),
        HostileCase("jpeg-sof-zero-components", _jpeg_with_sof(32, 32, components=0), JPEG, f422),
        HostileCase("jpeg-sof-declaring-65000x65000", _jpeg_with_sof(65000, 65000), JPEG, f413),
        HostileCase("jpeg-truncated", _jpeg(256)[:300], JPEG, f422),
        HostileCase("jpeg-soi-only", b"\xff\xd8\xff", JPEG, f422),
        HostileCase("bmp-sent-as-png", _bmp(), PNG, f415),
    ]
    names = [case.name for case in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    return cases


def _set(**values: object) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return mutate


def _window(centre: object, width: object) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        ds.WindowCenter, ds.WindowWidth = centre, width

    return mutate


def _rescale(slope: object, intercept: object) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept

    return mutate


def _lut_item_without_data(keyword: str) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        item = Dataset()
        item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor, VR given (it is ambiguous)
        setattr(ds, keyword, Sequence([item]))

    return mutate


def _lut_item_bits(keyword: str, bits: int) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        setattr(ds, keyword, Sequence([lut_item([4096, 0, bits], list(range(4096)))]))

    return mutate


def lut_item(descriptor: list[int], data: list[int]) -> Dataset:
    """A Modality/VOI LUT Sequence item; LUT Descriptor and LUT Data have ambiguous VRs, so both are given."""
    item = Dataset()
    item.add_new(0x00283002, "US", descriptor)
    item.add_new(0x00283006, "US", data)
    return item


def _header_only(rows: int, columns: int, bits: int) -> Dataset:
    ds = radiograph(np.zeros((2, 2), dtype=np.uint8 if bits == 8 else np.uint16), bits_stored=min(bits, 12))
    ds.Rows, ds.Columns = rows, columns
    return ds


def _broken_encapsulation() -> bytes:
    """Encapsulated pixel data whose frame item has lost its item tag."""
    data = encapsulated(_header_only(32, 32, 8), JPEGBaseline8Bit, [_jpeg(32)])
    pixel = data.index(struct.pack("<HH", 0x7FE0, 0x0010))
    frame_item = data.index(b"\xfe\xff\x00\xe0", data.index(b"\xfe\xff\x00\xe0", pixel) + 4)
    return data[:frame_item] + b"\x12\x34\x56\x78" + data[frame_item + 4 :]


def _private_syntax() -> bytes:
    ds = radiograph(np.zeros((8, 8), dtype=np.uint16))
    ds.file_meta.TransferSyntaxUID = UID("1.2.826.0.1.3680043.9.9999.4.1")
    ds.PixelData = encapsulate([b"\xff\x0a" + b"\x00" * 30])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


def _float_data_with_bits(bits: int) -> bytes:
    ds = radiograph(np.zeros((8, 8), dtype=np.uint16))
    del ds.PixelData
    del ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = bits
    ds.FloatPixelData = np.zeros((8, 8), dtype=np.float32).tobytes()
    return encode(ds)


def _random(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _noise(side: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (side, side), dtype=np.uint8))


def _bmp() -> bytes:
    buffer = io.BytesIO()
    _noise(16).save(buffer, "BMP")
    return buffer.getvalue()


# --- measuring a decode --------------------------------------------------------------------------------------------

_CHILD = r"""
import gc, json, sys
from inference.preprocessing import ImageError, plan_decode, prepare_image
from service.errors import http_status

def status_kb(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))

data = open(sys.argv[1], "rb").read()
kwargs = json.loads(sys.argv[2])
prepare_image(open(sys.argv[3], "rb").read(), dicom=kwargs.get("dicom", False))  # load codecs and plugins
gc.collect()
with open("/proc/self/clear_refs", "w") as fh:  # "5": reset the peak RSS (VmHWM) to the current RSS
    fh.write("5")
before = status_kb("VmRSS")
answer = {"before_rss": before, "status": 200, "estimate": None}
try:
    plan = plan_decode(data, **{k: v for k, v in kwargs.items() if k != "resize"})
    answer["estimate"] = plan.working_bytes
    prepare_image(data, plan=plan, **kwargs)
except ImageError as error:
    answer["status"] = http_status(error)
    answer["reason"] = error.reason
answer["peak_rise"] = status_kb("VmHWM") - before
print(json.dumps(answer))
"""


def measure_decode(body: bytes, **kwargs: object) -> dict[str, object]:
    """Plan and decode `body` in a fresh Python process; its RSS high-water rise, status and the plan's estimate.

    The child first decodes a tiny image of the same kind (so codec libraries are loaded before measuring),
    then resets the kernel's peak-RSS mark (/proc/self/clear_refs; ru_maxrss would carry the parent's peak
    across fork and exec), plans, decodes, and reports ``peak_rise`` = VmHWM - VmRSS before planning: every
    byte the planning and the decode had resident at their peak, Pillow's and the codecs' C buffers included.
    """
    dicom = bool(kwargs.get("dicom", False))
    warm = encode(radiograph(_grey(8, 8))) if dicom else _png(Image.new("L", (8, 8)))
    with tempfile.TemporaryDirectory() as folder:
        path, warm_path = Path(folder) / "body", Path(folder) / "warm"
        path.write_bytes(body)
        warm_path.write_bytes(warm)
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path), json.dumps(kwargs), str(warm_path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"the measuring child failed: {done.stderr[-2000:]}")
    answer: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer
