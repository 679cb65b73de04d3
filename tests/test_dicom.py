"""DICOM in: how `inference.dicom` renders a DICOM file and how `prepare_image` hands it to the model.

Pinned here:

* pydicom's bundled test files: CT_small (signed 16-bit, rescale slope/intercept) and MR_small (window centre/width)
  render exactly as an independent numpy computation of the modality LUT then the PS3.3 C.11.2.1.2 LINEAR window
  (or min-max without a window); the RLE, JPEG 2000 and JPEG-LS copies of MR_small render identically to it, so
  those decoders are wired in; 12-bit JPEG Extended (JPGExtended.dcm) decodes through GDCM to pydicom's reference
  values; a DICOM object without pixel data and a truncated file are 4xx `ImageError`s, never another exception.
* Files written here with pydicom: min-max scaling of 12-bit data without a window, MONOCHROME1 inverted (bone
  bright), the window (below -> 0, above -> 255, centre ~128), the rescale applied before the window, 16-bit full
  range, RLE / JPEG 2000 / JPEG-LS lossless copies rendering identically, files without the 128-byte preamble
  (only with `dicom=True`), the pixel limit checked before decoding (413), only the first frame of a multi-frame
  file decoded, corrupt compressed data (422) told apart from a transfer syntax nothing here decodes (415),
  colourfulness of RGB DICOM, and BodyPartExamined -> the bundle's body part.
* The model input contract: a DICOM's model input is the rendering put through the very same resize as a grey PNG
  of the same pixels (identical arrays), (224, 224, 3) uint8 with R == G == B.
* Patient identifiers: none of the facts `DicomImage` returns besides its `.dataset`, no error reason and no log
  record emitted while preparing holds the patient's name or ID.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path

import numpy as np
import pytest
from hostile_inputs import lut_item
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from inference.dicom import DicomImage, body_part_from_dicom, read_dicom
from inference.dicom_header import DicomError, looks_like_dicom
from inference.preprocessing import (
    ImageError,
    ImageTooLargeError,
    PreparedImage,
    UndecodableImageError,
    UnsupportedImageFormatError,
    prepare_image,
)
from service.errors import http_status

DIGITAL_XRAY = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
MR_SMALL_COPIES = ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
LOSSLESS_SYNTAXES = [RLELossless, JPEG2000Lossless, JPEGLSLossless]
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "ID-123"


# --- helpers -------------------------------------------------------------------------------------------------------


def _testdata(name: str) -> bytes:
    """The bytes of one of pydicom's bundled test files (shipped inside the package, no download)."""
    path = get_testdata_file(name)
    assert path is not None, f"pydicom no longer bundles {name}"
    with open(path, "rb") as fh:
        return fh.read()


def _gradient(rows: int = 48, columns: int = 64, low: int = 100, high: int = 3000) -> np.ndarray:
    """A left-to-right ramp from `low` to `high` with a little vertical variation: (rows, columns) uint16."""
    ramp = np.linspace(low, high, columns)[None, :] + np.linspace(0, (high - low) / 50, rows)[:, None]
    return np.clip(np.rint(ramp), low, high).astype(np.uint16)


def _radiograph(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    frames: int = 1,
    **tags: object,
) -> Dataset:
    """A minimal DX dataset with file meta (Explicit VR Little Endian) holding `pixels` uncompressed.

    `pixels` is (rows, columns) uint16, (frames, rows, columns) uint16, or (rows, columns, 3) uint8 for RGB.
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
    ds.Rows = int(pixels.shape[1] if frames > 1 else pixels.shape[0])
    ds.Columns = int(pixels.shape[2] if frames > 1 else pixels.shape[1])
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    if photometric == "RGB":
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    else:
        ds.SamplesPerPixel = 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def _encode(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file: 128-byte preamble, 'DICM', file meta, data set."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _render(data: bytes, **kwargs: object) -> np.ndarray:
    """The (H, W) uint8 grey rendering `prepare_image` made of a DICOM file."""
    prepared = prepare_image(data, **kwargs)  # type: ignore[arg-type]
    assert prepared.dicom is not None
    assert prepared.dicom.pixels.dtype == np.uint8
    assert prepared.dicom.pixels.ndim == 2
    return prepared.dicom.pixels


def _linear_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR VOI function onto 0..255, written out piecewise as the standard does."""
    out = ((values - (centre - 0.5)) / (width - 1.0) + 0.5) * 255.0
    out = np.where(values <= centre - 0.5 - (width - 1.0) / 2.0, 0.0, out)
    out = np.where(values > centre - 0.5 + (width - 1.0) / 2.0, 255.0, out)
    return np.rint(out)


