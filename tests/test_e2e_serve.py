"""End to end: `bfd export --demo` then `bfd serve` as real processes, a real JPEG over real HTTP."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from in_flight import predictions_in_flight

from loadtest.servers import BFD, Server, bfd_serve

XRAY = Path(__file__).parent / "data" / "xray"  # FracAtlas, CC BY 4.0: see tests/data/xray/README.md

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "demo"
    result = subprocess.run([*BFD, "export", "--demo", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained=false" in result.stdout
    return out


@pytest.fixture(scope="module")
def server(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # BFD_MAX_BATCH_SIZE: settings come from the environment too. A generous deadline: these tests are about
    # answers and draining, and a slow machine must not turn their bursts into 503s (tests/test_admission*.py).
    env = {"BFD_MAX_BATCH_SIZE": "8", "BFD_MAX_QUEUE_WAIT_MS": "60000"}
    with bfd_serve(demo_bundle, tmp_path_factory.mktemp("serve"), env=env) as served:
        yield served


def test_serve_answers_a_real_jpeg(server: Server) -> None:
    url = server.url
    path = sorted(XRAY.rglob("*.jpg"))[0]
    response = httpx.post(f"{url}/v1/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")}, timeout=60)
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    assert prediction["image_name"] == path.name
    assert prediction["body_part"]["label"] in ("elbow", "hand", "shoulder")
    assert 0.0 <= prediction["fracture"]["probability"] <= 1.0
    assert prediction["model"]["trained"] is False
    assert prediction["model"]["graph"] == "fused"
    assert any("UNTRAINED" in warning for warning in prediction["warnings"])
    models = httpx.get(f"{url}/v1/models", timeout=10).json()
    assert models["batching"]["max_batch_size"] == 8
    bad = httpx.post(f"{url}/v1/predict", files={"file": ("x.jpg", b"\xff\xd8\xff garbage")}, timeout=10)
    assert bad.status_code == 422


def test_predict_cli_in_process_and_remote(demo_bundle: Path, server: Server) -> None:
    url = server.url
    path = sorted(XRAY.rglob("*.jpg"))[0]
    local = subprocess.run([*BFD, "predict", str(path), "--bundle", str(demo_bundle)], capture_output=True, text=True)
    remote = subprocess.run([*BFD, "predict", str(path), "--url", url], capture_output=True, text=True)
    assert local.returncode == 0, local.stderr[-2000:]
    assert remote.returncode == 0, remote.stderr[-2000:]
    import json

    local_answer, remote_answer = json.loads(local.stdout), json.loads(remote.stdout)
    assert local_answer["body_part"] == remote_answer["body_part"]
    assert local_answer["fracture"]["probability"] == pytest.approx(remote_answer["fracture"]["probability"], abs=1e-6)


def _dicom_from_jpeg(path: Path, body_part: str) -> bytes:
    """The FracAtlas JPEG's pixels as an 8-bit MONOCHROME2 DX DICOM file (no patient data)."""
    import io

    import numpy as np
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined = "DX", body_part
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_clinical_features_on_the_demo_bundle(server: Server) -> None:
    """Heatmap, study, DICOM in and out, and abstention on the real (untrained) ResNet50 demo bundle."""
    import base64
    import io

    import pydicom
    from PIL import Image

    url = server.url
    paths = sorted((XRAY / "hand").rglob("*.jpg"))[:2]
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    with httpx.Client(base_url=url, timeout=120) as client:
        answer = client.post("/v1/predict?heatmap=true", files=files[:1]).json()["predictions"][0]
        heatmap = answer["heatmap"]
        assert len(heatmap["grid"]) == 7
        assert all(len(row) == 7 for row in heatmap["grid"])
        overlay = Image.open(io.BytesIO(base64.b64decode(heatmap["overlay_png_base64"])))
        assert overlay.size == (heatmap["width"], heatmap["height"])
        assert isinstance(answer["abstained"], bool)
        assert answer["abstention_reason"] if answer["abstained"] else answer["abstention_reason"] is None

        study = client.post("/v1/studies", files=files)
        assert study.status_code == 200, study.text
        assert study.json()["study"]["images"] == 2
        assert study.json()["model"]["trained"] is False

        dicom = _dicom_from_jpeg(paths[0], "HAND")
        from_dicom = client.post("/v1/predict", files={"file": ("x.dcm", dicom, "application/dicom")})
        assert from_dicom.status_code == 200, from_dicom.text
        body_part = from_dicom.json()["predictions"][0]["body_part"]
        assert body_part["label"] == "hand"
        assert body_part["source"] == "dicom"
        assert body_part["router_label"] in ("elbow", "hand", "shoulder")

        capture = client.post("/v1/predict?output=dicom", files={"file": ("x.dcm", dicom, "application/dicom")})
        assert capture.status_code == 200, capture.text
        out = pydicom.dcmread(io.BytesIO(capture.content))
        assert out.StudyInstanceUID == pydicom.dcmread(io.BytesIO(dicom)).StudyInstanceUID
        assert "RESEARCH USE ONLY" in out.SeriesDescription
        assert "PatientName" not in out  # the input had none


def test_sigterm_drains_in_flight_requests_then_exits(server: Server) -> None:
    """Requests admitted before SIGTERM are all answered (graceful drain), then the process exits."""
    process, url = server.process, server.url
    path = sorted(XRAY.rglob("*.jpg"))[0]
    with predictions_in_flight(url, path.read_bytes(), 24, path.name) as burst:
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
    assert burst.statuses == [200] * 24
    assert max(burst.finished) > signalled  # some were still queued or running when the signal came
    # uvicorn drains, runs the lifespan shutdown (the batcher drains), then re-raises the signal.
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log_text()


def test_serve_refuses_a_tampered_bundle(demo_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tampered"
    shutil.copytree(demo_bundle, copy)
    with (copy / "heads.npz").open("r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    result = subprocess.run([*BFD, "serve", "--bundle", str(copy), "--port", "1"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "sha256" in result.stderr
    assert "heads.npz" in result.stderr
