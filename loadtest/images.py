"""The image sets the benchmarks send: radiographs of the repository re-encoded, never upsampled past real sizes.

`make_uploads`: each FracAtlas radiograph of a folder as JPEG at longest sides of 500 to 2500 px (the load and
service benchmarks' friendly set). `realistic_image_set`: what hospital traffic looks like, decode-heavy: JPEG
512-2880 px grey and RGB, 8-bit and 16-bit (12-bit content) PNG and DICOM at 2000x2500 (uncompressed, RLE,
JPEG-LS and JPEG 2000 where the encoders are installed). The radiographs are FracAtlas's, CC BY 4.0.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ATTRIBUTION = (
    "Images: FracAtlas (Abedeen et al., Scientific Data 10, 521 (2023), doi:10.1038/s41597-023-02432-4), "
    "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/), re-encoded and resized here; see "
    "tests/data/xray/README.md."
)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
SIZES_PX = (500, 1000, 1500, 2000, 2500)


def model_inputs(folder: Path, resize: str = "bilinear") -> np.ndarray:
    """The radiographs of `folder` prepared once, as the service prepares them: (N, 224, 224, 3) uint8."""
    from inference.preprocessing import prepare_image_file

    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no PNG/JPEG images under {folder}")
    return np.stack([prepare_image_file(p, resize=resize).pixels for p in paths])  # type: ignore[arg-type]


def make_uploads(folder: Path) -> list[tuple[str, bytes]]:
    """Each source radiograph re-encoded as JPEG with its longest side at each of SIZES_PX."""
    uploads = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        with Image.open(path) as source:
            grey = source.convert("L")
            for side in SIZES_PX:
                scale = side / max(grey.size)
                resized = grey.resize((round(grey.width * scale), round(grey.height * scale)), Image.Resampling.LANCZOS)
                buffer = io.BytesIO()
                resized.save(buffer, format="JPEG", quality=90)
                uploads.append((f"{path.stem}_{side}.jpg", buffer.getvalue()))
    return uploads


def make_uploads_at(folder: Path, sizes: Sequence[int]) -> list[tuple[str, bytes]]:
    """`make_uploads`, keeping only the chosen longest sides."""
    wanted = tuple(f"_{side}.jpg" for side in sizes)
    return [upload for upload in make_uploads(folder) if upload[0].endswith(wanted)]


JPEG_SIDES_PX = (512, 1024, 1500, 2000, 2500)  # longest side; sources are only ever scaled down
TARGET_SIZE = (2000, 2500)  # width, height of the PNG and DICOM versions: a typical DR detector image
DICOM_TYPE, PNG_TYPE, JPEG_TYPE = "application/dicom", "image/png", "image/jpeg"


def _sources(folder: Path) -> list[Image.Image]:
    """The radiographs of `folder` as grey images, largest first."""
    images = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        with Image.open(path) as img:
            images.append(img.convert("L"))
    return sorted(images, key=lambda img: -img.width * img.height)


def _encoded(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def _scaled(img: Image.Image, side: int) -> Image.Image:
    scale = side / max(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)


def high_depth(img: Image.Image, size: tuple[int, int], bits: int = 12) -> np.ndarray:
    """A `bits`-bit version at `size` (width, height) resampled in float from the 8-bit grey source, so its
    low bits hold real detail (uint16)."""
    top = float((1 << bits) - 1)
    values = Image.fromarray(np.asarray(img, dtype=np.float32) * (top / 255), mode="F").resize(
        size, Image.Resampling.BICUBIC
    )
    return np.clip(np.rint(np.asarray(values)), 0, top).astype(np.uint16)


def _dicom_files(pixels: np.ndarray) -> list[tuple[str, bytes]]:
    """2000x2500 DX files: uncompressed 12-bit with a window, 16-bit full range, and lossless compressed copies."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import get_encoder
    from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

    def dataset(values: np.ndarray, bits: int, **tags: Any) -> Dataset:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")  # DX
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", "MONOCHROME2", 1
        ds.Rows, ds.Columns = values.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        ds.PixelData = values.tobytes()
        return ds

    def encoded(ds: Dataset) -> bytes:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    files = [
        ("dicom-12bit-window-uncompressed", encoded(dataset(pixels, 12, WindowCenter=2000, WindowWidth=3500))),
        ("dicom-16bit-uncompressed", encoded(dataset((pixels.astype(np.uint32) * 16).astype(np.uint16), 16))),
    ]
    for syntax, label in [(RLELossless, "rle"), (JPEGLSLossless, "jpegls"), (JPEG2000Lossless, "jpeg2000")]:
        if get_encoder(syntax).is_available:
            ds = dataset(pixels, 12, WindowCenter=2000, WindowWidth=3500)
            ds.compress(syntax, pixels)
            files.append((f"dicom-12bit-{label}", encoded(ds)))
    return files


def realistic_image_set(folder: Path) -> list[tuple[str, bytes, str]]:
    """(name, bytes, content type) of radiographs at real sizes: JPEG 512-2880 px grey and RGB, PNG, DICOM."""
    sources = _sources(Path(folder))
    largest = sources[0]
    images: list[tuple[str, bytes, str]] = []
    for side in (*[s for s in JPEG_SIDES_PX if s <= max(largest.size)], max(largest.size)):
        grey = largest if side == max(largest.size) else _scaled(largest, side)
        size = f"{grey.width}x{grey.height}"
        images.append((f"jpeg-grey-{size}", _encoded(grey, "JPEG", quality=90), JPEG_TYPE))
        images.append((f"jpeg-rgb-{size}", _encoded(grey.convert("RGB"), "JPEG", quality=90), JPEG_TYPE))
    small = next((img for img in sources[1:] if max(img.size) < 512), None)
    if small is not None:  # the common FracAtlas file: small, RGB-encoded, at its own size
        images.append((f"jpeg-rgb-{small.width}x{small.height}", _encoded(small.convert("RGB"), "JPEG"), JPEG_TYPE))
    grey = largest.resize(TARGET_SIZE, Image.Resampling.LANCZOS)
    twelve = high_depth(largest, TARGET_SIZE)
    images.append(("png-8bit-2000x2500", _encoded(grey, "PNG"), PNG_TYPE))
    images.append(("png-16bit-2000x2500", _encoded(Image.fromarray(twelve), "PNG"), PNG_TYPE))
    images.append(("png-rgb-2000x2500", _encoded(grey.convert("RGB"), "PNG"), PNG_TYPE))
    images.extend((name, data, DICOM_TYPE) for name, data in _dicom_files(twelve))
    return images