def _min_max(values: np.ndarray) -> np.ndarray:
    return np.rint((values - values.min()) / (values.max() - values.min()) * 255.0)


def _stored_values(ds: Dataset) -> np.ndarray:
    """The stored pixel values of an uncompressed little-endian single-frame grey file, read from the raw bytes."""
    dtype = "<i2" if int(ds.PixelRepresentation) == 1 else "<u2"
    assert int(ds.BitsAllocated) == 16
    assert int(ds.BitsStored) == 16, "masking unused high bits is not needed for the files used here"
    return np.frombuffer(ds.PixelData, dtype=dtype).reshape(int(ds.Rows), int(ds.Columns)).astype(np.float64)


def _expected_rendering(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """Independent rendering: modality LUT (slope/intercept), then the file's first window, else min-max."""
    values = stored * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        centre = ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter
        width = ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth
        return _linear_window(values, float(centre), float(width))
    return _min_max(values)


def _assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: int = 1) -> None:
    assert actual.shape == expected.shape
    worst = int(np.abs(actual.astype(np.int32) - expected.astype(np.int32)).max())
    assert worst <= tolerance, f"rendering differs by up to {worst} grey levels"


# --- pydicom's bundled files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_bundled_file_renders_as_modality_lut_then_window(name: str) -> None:
    data = _testdata(name)
    ds = dcmread(io.BytesIO(data))
    expected = _expected_rendering(ds, _stored_values(ds))
    prepared = prepare_image(data)
    assert prepared.dicom is not None
    _assert_close(prepared.dicom.pixels, expected)
    assert prepared.dicom.photometric == "MONOCHROME2"
    assert prepared.dicom.bits_stored == 16
    assert prepared.dicom.transfer_syntax == ExplicitVRLittleEndian
    assert (prepared.original_width, prepared.original_height) == (int(ds.Columns), int(ds.Rows))
    assert prepared.colourfulness == 0.0


def test_ct_small_rescale_is_applied_before_a_window() -> None:
    """CT_small (intercept -1024) with a soft-tissue window in Hounsfield units: the window must see HU, not raw."""
    ds = dcmread(io.BytesIO(_testdata("CT_small.dcm")))
    ds.WindowCenter, ds.WindowWidth = 40, 400
    stored = _stored_values(ds)
    rendering = _render(_encode(ds))
    _assert_close(rendering, _linear_window(stored - 1024.0, 40, 400))
    ignoring_rescale = _linear_window(stored, 40, 400)
    assert np.abs(rendering.astype(np.int32) - ignoring_rescale).mean() > 20


@pytest.mark.parametrize("name", MR_SMALL_COPIES)
def test_compressed_copies_of_mr_small_render_like_the_uncompressed_file(name: str) -> None:
    reference = _render(_testdata("MR_small.dcm"))
    data = _testdata(name)
    prepared = prepare_image(data)
    assert prepared.dicom is not None
    assert prepared.dicom.transfer_syntax == str(dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID)
    assert prepared.dicom.transfer_syntax != ExplicitVRLittleEndian  # the compressed path really ran
    _assert_close(prepared.dicom.pixels, reference)


def test_jpeg_extended_12_bit_decodes_through_gdcm() -> None:
    """pydicom's GDCM plugin refuses 12-bit JPEG Extended; inference.dicom decodes it with GDCM itself.

    pydicom's pixel reference for JPGExtended.dcm: stored value 244 at (420, 140) and 95 at (230, 120); the file
    has no window, so the rendering is min-max (its stored range is 0..264).
    """
    prepared = prepare_image(_testdata("JPGExtended.dcm"))
    assert prepared.dicom is not None
    assert prepared.dicom.transfer_syntax == JPEGExtended12Bit
    assert prepared.dicom.bits_stored == 12
    pixels = prepared.dicom.pixels
    assert pixels.shape == (1024, 256)
    assert pixels.min() == 0
    assert pixels.max() == 255
    assert pixels.std() > 5
    assert abs(int(pixels[420, 140]) - round(244 * 255 / 264)) <= 1
    assert abs(int(pixels[230, 120]) - round(95 * 255 / 264)) <= 1


def test_dicom_without_pixel_data_is_undecodable() -> None:
    with pytest.raises(UndecodableImageError) as caught:
        prepare_image(_testdata("rtplan.dcm"))
    assert http_status(caught.value) == 422
    assert "pixel data" in caught.value.reason
    assert "no image" in caught.value.reason


