"""Decode benchmark: each codec's own decode against the project's whole decode to model input, in ONE run.

    python -m loadtest.bench_decode --images tests/data/xray --out loadtest/results

The image set (`loadtest.images.realistic_image_set`, also the admission benchmark's) is built from the
FracAtlas radiographs in --images (CC BY 4.0, attribution in tests/data/xray/README.md and in the output) at
real radiograph sizes, never upsampled: JPEG grey and RGB from 512 px to the largest source's own 2304x2880,
8-bit and 16-bit (12-bit content) PNG at 2000x2500, and DICOM at 2000x2500 (12-bit and 16-bit uncompressed;
RLE, JPEG-LS and JPEG 2000 lossless where the encoders are installed; JPEG lossless has no encoder here).

Per image it reports the time of the codec the project decodes with (Pillow ``Image.open().load()`` with the
project's JPEG draft; Pillow for PNG; pydicom ``dcmread`` + ``pixel_array`` for DICOM), ``prepare_image``'s
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

from PIL import Image

from inference.preprocessing import prepare_image
from loadtest.images import ATTRIBUTION, DICOM_TYPE, realistic_image_set


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
