"""Compressed DICOM frames decode in worker processes: same pixels, no event-loop stall, a crash is contained.

JPEG 2000's codec holds the GIL while it decodes; in a decode thread one large frame froze the event loop for
as long as the decode took. The stall is measured here as a ratio of the decode's own duration (never an
absolute time), with a ticker task that records the longest gap between its wake-ups.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from factories import build_tiny_bundle, serving
from PIL import Image

from inference.codec_pool import CodecPool
from inference.dicom import decode_first_frame
from inference.dicom_header import DicomError, parse_dicom
from inference.preprocessing import prepare_image

pytestmark = pytest.mark.anyio
XRAY = Path(__file__).parent / "data" / "xray"  # FracAtlas, CC BY 4.0: see tests/data/xray/README.md


def jpeg2000_dicom(size: tuple[int, int] = (1600, 2000)) -> bytes:
    """A 12-bit DX of a real radiograph, JPEG 2000 lossless: a codec that holds the GIL for its whole decode."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    source = max(XRAY.rglob("*.jpg"), key=lambda p: p.stat().st_size)
    with Image.open(source) as img:
        grey = np.asarray(img.convert("L").resize(size), dtype=np.uint16) * 16
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", "MONOCHROME2", 1
    ds.Rows, ds.Columns = grey.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = grey.tobytes()
    ds.compress(JPEG2000Lossless, grey)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def crash_on_request(data: bytes, force: bool) -> tuple[np.ndarray, str]:
    """A worker that dies like a codec segfaulting on hostile data when the data says so (fault injection)."""
    if data == b"crash":
        os._exit(11)
    return decode_first_frame(parse_dicom(data, force=force))


def test_pool_decodes_the_same_pixels_and_refuses_corrupt_data() -> None:
    data = jpeg2000_dicom((400, 500))
    pool = CodecPool(1)
    try:
        pooled = prepare_image(data, dicom=True, frame_decoder=pool.frame_decoder(data, True))
        corrupt = data[: len(data) - 2000] + b"\x00" * 2000  # the codestream's tail overwritten
        with pytest.raises(DicomError):
            pool.decode(corrupt, True)
    finally:
        pool.close()
    local = prepare_image(data, dicom=True)
    assert np.array_equal(pooled.pixels, local.pixels)
    assert pooled.dicom is not None
    assert local.dicom is not None
    assert pooled.dicom.transfer_syntax == local.dicom.transfer_syntax


def test_a_crashing_codec_is_contained_and_the_pool_rebuilt() -> None:
    data = jpeg2000_dicom((300, 400))
    pool = CodecPool(1, worker=crash_on_request)
    try:
        with pytest.raises(DicomError, match="crashed its decoder"):
            pool.decode(b"crash", True)
        assert pool.crashes == 2  # it was tried once more on a fresh pool, and crashed that one too
        array, photometric = pool.decode(data, True)  # the next image decodes on a new pool
    finally:
        pool.close()
    assert array.shape == (400, 300)
    assert photometric == "MONOCHROME2"


async def test_a_jpeg2000_upload_does_not_stall_the_event_loop(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path)
    data = jpeg2000_dicom()
    async with serving(bundle, decode_processes=1) as (_, client):
        warm = await client.post("/v1/predict", content=data, headers={"content-type": "application/dicom"})
        assert warm.status_code == 200, warm.text  # the first compressed frame starts the worker
        worst = 0.0
        done = asyncio.Event()

        async def tick() -> None:
            nonlocal worst
            while not done.is_set():
                before = time.perf_counter()
                await asyncio.sleep(0.002)
                worst = max(worst, time.perf_counter() - before)

        ticker = asyncio.create_task(tick())
        started = time.perf_counter()
        response = await client.post("/v1/predict", content=data, headers={"content-type": "application/dicom"})
        took = time.perf_counter() - started
        done.set()
        await ticker
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["dicom"]["transfer_syntax"] == "1.2.840.10008.1.2.4.90"
    assert worst < 0.25 * took, f"the event loop stalled {worst * 1e3:.0f} ms of a {took * 1e3:.0f} ms request"