def test_truncated_dicom_is_an_image_error() -> None:
    with pytest.raises(ImageError) as caught:
        prepare_image(_testdata("MR_truncated.dcm"))
    assert 400 <= http_status(caught.value) < 500
    assert http_status(caught.value) != 415  # a truncated file is not an unsupported format


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
@pytest.mark.parametrize("cut", [200, 1500, 5000])
@pytest.mark.parametrize("name", ["MR_small.dcm", *MR_SMALL_COPIES])
def test_cut_short_dicom_is_a_4xx_image_error(name: str, cut: int) -> None:
    data = _testdata(name)
    with pytest.raises(ImageError) as caught:
        prepare_image(data[: len(data) - cut])
    assert 400 <= http_status(caught.value) < 500


# --- files written here --------------------------------------------------------------------------------------------


def test_monochrome2_without_window_is_min_max_scaled() -> None:
    pixels = _gradient()
    rendering = _render(_encode(_radiograph(pixels)))
    assert rendering[pixels == pixels.max()].min() == 255
    assert rendering[pixels == pixels.min()].max() == 0
    _assert_close(rendering, _min_max(pixels.astype(np.float64)))


def test_monochrome1_is_inverted_so_bone_is_bright() -> None:
    pixels = _gradient()
    mono2 = _render(_encode(_radiograph(pixels)))
    mono1 = prepare_image(_encode(_radiograph(pixels, photometric="MONOCHROME1")))
    assert mono1.dicom is not None
    assert mono1.dicom.photometric == "MONOCHROME1"
    np.testing.assert_array_equal(mono1.dicom.pixels, 255 - mono2)


def test_window_centre_and_width() -> None:
    pixels = _gradient(low=0, high=4095)
    rendering = _render(_encode(_radiograph(pixels, WindowCenter=2000, WindowWidth=1000)))
    assert (rendering[pixels < 1500] == 0).all()
    assert (rendering[pixels > 2500] == 255).all()
    near_centre = rendering[np.abs(pixels.astype(np.int32) - 2000) <= 2]
    assert near_centre.size > 0
    assert np.abs(near_centre.astype(np.int32) - 128).max() <= 2
    _assert_close(rendering, _linear_window(pixels.astype(np.float64), 2000, 1000))


def test_window_picks_the_first_of_several() -> None:
    pixels = _gradient(low=0, high=4095)
    ds = _radiograph(pixels, WindowCenter=[2000, 500], WindowWidth=[1000, 200])
    _assert_close(_render(_encode(ds)), _linear_window(pixels.astype(np.float64), 2000, 1000))


def test_rescale_is_applied_before_the_window() -> None:
    pixels = _gradient(low=100, high=3000)
    ds = _radiograph(pixels, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=2000, WindowWidth=1000)
    rendering = _render(_encode(ds))
    real = pixels.astype(np.float64) * 2 - 1000
    _assert_close(rendering, _linear_window(real, 2000, 1000))
    assert (rendering[real < 1500] == 0).all()
    assert (rendering[real > 2500] == 255).all()
    ignoring_rescale = _linear_window(pixels.astype(np.float64), 2000, 1000)
    assert np.abs(rendering.astype(np.int32) - ignoring_rescale).mean() > 30


def test_16_bit_full_range() -> None:
    pixels = _gradient(low=0, high=65535)
    prepared = prepare_image(_encode(_radiograph(pixels, bits_stored=16)))
    assert prepared.dicom is not None
    assert prepared.dicom.bits_stored == 16
    rendering = prepared.dicom.pixels
    assert rendering[pixels == 65535].min() == 255
    assert rendering[pixels == 0].max() == 0
    _assert_close(rendering, _min_max(pixels.astype(np.float64)))


@pytest.mark.parametrize("syntax", LOSSLESS_SYNTAXES, ids=lambda uid: uid.name)
def test_lossless_compressed_copy_renders_identically(syntax: str) -> None:
    if not get_encoder(syntax).is_available:
        pytest.skip(f"no {syntax} encoder installed")
    pixels = _gradient(low=0, high=4095)
    reference = _render(_encode(_radiograph(pixels, WindowCenter=1800, WindowWidth=2500)))
    ds = _radiograph(pixels, WindowCenter=1800, WindowWidth=2500)
    ds.compress(syntax, pixels)
    prepared = prepare_image(_encode(ds))
    assert prepared.dicom is not None
    assert prepared.dicom.transfer_syntax == syntax
    np.testing.assert_array_equal(prepared.dicom.pixels, reference)


