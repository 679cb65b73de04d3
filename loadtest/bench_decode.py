"""Decode benchmark: each codec's own decode against the project's whole decode to model input, in ONE run.

    python -m loadtest.bench_decode --images tests/data/xray --out loadtest/results

The image set (`realistic_image_set`, reused by the load benchmark) is built from the FracAtlas radiographs
in --images (CC BY 4.0, attribution in tests/data/xray/README.md and in the output) at real radiograph
sizes, never upsampled: JPEG grey and RGB from 512 px to the largest source's own 2304x2880, 8-bit and
16-bit (12-bit content) PNG at 2000x2500, and DICOM at 2000x2500 (12-bit and 16-bit uncompressed; RLE,
JPEG-LS and JPEG 2000 lossless where the encoders are installed; JPEG lossless has no encoder here).

Per image it reports the time of the codec the project decodes with (Pillow ``Image.open().load()`` with the
project's JPEG draft; Pillow for PNG; pydicom ``dcmread`` + ``pixel_array``
for DICOM), ``prepare_image``'s
time (header plan, decode, grey, 8-bit scaling, resize to 224, replication) and their ratio. Times are the
median of --repeats runs, codec and project alternating so both see the same machine state.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.preprocessing import prepare_image

ATTRIBUTION = (
    "Radiographs from FracAtlas (Abedeen et al., Scientific Data 10, 521 (2023), doi:10.1038/s41597-023-02432-4), "
    "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/); re-encoded and resized here."
)
JPEG_SIDES_PX = (512, 1024, 1500, 2000, 2500)  # longest side; sources are only ever scaled down
TARGET_SIZE = (2000, 2500)  # width, height of the PNG and DICOM versions: a typical DR detector image
DICOM_TYPE, PNG_TYPE, JPEG_TYPE = "application/dicom", "image/png", "image/jpeg"


def _sources(folder: Path) -> list[Image.Image]:
    """The radiographs of `folder` as grey images, largest first."""
    images = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"}):
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


def _twelve_bit(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A 12-bit version at `size` resampled in float from the 8-bit source, so its low bits hold real detail."""
    values = Image.fromarray(np.asarray(img, dtype=np.float32) * (4095 / 255), mode="F").resize(
        size, Image.Resampling.BICUBIC
    )
    return np.clip(np.rint(np.asarray(values)), 0, 4095).astype(np.uint16)


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
    twelve = _twelve_bit(largest, TARGET_SIZE)
    images.append(("png-8bit-2000x2500", _encoded(grey, "PNG"), PNG_TYPE))
    images.append(("png-16bit-2000x2500", _encoded(Image.fromarray(twelve), "PNG"), PNG_TYPE))
    images.append(("png-rgb-2000x2500", _encoded(grey.convert("RGB"), "PNG"), PNG_TYPE))
    images.extend((name, data, DICOM_TYPE) for name, data in _dicom_files(twelve))
    return images


def _codecs(data: bytes, content_type: str, size: int = 224) -> dict[str, Callable[[], object]]:
    """The codec decode the project relies on for `data` first (same JPEG draft), then the alternative one."""
    if content_type == DICOM_TYPE:

        def pydicom_decode() -> object:
            from pydicom import dcmread

            ds = dcmread(io.BytesIO(data))
            ds.pixel_array_options(index=0)
            return ds.pixel_array

        return {"pydicom": pydicom_decode}

    def pillow() -> object:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft("L" if img.mode == "L" else "RGB", (2 * size, 2 * size))
            img.load()
            return img.size

    return {"pillow": pillow}


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 2)


def measure(images: list[tuple[str, bytes, str]], repeats: int) -> list[dict[str, Any]]:
    """Per image: the codec the project uses (ms), the project's whole decode (ms), their ratio, the other codec."""
    rows = []
    for name, data, content_type in images:
        codecs = _codecs(data, content_type)
        steps = {**codecs, "project": lambda: prepare_image(data, dicom=content_type == DICOM_TYPE)}  # noqa: B023
        for step in steps.values():  # warm-up: plugins imported, caches filled
            step()
        runs: dict[str, list[float]] = {label: [] for label in steps}
        for _ in range(repeats):
            for label, step in steps.items():
                started = time.perf_counter()
                step()
                runs[label].append(time.perf_counter() - started)
        codec, *others = codecs
        codec_ms, project_ms = _median_ms(runs[codec]), _median_ms(runs["project"])
        rows.append(
            {
                "image": name,
                "content_type": content_type,
                "bytes": len(data),
                "codec": codec,
                "codec_ms": codec_ms,
                "project_ms": project_ms,
                "ratio": round(project_ms / codec_ms, 3),
                "overhead_pct": round((project_ms - codec_ms) / codec_ms * 100, 1),
                "other_codec": {other: _median_ms(runs[other]) for other in others},
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], repeats: int) -> str:
    lines = [
        "# Decode: codec vs the project's decode to model input",
        "",
        f"Median of {repeats} runs each, codecs and project alternating, one process on {platform.machine()}.",
        "codec: what the project decodes with: Pillow `open().load()` with the project's JPEG draft; for PNG"
        " Pillow; pydicom `dcmread` + `pixel_array` (first"
        " frame) for DICOM. project: `prepare_image` (plan, decode, grey, 8 bits, resize to 224x224, 3 channels).",
        "",
        "| image | bytes | codec | codec ms | project ms | ratio | overhead | other codec ms |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        other = ", ".join(f"{name} {ms}" for name, ms in row["other_codec"].items())
        lines.append(
            f"| {row['image']} | {row['bytes']:,} | {row['codec']} | {row['codec_ms']} | {row['project_ms']} "
            f"| {row['ratio']} | {row['overhead_pct']}% | {other} |"
        )
    return "\n".join([*lines, "", ATTRIBUTION, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path("tests/data/xray"))
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    images = realistic_image_set(args.images)
    rows = measure(images, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"attribution": ATTRIBUTION, "repeats": args.repeats, "machine": platform.platform(), "rows": rows}
    (args.out / "bench_decode.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "bench_decode.md").write_text(markdown(rows, args.repeats))
    print(markdown(rows, args.repeats))  # the CLI's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
