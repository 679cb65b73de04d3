"""Clinical inputs and outputs over HTTP on tiny bundles: heatmaps, studies, abstention, DICOM in and out.

The tiny bundles (tests/factories.py) answer from the image's mean intensity m: the router prefers the part
whose centre (i + 0.5) / P is nearest, each specialist answers m + its offset, and the feature map is the
grey image averaged over 7x7 cells in every channel. So every expected answer is computed here directly.
"""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from factories import (
    DEFAULT_PARTS,
    HEADS_FILE,
    build_tiny_bundle,
    encode_png,
    image_for_part,
    read_manifest_json,
    serving,
    write_manifest_json,
)
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference.dicom_output import SECONDARY_CAPTURE
from inference.predictor import Predictor, Upload
from inference.preprocessing import prepare_image

pytestmark = pytest.mark.anyio

PARTS = list(DEFAULT_PARTS)
OFFSETS = {"elbow": -0.1, "hand": 0.1, "shoulder": 0.0}
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-0042"


@pytest.fixture(params=["fused", "split"])
def bundle(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    thresholds = {p: {"decision": 0.5, "high_sensitivity": 0.4, "high_specificity": 0.7} for p in PARTS}
    return build_tiny_bundle(
        tmp_path / request.param, form=request.param, specialist_offsets=OFFSETS, thresholds=thresholds
    )


@pytest.fixture
async def client(bundle: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(bundle) as (_, client):
        yield client


def png_for_part(index: int, shift: int = 0) -> bytes:
    return encode_png(image_for_part(index, len(PARTS), shift)[:60, :90])


def model_input_mean(data: bytes) -> float:
    """m: the mean of the 224x224 image the models see, in 0..1."""
    return float(prepare_image(data).pixels.mean() / 255.0)


def patterned_png() -> bytes:
    """300 x 200, dark with a bright block on the upper left: a heatmap must not be flat."""
    pixels = np.full((200, 300), 40, dtype=np.uint8)
    pixels[20:90, 30:120] = 230
    return encode_png(pixels)


# --- heatmaps ------------------------------------------------------------------------------------------------


def reference_cam(bundle: Path, part: str, data: bytes) -> np.ndarray:
    """Grad-CAM computed independently: the MLP's gradient by central differences, the map from pixels."""
    with np.load(bundle / HEADS_FILE) as heads:
        layers = [
            (heads[f"specialist/{part}/{i}/kernel"].astype(np.float64), heads[f"specialist/{part}/{i}/bias"])
            for i in range(3)
        ]

    def logits(features: np.ndarray) -> np.ndarray:
        hidden = features
        for kernel, bias in layers[:-1]:
            hidden = np.maximum(hidden @ kernel + bias, 0.0)
        return hidden @ layers[-1][0] + layers[-1][1]

    grey = prepare_image(data).pixels[:, :, 0].astype(np.float64) / 255.0
    cells = grey.reshape(7, 32, 7, 32).mean(axis=(1, 3))  # the tiny graph's feature map, one channel
    pooled = np.full(2048, cells.mean())
    step = 1e-4
    probes = np.concatenate([pooled + step * np.eye(2048), pooled - step * np.eye(2048)])
    scores = logits(probes)[:, 0]  # the pre-softmax 'fractured' score
    gradient = (scores[:2048] - scores[2048:]) / (2 * step)
    cam = np.maximum(cells * (gradient.sum() / 49.0), 0.0)  # every channel of the map equals `cells`
    return cam / cam.max() if cam.max() > 0 else cam


def part_with_positive_evidence(bundle: Path, data: bytes) -> str:
    """A part whose (random) specialist head gives a non-empty Grad-CAM, so the comparison is not 0 == 0."""
    for part in PARTS:
        if reference_cam(bundle, part, data).max() > 0:
            return part
    pytest.fail("every tiny specialist head gives an empty map; change write_heads' seed")


async def test_heatmap_equals_an_independent_grad_cam(bundle: Path, client: httpx.AsyncClient) -> None:
    data = patterned_png()
    part = part_with_positive_evidence(bundle, data)
    response = await client.post(
        "/v1/predict", params={"heatmap": "true", "body_part": part}, files={"file": ("a.png", data, "image/png")}
    )
    assert response.status_code == 200, response.text
    heatmap = response.json()["predictions"][0]["heatmap"]
    assert heatmap["body_part"] == part
    grid = np.asarray(heatmap["grid"])
    assert grid.shape == (7, 7)
    np.testing.assert_allclose(grid, reference_cam(bundle, part, data), atol=1e-3)
    assert grid[1, 2] > grid[5, 5]  # the bright block is where the map is
    overlay = Image.open(io.BytesIO(base64.b64decode(heatmap["overlay_png_base64"])))
    assert overlay.format == "PNG"
    assert overlay.mode == "RGB"
    assert overlay.size == (heatmap["width"], heatmap["height"]) == (300, 200)  # aspect kept, not enlarged


async def test_heatmap_is_asked_for_by_json_and_by_form_field(client: httpx.AsyncClient) -> None:
    encoded = base64.b64encode(patterned_png()).decode()
    by_json = await client.post("/v1/predict", json={"image": encoded, "heatmap": True, "body_part": "hand"})
    by_form = await client.post(
        "/v1/predict", data={"heatmap": "true", "body_part": "hand"}, files={"file": ("a.png", patterned_png())}
    )
    assert by_json.status_code == by_form.status_code == 200
    assert by_json.json()["predictions"][0]["heatmap"]["grid"] == by_form.json()["predictions"][0]["heatmap"]["grid"]


async def test_large_images_get_an_overlay_no_larger_than_the_setting(bundle: Path) -> None:
    big = encode_png(np.tile(np.arange(1200, dtype=np.uint16) % 256, (900, 1)).astype(np.uint8))
    async with serving(bundle, heatmap_max_side=256) as (_, client):
        response = await client.post("/v1/predict?heatmap=true", files={"file": ("big.png", big)})
    heatmap = response.json()["predictions"][0]["heatmap"]
    assert (heatmap["width"], heatmap["height"]) == (256, 192)


async def test_no_heatmap_asked_costs_no_feature_map(bundle: Path) -> None:
    async with serving(bundle) as (app, client):
        response = await client.post("/v1/predict", files={"file": ("a.png", patterned_png())})
        assert response.json()["predictions"][0]["heatmap"] is None
        predictor: Predictor = app.state.predictor
        uploads = [Upload(patterned_png(), "a.png"), Upload(patterned_png(), "b.png", heatmap=True)]
        results = await predictor.run_images(predictor.admit(2), uploads)
    assert results[0].prediction.feature_map is None
    assert results[0].prepared.display is None
    assert results[1].prediction.feature_map is not None


# --- studies -------------------------------------------------------------------------------------------------


async def test_study_answer_is_the_mean_of_its_images(client: httpx.AsyncClient) -> None:
    images = [png_for_part(1, shift) for shift in (-6, 0, 5)]
    response = await client.post("/v1/studies", files=[("file", (f"v{i}.png", d)) for i, d in enumerate(images)])
    assert response.status_code == 200, response.text
    body = response.json()
    study = body["study"]
    assert study["images"] == 3
    assert study["body_part"]["label"] == "hand"
    assert study["body_part"]["source"] == "router"
    expected = np.mean([model_input_mean(d) + OFFSETS["hand"] for d in images])
    assert study["fracture"]["probability"] == pytest.approx(expected, abs=1e-4)
    assert study["fracture"]["label"] == ("fractured" if expected >= 0.5 else "normal")
    assert study["fracture"]["suspicious"] == bool(expected >= 0.4)
    assert [p["image_name"] for p in body["predictions"]] == ["v0.png", "v1.png", "v2.png"]
    assert body["disclaimer"]
    assert body["model"]["trained"] is False
    assert body["warnings"]


async def _images_inferred(client: httpx.AsyncClient) -> float:
    """Images through the model so far (the batch-size histogram's sum)."""
    text = (await client.get("/metrics")).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("bfd_batch_size_sum"))


async def test_a_misrouted_view_is_rescored_by_the_studys_part(
    client: httpx.AsyncClient, request: pytest.FixtureRequest
) -> None:
    hand_views = [png_for_part(1, -3), png_for_part(1, 4)]
    elbow_view = png_for_part(0, 2)  # routed to elbow on its own
    images = [*hand_views, elbow_view]
    before = await _images_inferred(client)
    response = await client.post("/v1/studies", files=[("file", (f"v{i}.png", d)) for i, d in enumerate(images)])
    body = response.json()
    # A fused graph scored every part in its one pass: nothing runs again. A split graph runs the elbow view
    # once more, under the hand specialist.
    form = request.node.callspec.params["bundle"]
    assert await _images_inferred(client) - before == (3 if form == "fused" else 4)
    assert [p["body_part"]["label"] for p in body["predictions"]] == ["hand", "hand", "elbow"]
    # the elbow view's own answer comes from the elbow specialist...
    assert body["predictions"][2]["fracture"]["probability"] == pytest.approx(
        model_input_mean(elbow_view) + OFFSETS["elbow"], abs=1e-4
    )
    # ...but the study (hand: the summed router probabilities) scores every view with the hand specialist
    assert body["study"]["body_part"]["label"] == "hand"
    expected = np.mean([model_input_mean(d) + OFFSETS["hand"] for d in images])
    assert body["study"]["fracture"]["probability"] == pytest.approx(expected, abs=1e-4)
    probabilities = body["study"]["body_part"]["probabilities"]
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert max(probabilities, key=probabilities.get) == "hand"


async def test_study_with_a_body_part_from_the_client(client: httpx.AsyncClient) -> None:
    images = [png_for_part(0), png_for_part(2)]
    response = await client.post(
        "/v1/studies?body_part=shoulder", files=[("file", (f"v{i}.png", d)) for i, d in enumerate(images)]
    )
    study = response.json()["study"]
    assert study["body_part"]["label"] == "shoulder"
    assert study["body_part"]["source"] == "client"
    expected = np.mean([model_input_mean(d) + OFFSETS["shoulder"] for d in images])
    assert study["fracture"]["probability"] == pytest.approx(expected, abs=1e-4)


async def test_study_refuses_bad_input_like_predict(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/studies", files=[("file", ("a.png", png_for_part(1))), ("file", ("b", b"xx"))])
    assert response.status_code == 422
    assert "b" in response.json()["detail"]
    no_file = await client.post("/v1/studies", data={"body_part": "hand"}, files={"note": ("n.txt", b"hi")})
    assert no_file.status_code == 422
    assert "'file'" in no_file.json()["detail"]


# --- abstention ----------------------------------------------------------------------------------------------

UNSURE = encode_png(np.full((64, 64), 85, dtype=np.uint8))  # m = 1/3: halfway between elbow and hand


async def test_unsure_router_abstains_but_still_reports_probabilities(client: httpx.AsyncClient) -> None:
    prediction = (await client.post("/v1/predict", files={"file": ("u.png", UNSURE)})).json()["predictions"][0]
    assert prediction["abstained"] is True
    assert "router is unsure" in prediction["abstention_reason"]
    assert max(prediction["body_part"]["probabilities"].values()) < 0.5
    assert 0.0 <= prediction["fracture"]["probability"] <= 1.0
    confident = (await client.post("/v1/predict", files={"file": ("c.png", png_for_part(1))})).json()
    assert confident["predictions"][0]["abstained"] is False
    assert confident["predictions"][0]["abstention_reason"] is None


async def test_a_colour_photograph_is_not_a_radiograph(client: httpx.AsyncClient) -> None:
    rng = np.random.default_rng(0)
    photo = encode_png(rng.integers(0, 256, size=(80, 80, 3), dtype=np.uint8))
    prediction = (await client.post("/v1/predict?body_part=hand", files={"file": ("p.png", photo)})).json()
    assert prediction["predictions"][0]["abstained"] is True
    assert prediction["predictions"][0]["abstention_reason"].startswith("not a radiograph")


async def test_a_body_part_named_by_the_client_is_not_second_guessed(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/predict?body_part=elbow", files={"file": ("u.png", UNSURE)})
    assert response.json()["predictions"][0]["abstained"] is False


async def test_thresholds_come_from_settings_then_the_manifest(bundle: Path) -> None:
    async with serving(bundle, abstain_min_router_probability=0.3) as (_, client):
        loose = (await client.post("/v1/predict", files={"file": ("u.png", UNSURE)})).json()
    assert loose["predictions"][0]["abstained"] is False
    manifest = read_manifest_json(bundle)
    manifest["abstention"] = {"min_router_probability": 0.2, "max_colourfulness": 12.0}
    write_manifest_json(bundle, manifest)
    async with serving(bundle) as (_, client):
        from_bundle = (await client.post("/v1/predict", files={"file": ("u.png", UNSURE)})).json()
    assert from_bundle["predictions"][0]["abstained"] is False
    async with serving(bundle, abstain_min_router_probability=0.999) as (_, client):
        strict = (await client.post("/v1/predict", files={"file": ("c.png", png_for_part(1))})).json()
    assert strict["predictions"][0]["abstained"] is True


# --- DICOM ---------------------------------------------------------------------------------------------------


def dicom_for_part(
    index: int, *, body_part: str | None = None, preamble: bool = True, birth_date: bool = False
) -> tuple[bytes, Dataset]:
    """A 12-bit MONOCHROME2 radiograph whose rendered mean routes it to part `index`; patient data included."""
    rows, columns = 120, 150
    fraction = (index + 0.5) / len(PARTS)
    pixels = np.zeros((rows, columns), dtype=np.uint16)
    pixels[:, : round(fraction * columns)] = 4095  # min-max rendering: the mean is the bright fraction
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    if birth_date:
        ds.PatientBirthDate = "19700101"
    if body_part:
        ds.BodyPartExamined = body_part
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    if preamble:
        ds.save_as(buffer, enforce_file_format=True)
    else:
        ds.save_as(buffer, implicit_vr=False, little_endian=True)  # dataset only: no preamble, no 'DICM'
    return buffer.getvalue(), ds


async def test_dicom_upload_uses_body_part_examined_and_reports_the_router(client: httpx.AsyncClient) -> None:
    data, _ = dicom_for_part(0, body_part="HAND")  # pixels look like an elbow to the router
    response = await client.post("/v1/predict", files={"file": ("x.dcm", data, "application/dicom")})
    assert response.status_code == 200, response.text
    prediction = response.json()["predictions"][0]
    assert prediction["body_part"]["label"] == "hand"
    assert prediction["body_part"]["source"] == "dicom"
    assert prediction["body_part"]["router_label"] == "elbow"
    assert any("router says elbow" in warning for warning in prediction["warnings"])
    assert prediction["dicom"]["body_part_examined"] == "HAND"
    assert prediction["dicom"]["bits_stored"] == 12
    assert PATIENT_NAME.split("^")[0] not in response.text
    assert PATIENT_ID not in response.text


async def test_dicom_with_an_unknown_body_part_is_routed(client: httpx.AsyncClient) -> None:
    data, _ = dicom_for_part(2, body_part="CHEST")
    prediction = (await client.post("/v1/predict", files={"file": ("x.dcm", data)})).json()["predictions"][0]
    assert prediction["body_part"]["label"] == "shoulder"
    assert prediction["body_part"]["source"] == "router"


async def test_raw_dicom_body_even_without_preamble(client: httpx.AsyncClient) -> None:
    data, _ = dicom_for_part(1, preamble=False)
    response = await client.post("/v1/predict", content=data, headers={"content-type": "application/dicom"})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["body_part"]["label"] == "hand"
    png = await client.post("/v1/predict", content=data, headers={"content-type": "image/png"})
    assert png.status_code == 422  # declared PNG: not parsed as DICOM, and it is no PNG


async def test_dicom_output_is_a_secondary_capture_in_the_source_study(client: httpx.AsyncClient) -> None:
    data, source = dicom_for_part(1, body_part="HAND")
    response = await client.post("/v1/predict?output=dicom", files={"file": ("x.dcm", data)})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    out = pydicom.dcmread(io.BytesIO(response.content))
    assert out.SOPClassUID == SECONDARY_CAPTURE
    assert out.StudyInstanceUID == source.StudyInstanceUID
    assert out.SeriesInstanceUID != source.SeriesInstanceUID
    assert "RESEARCH USE ONLY" in out.SeriesDescription
    assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert str(out.PatientName) == PATIENT_NAME  # the one place patient data goes: so a PACS files it right
    assert out.PatientID == PATIENT_ID
    assert "PatientBirthDate" not in out  # nothing the input did not have
    assert "UNTRAINED" in out.ImageComments
    assert "P(fractured)" in out.ImageComments
    rgb = out.pixel_array
    assert rgb.ndim == 3
    assert rgb.shape[2] == 3
    assert rgb.shape[1] == 150
    assert rgb.shape[0] > 120  # the text band above the 150 x 120 overlay


async def test_dicom_output_needs_one_dicom_input(client: httpx.AsyncClient) -> None:
    png = await client.post("/v1/predict?output=dicom", files={"file": ("a.png", png_for_part(1))})
    assert png.status_code == 422
    assert "DICOM" in png.json()["detail"]
    data, _ = dicom_for_part(1)
    two = await client.post("/v1/predict?output=dicom", files=[("file", ("a.dcm", data)), ("file", ("b.dcm", data))])
    assert two.status_code == 422
    # nothing leaked: the queue is whole again
    assert (await client.post("/v1/predict", files={"file": ("a.dcm", data)})).status_code == 200


async def test_dicom_without_pixels_is_a_clear_422(client: httpx.AsyncClient) -> None:
    rtplan = pydicom.data.get_testdata_file("rtplan.dcm")
    assert rtplan is not None
    response = await client.post("/v1/predict", files={"file": ("plan.dcm", Path(rtplan).read_bytes())})
    assert response.status_code == 422
    assert "no image" in response.json()["detail"]