def test_file_without_preamble_needs_dicom_true() -> None:
    pixels = _gradient()
    with_preamble = _encode(_radiograph(pixels))
    buffer = io.BytesIO()
    _radiograph(pixels).save_as(buffer, enforce_file_format=False)  # no preamble, no 'DICM'
    reference = _render(with_preamble)
    for data in (buffer.getvalue(), with_preamble[132:]):
        assert not looks_like_dicom(data)
        with pytest.raises(ImageError) as caught:
            prepare_image(data)
        assert 400 <= http_status(caught.value) < 500
        np.testing.assert_array_equal(_render(data, dicom=True), reference)


def test_pixel_limit_is_checked_before_decoding() -> None:
    """10000 x 10000 declared over 16 bytes of pixel data: the limit answers 413 before the short data fails."""
    ds = _radiograph(np.zeros((4, 4), dtype=np.uint16))
    ds.Rows, ds.Columns = 10_000, 10_000
    data = _encode(ds)
    with pytest.raises(ImageTooLargeError) as caught:
        prepare_image(data, max_pixels=50_000_000)
    assert http_status(caught.value) == 413
    assert "10000x10000" in caught.value.reason
    with pytest.raises(ImageTooLargeError) as direct:
        read_dicom(data, max_pixels=100_000_000 - 1)
    assert http_status(direct.value) == 413
    with pytest.raises(UndecodableImageError):  # under the limit the same file does reach the decoder
        prepare_image(data, max_pixels=100_000_000)


def test_pixel_limit_allows_exactly_max_pixels() -> None:
    pixels = _gradient(rows=10, columns=20)
    assert _render(_encode(_radiograph(pixels)), max_pixels=200).shape == (10, 20)
    with pytest.raises(ImageTooLargeError):
        prepare_image(_encode(_radiograph(pixels)), max_pixels=199)


def _multi_frame_rle(frames: list[np.ndarray]) -> Dataset:
    stack = np.stack(frames)
    ds = _radiograph(stack, frames=len(frames))
    ds.compress(RLELossless, stack)
    return ds


def test_multi_frame_renders_its_first_frame() -> None:
    first = _gradient(rows=32, columns=32)
    second = np.full_like(first, 4000)
    second[:, :16] = 0
    rendering = _render(_encode(_multi_frame_rle([first, second, second])))
    assert rendering.shape == (32, 32)
    _assert_close(rendering, _min_max(first.astype(np.float64)))


def test_only_the_first_frame_is_decoded() -> None:
    """A corrupt later frame does not matter: decoding every frame would let tiny compressed frames claim
    gigabytes past `max_pixels`, which bounds one frame."""
    first = _gradient(rows=32, columns=32)
    ds = _multi_frame_rle([first, first, first])
    encoded = list(generate_frames(ds.PixelData, number_of_frames=3))
    ds.PixelData = encapsulate([encoded[0], b"\x00" * 10, b"\x00" * 10])
    _assert_close(_render(_encode(ds)), _min_max(first.astype(np.float64)))


def test_corrupt_compressed_pixel_data_is_undecodable_not_unsupported() -> None:
    ds = _multi_frame_rle([_gradient(rows=32, columns=32)] * 2)
    ds.PixelData = encapsulate([b"\x00" * 10, b"\x00" * 10])
    with pytest.raises(UndecodableImageError) as caught:
        prepare_image(_encode(ds))
    assert http_status(caught.value) == 422


def test_transfer_syntax_without_a_decoder_is_unsupported() -> None:
    ds = _radiograph(np.zeros((8, 8), dtype=np.uint16))
    ds.file_meta.TransferSyntaxUID = UID("1.2.826.0.1.3680043.9.9999.4.1")  # a private compressed syntax
    ds.PixelData = encapsulate([b"\xff\x0a" + b"\x00" * 30])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=True)
    with pytest.raises(UnsupportedImageFormatError) as caught:
        prepare_image(buffer.getvalue())
    assert http_status(caught.value) == 415
    assert "transfer syntax" in caught.value.reason


def test_colour_dicom_is_colourful_and_grey_rgb_is_not() -> None:
    colour = np.zeros((40, 40, 3), dtype=np.uint8)
    colour[:, :20] = (230, 20, 20)
    colour[:, 20:] = (20, 20, 230)
    prepared = prepare_image(_encode(_radiograph(colour, photometric="RGB")))
    assert prepared.colourfulness > 12
    assert prepared.dicom is not None
    assert prepared.dicom.colourfulness == prepared.colourfulness
    expected_grey = np.asarray(Image.fromarray(colour, mode="RGB").convert("L"))
    np.testing.assert_array_equal(prepared.dicom.pixels, expected_grey)

    level = np.linspace(0, 255, 40).astype(np.uint8)
    grey = np.repeat(np.repeat(level[None, :], 40, axis=0)[:, :, None], 3, axis=2)
    grey_prepared = prepare_image(_encode(_radiograph(grey, photometric="RGB")))
    assert grey_prepared.colourfulness < 0.5
    assert grey_prepared.dicom is not None
    np.testing.assert_array_equal(grey_prepared.dicom.pixels, grey[:, :, 0])


def test_body_part_examined_is_reported_upper_case() -> None:
    prepared = prepare_image(_encode(_radiograph(_gradient(), BodyPartExamined="ELBOW")))
    assert prepared.dicom is not None
    assert prepared.dicom.body_part_examined == "ELBOW"
    without = prepare_image(_encode(_radiograph(_gradient())))
    assert without.dicom is not None
    assert without.dicom.body_part_examined is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("ELBOW", "elbow"), ("Hand ", "hand"), ("SHOULDER", "shoulder"), ("CHEST", None), (None, None), ("", None)],
)
def test_body_part_from_dicom(value: str | None, expected: str | None) -> None:
    assert body_part_from_dicom(value, ["elbow", "hand", "shoulder"]) == expected


def test_body_part_alias_only_counts_when_the_bundle_knows_it() -> None:
    assert body_part_from_dicom("UPPER ARM", ["humerus"]) == "humerus"
    assert body_part_from_dicom("UPPER ARM", ["elbow"]) is None


# --- the model input contract --------------------------------------------------------------------------------------


def _png(grey: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("resize", ["bilinear", "nearest"])
@pytest.mark.parametrize(
    "source", ["CT_small.dcm", "MR_small_jp2klossless.dcm", "written-monochrome1"], ids=lambda name: name
)
def test_dicom_and_png_share_one_preprocessing(source: str, resize: str) -> None:
    if source == "written-monochrome1":
        data = _encode(_radiograph(_gradient(rows=300, columns=180), photometric="MONOCHROME1"))
    else:
        data = _testdata(source)
    prepared = prepare_image(data, resize=resize, display_max_side=100)  # type: ignore[arg-type]
    assert prepared.dicom is not None
    assert prepared.pixels.shape == (224, 224, 3)
    assert prepared.pixels.dtype == np.uint8
    assert prepared.pixels.flags.c_contiguous
    np.testing.assert_array_equal(prepared.pixels[:, :, 0], prepared.pixels[:, :, 1])
    np.testing.assert_array_equal(prepared.pixels[:, :, 0], prepared.pixels[:, :, 2])

    as_png = prepare_image(_png(prepared.dicom.pixels), resize=resize, display_max_side=100)  # type: ignore[arg-type]
    np.testing.assert_array_equal(prepared.pixels, as_png.pixels)
    assert prepared.display is not None
    assert as_png.display is not None
    np.testing.assert_array_equal(prepared.display, as_png.display)
    assert (prepared.original_width, prepared.original_height) == (as_png.original_width, as_png.original_height)


# --- patient identifiers -------------------------------------------------------------------------------------------


def _with_patient(ds: Dataset) -> Dataset:
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    return ds


def _assert_no_identifiers(text: str) -> None:
    for identifier in (PATIENT_NAME, PATIENT_ID, "Doe", "Jane"):
        assert identifier not in text


def test_patient_identifiers_stay_in_the_dataset(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pydicom")
    caplog.set_level(logging.DEBUG, logger="service")
    data = _encode(
        _with_patient(_radiograph(_gradient(), BodyPartExamined="HAND", WindowCenter=1500, WindowWidth=2000))
    )
    prepared: PreparedImage = prepare_image(data, display_max_side=64)
    decoded = prepared.dicom
    assert decoded is not None
    assert str(decoded.dataset.PatientName) == PATIENT_NAME  # kept for the DICOM output, and only there

    for field in dataclasses.fields(DicomImage):
        if field.name != "dataset":
            _assert_no_identifiers(repr(getattr(decoded, field.name)))
    _assert_no_identifiers(prepared.source_mode)
    for record in caplog.records:
        _assert_no_identifiers(record.getMessage())
        _assert_no_identifiers(repr(record.args))


def test_patient_identifiers_stay_out_of_error_reasons(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pydicom")
    full = _encode(_with_patient(_radiograph(_gradient())))
    too_large = _with_patient(_radiograph(_gradient()))
    too_large.Rows = 5000
    no_pixels = _with_patient(_radiograph(_gradient()))
    del no_pixels.PixelData
    cases = [(full[: len(full) - 100], {}), (_encode(too_large), {"max_pixels": 1000}), (_encode(no_pixels), {})]
    for data, kwargs in cases:
        with pytest.raises(ImageError) as caught:
            prepare_image(data, **kwargs)  # type: ignore[arg-type]
        _assert_no_identifiers(caught.value.reason)
        _assert_no_identifiers(str(caught.value.__cause__))
    for record in caplog.records:
        _assert_no_identifiers(record.getMessage())


# --- what real files carry: palettes, YCbCr, float and 1-bit data, signed data, several frames -----------------------


def _reference_rendering(data: bytes) -> np.ndarray:
    """The rendering before the lookup tables: pydicom's pixel_array, then float64 per pixel (the old code path)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = dcmread(io.BytesIO(data))
    ds.pixel_array_options(index=0)
    values = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
    if "VOILUTSequence" in ds:
        values = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float64)
        scaled = values / float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1) * 255.0
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        centre = float(ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter)
        width = max(float(ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth), 1.0)
        if str(ds.get("VOILUTFunction", "LINEAR")).upper() == "SIGMOID":
            scaled = 255.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
        else:
            scaled = ((values - (centre - 0.5)) / (width - 1.0 if width > 1 else 1.0) + 0.5) * 255.0
    else:
        low, high = values.min(), values.max()
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    out = np.rint(np.clip(np.nan_to_num(scaled), 0.0, 255.0)).astype(np.uint8)
    return 255 - out if str(ds.PhotometricInterpretation) == "MONOCHROME1" else out


def _real_grey(rows: int = 250, columns: int = 200) -> np.ndarray:
    """A real radiograph (FracAtlas, CC BY 4.0) scaled to 12 bits: (rows, columns) uint16."""
    path = Path(__file__).parent / "data/xray/hand/fractured/fracatlas_IMG0002352.jpg"
    with Image.open(path) as img:
        grey = np.asarray(img.convert("L").resize((columns, rows), Image.Resampling.BILINEAR))
    return grey.astype(np.uint16) * 16 + (np.arange(rows * columns).reshape(rows, columns) % 16).astype(np.uint16)


def _signed(ds: Dataset) -> Dataset:
    stored = np.frombuffer(ds.PixelData, dtype="<u2").astype(np.int32) - 2048
    ds.PixelRepresentation = 1
    ds.PixelData = stored.astype("<i2").tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    return ds


RENDERINGS = {
    "no-window": lambda: _radiograph(_real_grey()),
    "window": lambda: _radiograph(_real_grey(), WindowCenter=2200, WindowWidth=2600),
    "several-windows": lambda: _radiograph(_real_grey(), WindowCenter=[1500, 3000], WindowWidth=[800, 400]),
    "monochrome1-window": lambda: _radiograph(
        _real_grey(), photometric="MONOCHROME1", WindowCenter=2000, WindowWidth=3000
    ),
    "monochrome1-min-max": lambda: _radiograph(_real_grey(), photometric="MONOCHROME1"),
    "rescale-and-window": lambda: _radiograph(
        _real_grey(), RescaleSlope=0.5, RescaleIntercept=-300, WindowCenter=700, WindowWidth=1200
    ),
    "negative-slope-min-max": lambda: _radiograph(_real_grey(), RescaleSlope=-1, RescaleIntercept=4095),
    "signed-ct-like": lambda: _signed(_radiograph(_real_grey(), bits_stored=16, WindowCenter=-600, WindowWidth=1500)),
    "signed-min-max": lambda: _signed(_radiograph(_real_grey(), bits_stored=16)),
    "sigmoid": lambda: _radiograph(_real_grey(), WindowCenter=2000, WindowWidth=1500, VOILUTFunction="SIGMOID"),
    "modality-lut-sequence": lambda: _radiograph(
        _real_grey(), ModalityLUTSequence=[lut_item([4096, 0, 16], [int(v) for v in np.sqrt(np.arange(4096)) * 1000])]
    ),
    "voi-lut-sequence": lambda: _radiograph(
        _real_grey(), VOILUTSequence=[lut_item([4096, 0, 12], [4095 - v for v in range(4096)])]
    ),
    "eight-bit": lambda: _eight_bit(),
}


def _eight_bit() -> Dataset:
    ds = _radiograph(np.zeros((250, 200), dtype=np.uint16))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = (_real_grey() >> 4).astype(np.uint8).tobytes()
    return ds


@pytest.mark.filterwarnings("ignore:Applying a VOI LUT on a float input:UserWarning")  # the reference only
@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_lookup_table_rendering_matches_the_float64_reference(name: str) -> None:
    data = _encode(RENDERINGS[name]())
    reference = _reference_rendering(data)
    rendering = _render(data)
    _assert_close(rendering, reference, tolerance=1)
    assert rendering.std() > 10  # a real image, not a flat field
    prepared = prepare_image(data)
    expected = prepare_image(_png(reference)).pixels  # the same model input as the reference's grey PNG
    assert int(np.abs(prepared.pixels.astype(np.int32) - expected).max()) <= 1


def test_rle_copy_matches_the_reference_too() -> None:
    ds = _radiograph(_real_grey(), WindowCenter=2200, WindowWidth=2600)
    ds.compress(RLELossless, _real_grey())
    data = _encode(ds)
    _assert_close(_render(data), _reference_rendering(data), tolerance=1)


def _colour_image(rows: int = 40, columns: int = 40) -> np.ndarray:
    colour = np.zeros((rows, columns, 3), dtype=np.uint8)
    colour[:, : columns // 2] = (230, 20, 20)
    colour[:, columns // 2 :] = (20, 20, 230)
    colour[: rows // 4] = (40, 200, 40)
    return colour


def _luma(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb, mode="RGB").convert("L"))


def test_palette_colour_is_applied_so_colour_is_seen() -> None:
    indices = np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1))
    ds = _radiograph(np.zeros((32, 64), dtype=np.uint16))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = indices.tobytes()
    red, green, blue = (
        (np.arange(256) * 257).astype("<u2"),
        np.zeros(256, "<u2"),
        ((255 - np.arange(256)) * 257).astype("<u2"),
    )
    for colour, table in (("Red", red), ("Green", green), ("Blue", blue)):
        ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", table.tobytes())
    prepared = prepare_image(_encode(ds))
    assert prepared.dicom is not None
    assert prepared.dicom.photometric == "PALETTE COLOR"
    assert prepared.colourfulness > 30  # red to blue: the abstention sees colour, not a grey index ramp
    expected_rgb = np.stack([indices, np.zeros_like(indices), 255 - indices], axis=2)
    _assert_close(prepared.dicom.pixels, _luma(expected_rgb), tolerance=1)


def test_ybr_full_uncompressed_is_converted_to_rgb() -> None:
    from pydicom.pixels import convert_color_space

    rgb = _colour_image()
    ds = _radiograph(rgb, photometric="RGB")
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.PixelData = convert_color_space(rgb, "RGB", "YBR_FULL").tobytes()
    prepared = prepare_image(_encode(ds))
    assert prepared.colourfulness > 30
    _assert_close(prepared.dicom.pixels, _luma(rgb), tolerance=2)  # type: ignore[union-attr]


def test_ybr_full_422_uncompressed_is_expanded_and_converted() -> None:
    from pydicom.pixels import convert_color_space

    rgb = _colour_image()  # colours constant over horizontal pixel pairs: 4:2:2 loses nothing
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL").reshape(40, 20, 2, 3)
    packed = np.stack([ybr[:, :, 0, 0], ybr[:, :, 1, 0], ybr[:, :, 0, 1], ybr[:, :, 0, 2]], axis=2)  # Y1 Y2 Cb Cr
    ds = _radiograph(rgb, photometric="RGB")
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = packed.astype(np.uint8).tobytes()
    prepared = prepare_image(_encode(ds))
    assert prepared.colourfulness > 30
    _assert_close(prepared.dicom.pixels, _luma(rgb), tolerance=2)  # type: ignore[union-attr]


def test_jpeg_baseline_ycbcr_is_converted_by_the_decoder() -> None:
    rgb = _colour_image(64, 64)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=95, subsampling="4:2:2")
    ds = _radiograph(rgb, photometric="RGB")
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    prepared = prepare_image(_encode(ds))
    assert prepared.colourfulness > 30
    with Image.open(io.BytesIO(buffer.getvalue())) as pillow:
        _assert_close(prepared.dicom.pixels, np.asarray(pillow.convert("L")), tolerance=3)  # type: ignore[union-attr]


def test_jpeg2000_ybr_rct_is_undone_by_the_decoder() -> None:
    if not get_encoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 encoder installed")
    rgb = _colour_image()
    ds = _radiograph(rgb, photometric="RGB")
    ds.compress(JPEG2000Lossless, rgb, use_mct=True)  # the reversible colour transform, inside the codestream
    ds.PhotometricInterpretation = "YBR_RCT"
    prepared = prepare_image(_encode(ds))
    assert prepared.dicom is not None
    assert prepared.dicom.photometric == "YBR_RCT"
    np.testing.assert_array_equal(prepared.dicom.pixels, _luma(rgb))  # lossless: exactly the RGB's grey


@pytest.mark.parametrize(
    ("keyword", "dtype", "bits"), [("FloatPixelData", "<f4", 32), ("DoubleFloatPixelData", "<f8", 64)]
)
def test_float_pixel_data_is_min_max_scaled_and_nan_is_the_lowest(keyword: str, dtype: str, bits: int) -> None:
    ds = _radiograph(np.zeros((8, 8), dtype=np.uint16))
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = bits
    values = np.linspace(-1.0, 3.0, 64).reshape(8, 8).astype(dtype)
    values[0, 0] = np.nan
    setattr(ds, keyword, values.tobytes())
    rendering = _render(_encode(ds))
    finite = values.astype(np.float64)
    finite[0, 0] = np.nanmin(finite)  # NaN takes the lowest real value
    _assert_close(rendering, _min_max(finite))
    assert rendering[0, 0] == 0


def test_one_bit_data_renders_black_and_white() -> None:
    from pydicom.pixels import pack_bits

    board = (np.indices((16, 24)).sum(axis=0) % 2).astype(np.uint8)
    ds = _radiograph(np.zeros((16, 24), dtype=np.uint16))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.PixelData = pack_bits(board)
    ds["PixelData"].VR = "OB"
    np.testing.assert_array_equal(_render(_encode(ds)), board * 255)


def test_twelve_bits_in_sixteen_ignore_the_unused_high_bits() -> None:
    """PS3.5 8.1.1: the bits above Bits Stored cannot be assumed zero (old overlays live there)."""
    pixels = _gradient(low=0, high=4095)
    clean = _render(_encode(_radiograph(pixels, WindowCenter=2000, WindowWidth=3000)))
    dirty = _radiograph(pixels, WindowCenter=2000, WindowWidth=3000)
    dirty.PixelData = (pixels | 0xA000).astype("<u2").tobytes()
    np.testing.assert_array_equal(_render(_encode(dirty)), clean)


def test_multi_frame_uncompressed_decodes_only_the_first_frame() -> None:
    """tracemalloc sees numpy's allocations: materialising 40 frames would allocate 40 frames' worth of arrays.

    One frame costs its array and the rendering's fixed tables (65,536 float64 entries, an 8 MB index chunk
    at most), whatever the number of frames.
    """
    import tracemalloc

    from inference.dicom import render_dicom
    from inference.dicom_header import check_pixel_data, parse_dicom

    first = _real_grey(512, 512)
    stack = np.stack([first] + [np.full_like(first, 4095)] * 39)
    header = parse_dicom(_encode(_radiograph(stack, frames=40)))
    check_pixel_data(header)
    tracemalloc.start()
    try:
        rendered = render_dicom(header)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < stack.nbytes / 4, f"decoding one frame allocated {peak} bytes; all frames are {stack.nbytes}"
    _assert_close(rendered.pixels, _min_max(first.astype(np.float64)))


def test_deflated_transfer_syntax_renders() -> None:
    ds = _radiograph(_real_grey(64, 48), WindowCenter=2000, WindowWidth=3000)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    reference = _render(_encode(_radiograph(_real_grey(64, 48), WindowCenter=2000, WindowWidth=3000)))
    np.testing.assert_array_equal(_render(_encode(ds)), reference)


def test_compressed_frame_is_checked_against_the_header_before_decoding() -> None:
    """A valid JPEG-LS file passes the check; the same codestream under a different Rows is refused (422)."""
    if not get_encoder(JPEGLSLossless).is_available:
        pytest.skip("no JPEG-LS encoder installed")
    pixels = _gradient(rows=32, columns=40)
    ds = _radiograph(pixels)
    ds.compress(JPEGLSLossless, pixels)
    assert _render(_encode(ds)).shape == (32, 40)
    ds.Rows = 64
    with pytest.raises(UndecodableImageError, match="JPEG-LS codestream of the first frame is 40x32"):
        prepare_image(_encode(ds))


def test_read_dicom_checks_the_codestream_too() -> None:
    ds = _multi_frame_rle([_gradient(rows=32, columns=32)] * 2)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7  # two segments per frame, one expected
    with pytest.raises(DicomError, match="RLE header lists 2 segments") as caught:
        read_dicom(_encode(ds), max_pixels=10_000)
    assert http_status(caught.value) == 422


def test_read_dicom_applies_the_decode_budget_when_given() -> None:
    from hostile_inputs import rle_bomb

    with pytest.raises(ImageTooLargeError, match="the limit per image is 400000000") as caught:
        read_dicom(rle_bomb(), max_pixels=50_000_000, max_decode_bytes=400_000_000)
    assert http_status(caught.value) == 413
    assert read_dicom(_encode(_radiograph(_gradient())), max_pixels=10_000, max_decode_bytes=50_000_000).pixels.shape
