"""Tests for service/preprocessing.py: the one decode path shared by training, evaluation and serving."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hostile_inputs import encode as encode_dicom
from hostile_inputs import lut_item, measure_decode, radiograph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin
from pydicom.uid import JPEG2000Lossless, RLELossless

from inference import preprocessing
from inference.preprocessing import (
    SUPPORTED_FORMATS,
    ImageError,
    ImageTooLargeError,
    PreparedImage,
    UndecodableImageError,
    UnsupportedImageFormatError,
    plan_decode,
    prepare_image,
    prepare_image_file,
)
from service.errors import http_status

XRAY_DIR = Path(__file__).parent / "data" / "xray"
SMALL_RGB = XRAY_DIR / "hand/fractured/fracatlas_IMG0003396.jpg"  # 373x454, RGB-encoded
LARGE_GREY = XRAY_DIR / "hand/fractured/fracatlas_IMG0002352.jpg"  # 2304x2880, L, progressive
ROTATED = XRAY_DIR / "shoulder/fractured/fracatlas_IMG0002628.jpg"  # 373x454 stored, EXIF orientation 8

# Measured: all 44 FracAtlas samples score exactly 0.0 (RGB-encoded ones carry no chroma); a saturated colour
# photo scores > 80. Anything between is left to the caller's policy; radiographs must stay far below this.
RADIOGRAPH_MAX_COLOURFULNESS = 2.0


def encode(img: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def noise(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    shape = (size[1], size[0], bands) if bands > 1 else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode)


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched (CRC fixed) to declare width x height."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def assert_contract(result: PreparedImage, size: int = 224) -> None:
    px = result.pixels
    assert px.shape == (size, size, 3)
    assert px.dtype == np.uint8
    assert px.flags.c_contiguous
    assert np.array_equal(px[..., 0], px[..., 1])
    assert np.array_equal(px[..., 0], px[..., 2])


# --- errors --------------------------------------------------------------------------------------------


def test_error_hierarchy_and_status() -> None:
    assert issubclass(ImageError, ValueError)
    for cls, status in [
        (UndecodableImageError, 422),
        (UnsupportedImageFormatError, 415),
        (ImageTooLargeError, 413),
    ]:
        assert issubclass(cls, ImageError)
        err = cls("why")
        assert (err.reason, http_status(err), str(err)) == ("why", status, "why")


def test_zero_bytes() -> None:
    with pytest.raises(UndecodableImageError, match="got 0 bytes") as info:
        prepare_image(b"")
    assert http_status(info.value) == 422


@pytest.mark.parametrize(
    "data",
    [
        b"\x00",
        bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)),
        b"hello, this is not an image",
        b"<html><body>404</body></html>",
        b"\x89PNG\r\n\x1a\n",  # PNG signature and nothing else
        b"\xff\xd8\xff",  # JPEG SOI and nothing else
    ],
    ids=["one-byte", "random", "text", "html", "png-signature", "jpeg-soi"],
)
def test_garbage_is_undecodable(data: bytes) -> None:
    with pytest.raises(UndecodableImageError) as info:
        prepare_image(data)
    assert "0x" not in info.value.reason  # no "<_io.BytesIO object at 0x...>" noise for clients


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_undecodable(fmt: str) -> None:
    data = encode(noise("RGB", (128, 128)), fmt)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(UndecodableImageError, match=fmt):
        prepare_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # global Pillow settings untouched


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP"])
def test_other_real_formats_are_unsupported(fmt: str) -> None:
    with pytest.raises(UnsupportedImageFormatError, match=fmt) as info:
        prepare_image(encode(noise("RGB", (16, 16)), fmt))
    assert http_status(info.value) == 415


def test_too_large_is_detected_from_header_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[object] = []
    original_load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> object:
        loads.append(self)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    with pytest.raises(ImageTooLargeError, match="8000x8000") as info:
        prepare_image(png_claiming_size(8000, 8000))  # 64 Mpx > default 50 Mpx; the file is ~70 bytes
    assert http_status(info.value) == 413
    assert loads == []  # no pixel was decoded
    prepare_image(encode(Image.new("L", (8, 8))))
    assert loads  # the spy does see real decodes


def test_pillows_own_bomb_error_never_escapes() -> None:
    # 400 Mpx is over Pillow's hard limit (2 * MAX_IMAGE_PIXELS), so Image.open itself raises.
    with pytest.raises(ImageTooLargeError):
        prepare_image(png_claiming_size(20000, 20000))


def test_between_pillow_limits_warns_but_raises_ours() -> None:
    # 100 Mpx: Pillow only warns on open (we do not touch global warning filters), our header check rejects.
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageTooLargeError, match="10000x10000"):
        prepare_image(png_claiming_size(10000, 10000))


def test_max_pixels_boundary() -> None:
    data = encode(noise("L", (300, 200)))
    with pytest.raises(ImageTooLargeError):
        prepare_image(data, max_pixels=59_999)
    assert_contract(prepare_image(data, max_pixels=60_000))


@pytest.mark.parametrize(("kwargs", "match"), [({"size": 0}, "size"), ({"resize": "bicubic"}, "resize")])
def test_bad_arguments_are_programming_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        prepare_image(encode(Image.new("L", (4, 4))), **kwargs)  # type: ignore[arg-type]
    assert not isinstance(info.value, ImageError)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(SUPPORTED_FORMATS),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.integers(1, 10**6) | st.none(),
)
def test_corrupted_bytes_only_raise_image_errors(fmt: str, edits: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(encode(noise("RGB", (48, 40), seed=3), fmt))
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    try:
        result = prepare_image(bytes(data), size=32, max_pixels=1_000_000)
    except ImageError:
        return
    assert_contract(result, 32)


# --- geometry, orientation, resize ---------------------------------------------------------------------


def test_exif_orientation_is_applied() -> None:
    stored = np.zeros((100, 200), dtype=np.uint8)  # 200 wide, 100 high
    stored[:, :100] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left edge becomes the top
    result = prepare_image(encode(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=95))
    assert (result.original_width, result.original_height) == (100, 200)
    grey = result.pixels[..., 0].astype(int)
    assert grey[:100].mean() > 240  # top half white
    assert grey[124:].mean() < 15  # bottom half black
    assert abs(grey[:, :112].mean() - grey[:, 112:].mean()) < 5  # no left/right split any more


def test_no_letterbox_image_is_stretched() -> None:
    stored = np.zeros((50, 400), dtype=np.uint8)
    stored[:, 200:] = 255
    grey = prepare_image(encode(Image.fromarray(stored))).pixels[..., 0]
    assert grey[:, :100].max() == 0  # black reaches the top and bottom rows: no padding bands
    assert grey[:, 124:].min() == 255


@pytest.mark.parametrize("size", [1, 64, 299])
def test_size_is_honoured(size: int) -> None:
    assert_contract(prepare_image(encode(noise("RGB", (120, 90))), size=size), size)


def test_nearest_differs_from_bilinear_on_checkerboard() -> None:
    board = (np.indices((99, 99)).sum(axis=0) % 2 * 255).astype(np.uint8)
    data = encode(Image.fromarray(board))
    nearest = prepare_image(data, resize="nearest").pixels
    bilinear = prepare_image(data, resize="bilinear").pixels
    assert set(np.unique(nearest)) <= {0, 255}
    assert ((bilinear > 20) & (bilinear < 235)).mean() > 0.5
    assert not np.array_equal(nearest, bilinear)


def test_deterministic_and_no_normalisation() -> None:
    data = encode(noise("RGB", (211, 157)), "JPEG")
    first, second = prepare_image(data), prepare_image(data)
    assert np.array_equal(first.pixels, second.pixels)
    assert first.pixels is not second.pixels
    flat = prepare_image(encode(Image.new("L", (10, 10), 128)))
    assert np.all(flat.pixels == 128)  # bytes only: caffe mean subtraction lives in the model


def test_prepare_image_file_matches_bytes(tmp_path: Path) -> None:
    data = encode(noise("RGB", (64, 48)))
    path = tmp_path / "x.png"
    path.write_bytes(data)
    expected = prepare_image(data, size=96, resize="nearest").pixels
    for arg in (path, str(path)):
        assert np.array_equal(prepare_image_file(arg, size=96, resize="nearest").pixels, expected)


# --- modes and bit depths ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("1", "PNG"),
        ("L", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("RGB", "PNG"),
        ("RGBA", "PNG"),
        ("I;16", "PNG"),
    ]
    + [("L", "JPEG"), ("RGB", "JPEG"), ("CMYK", "JPEG")],
)
def test_stored_modes(mode: str, fmt: str) -> None:
    img = noise("RGB", (90, 70)).convert(mode) if mode != "I;16" else Image.new("I;16", (90, 70), 3000)
    result = prepare_image(encode(img, fmt))
    assert_contract(result)
    assert result.source_mode == mode
    assert (result.original_width, result.original_height) == (90, 70)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_composited_onto_black(mode: str) -> None:
    rgba = np.full((10, 30, 4), 255, dtype=np.uint8)
    rgba[:, 10:20, 3] = 128
    rgba[:, 20:, 3] = 0
    grey = prepare_image(encode(Image.fromarray(rgba).convert(mode)), size=30, resize="nearest").pixels[..., 0]
    assert grey[:, :10].min() == 255
    assert np.all(np.abs(grey[:, 10:20].astype(int) - 128) <= 1)
    assert grey[:, 20:].max() == 0


def test_palette_transparency_is_black() -> None:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.info["transparency"] = 1  # the white entry is transparent
    result = prepare_image(encode(img, transparency=1), size=4, resize="nearest")
    assert result.source_mode == "P"
    assert result.pixels.max() == 0


def test_twelve_bit_radiograph_keeps_its_gradient() -> None:
    ramp = np.tile(np.linspace(0, 4095, 256).round().astype(np.uint16), (32, 1))
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    assert (np.asarray(img.convert("L")) >= 250).mean() > 0.9  # the trap: Pillow clips at 255
    result = prepare_image(encode(img), size=256)
    row = result.pixels[16, :, 0].astype(int)
    assert result.source_mode == "I;16"
    assert not np.all(row >= 250)
    assert np.all(np.diff(row) >= 0)
    assert row[0] == 0
    assert row[-1] == 255


def test_sixteen_bit_full_range_and_eight_bit_valued_sixteen_bit() -> None:
    full = Image.fromarray(np.array([[0, 32768, 65535]] * 3, dtype=np.uint16))
    grey = prepare_image(encode(full), size=3, resize="nearest").pixels[0, :, 0]
    assert grey.tolist() == [0, 128, 255]
    low = Image.fromarray(np.array([[0, 100, 200]] * 3, dtype=np.uint16))  # values fit 8 bits: unchanged
    assert prepare_image(encode(low), size=3, resize="nearest").pixels[0, :, 0].tolist() == [0, 100, 200]


def _grey_of(img: Image.Image) -> list[int]:
    grey, colourfulness = preprocessing._to_grey(img)
    assert grey.mode == "L"
    assert colourfulness == 0.0
    return np.asarray(grey)[0].tolist()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_sixteen_bit_byte_orders(mode: str) -> None:
    values = np.array([[0, 2048, 4095]], dtype=">u2" if mode == "I;16B" else "<u2")
    assert _grey_of(Image.frombytes(mode, (3, 1), values.tobytes())) == [0, 128, 255]


def test_thirty_two_bit_integer_and_float_modes() -> None:
    # Not reachable from PNG/JPEG bytes in Pillow 13, but the helper is shared, so pin its behaviour.
    assert _grey_of(Image.fromarray(np.array([[-5, 0, 1023]], dtype=np.int32))) == [0, 0, 255]
    assert _grey_of(Image.fromarray(np.array([[0.0, 0.75, 1.5]], dtype=np.float32))) == [0, 128, 255]
    assert _grey_of(Image.fromarray(np.array([[-0.5, 0.5, 1.0]], dtype=np.float32))) == [0, 128, 255]
    assert _grey_of(Image.fromarray(np.array([[0.0, 500.0, 1000.0]], dtype=np.float32))) == [0, 128, 255]
    assert _grey_of(Image.fromarray(np.array([[np.nan, np.inf, 2.0]], dtype=np.float32))) == [0, 0, 255]


# --- colourfulness -------------------------------------------------------------------------------------


def test_colourfulness_separates_colour_photos_from_grey() -> None:
    hue = np.linspace(0, 255, 200).astype(np.uint8)
    full = np.full((150, 200), 255, np.uint8)
    photo = Image.fromarray(np.stack([np.tile(hue, (150, 1)), full, full], axis=2), "HSV").convert("RGB")
    colourful = prepare_image(encode(photo, "JPEG"))
    assert colourful.colourfulness > 80
    assert_contract(colourful)
    grey_rgb = noise("L", (200, 150)).convert("RGB")
    assert prepare_image(encode(grey_rgb)).colourfulness == 0.0
    assert prepare_image(encode(grey_rgb, "JPEG")).colourfulness < RADIOGRAPH_MAX_COLOURFULNESS
    assert prepare_image(encode(noise("L", (20, 20)))).colourfulness == 0.0


def test_colour_is_converted_with_luma_weights() -> None:
    red = prepare_image(encode(Image.new("RGB", (8, 8), (255, 0, 0))), size=8)
    assert np.all(red.pixels == 76)  # ITU-R 601 luma: 0.299 * 255
    assert 100 < red.colourfulness < 120


# --- real radiographs (FracAtlas, CC BY 4.0; see tests/data/xray/README.md) ----------------------------


@pytest.mark.parametrize(
    ("path", "mode", "width", "height"),
    [(SMALL_RGB, "RGB", 373, 454), (LARGE_GREY, "L", 2304, 2880), (ROTATED, "RGB", 454, 373)],
    ids=["small-rgb", "large-grey", "exif-rotated"],
)
def test_real_radiographs(path: Path, mode: str, width: int, height: int) -> None:
    result = prepare_image_file(path)
    assert_contract(result)
    assert (result.source_mode, result.original_width, result.original_height) == (mode, width, height)
    assert result.colourfulness < RADIOGRAPH_MAX_COLOURFULNESS
    assert result.pixels.std() > 20  # real content, not a flat field
    assert np.array_equal(result.pixels, prepare_image(path.read_bytes()).pixels)


def test_real_radiograph_exif_rotation_matches_pillow_reference() -> None:
    with Image.open(ROTATED) as img:
        upright = ImageOps.exif_transpose(img).convert("L")
        sideways = img.convert("L")
    expected = np.asarray(upright.resize((224, 224), Image.Resampling.BILINEAR))
    got = prepare_image_file(ROTATED).pixels[..., 0]
    assert np.array_equal(got, expected)  # 373x454 is below 2*size: no draft scaling, so exact
    assert not np.array_equal(got, np.asarray(sideways.resize((224, 224), Image.Resampling.BILINEAR)))


def test_large_jpeg_uses_draft_mode_and_keeps_quality(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, ...]] = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None) -> object:
        answer = original_draft(self, mode, size)
        calls.append((mode, size, self.size))
        return answer

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    result = prepare_image_file(LARGE_GREY)
    assert calls == [("L", (448, 448), (576, 720))]  # decoded at 1/4 scale, still >= 2*size per side
    with Image.open(LARGE_GREY) as img:
        full = np.asarray(img.convert("L").resize((224, 224), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(result.pixels[..., 0].astype(int) - full).mean() < 2.0


# --- properties ----------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 600),
    height=st.integers(1, 600),
    mode=st.sampled_from(["L", "RGB", "RGBA", "P", "I;16"]),
    jpeg=st.booleans(),
    size=st.sampled_from([32, 224]),
    resize=st.sampled_from(["bilinear", "nearest"]),
)
def test_any_image_meets_the_contract(width: int, height: int, mode: str, jpeg: bool, size: int, resize: str) -> None:
    if mode == "I;16":
        ramp = np.arange(width * height, dtype=np.uint32).reshape(height, width) % 4096
        img = Image.fromarray(ramp.astype(np.uint16))
    else:
        img = noise("RGB", (width, height), seed=width * 601 + height).convert(mode)
    fmt = "JPEG" if jpeg and mode in ("L", "RGB") else "PNG"
    data = encode(img, fmt)
    result = prepare_image(data, size=size, resize=resize)  # type: ignore[arg-type]
    assert_contract(result, size)
    assert (result.original_width, result.original_height) == (width, height)
    assert result.source_mode == mode
    assert np.array_equal(result.pixels, prepare_image(data, size=size, resize=resize).pixels)  # type: ignore[arg-type]


def test_module_imports_only_numpy_and_pillow() -> None:
    code = (
        "import sys, inference.preprocessing\n"
        "bad = [m for m in ('fastapi', 'onnxruntime', 'tensorflow', 'keras', 'cv2') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# --- decode plans: the cost of a decode, from the header -----------------------------------------------------------


def test_plan_reads_the_header_only(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[object] = []
    original_load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> object:
        loads.append(self)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    sixteen = plan_decode(encode(Image.fromarray(np.full((30, 40), 3000, dtype=np.uint16))))
    large = plan_decode(LARGE_GREY.read_bytes())
    assert loads == []
    assert (sixteen.format, sixteen.width, sixteen.height, sixteen.samples, sixteen.bytes_per_sample) == (
        "PNG",
        40,
        30,
        1,
        2,
    )
    assert (large.format, large.width, large.height, large.frames) == ("JPEG", 2304, 2880, 1)
    assert (large.decoded_width, large.decoded_height) == (576, 720)  # the draft prepare_image will use
    assert sixteen.working_bytes > 0
    assert large.working_bytes > 2304 * 2880 * 2  # progressive: full-size DCT coefficients until the last scan


def test_decode_budget_refuses_with_the_figure_and_the_limit() -> None:
    data = encode(noise("RGB", (300, 200)))
    plan = plan_decode(data)
    assert plan.samples == 3
    with pytest.raises(ImageTooLargeError) as caught:
        prepare_image(data, max_decode_bytes=plan.working_bytes - 1)
    reason = caught.value.reason
    assert http_status(caught.value) == 413
    assert "300x200 px x 3 samples x 1 bytes x" in reason
    assert "working copies" in reason
    assert "the limit per image is" in reason
    assert_contract(prepare_image(data, max_decode_bytes=plan.working_bytes))


def test_a_given_plan_is_used_and_its_limits_still_checked() -> None:
    data = encode(noise("L", (64, 48)))
    plan = plan_decode(data)
    assert np.array_equal(prepare_image(data, plan=plan).pixels, prepare_image(data).pixels)
    with pytest.raises(ImageTooLargeError):
        prepare_image(data, plan=plan, max_pixels=100)
    with pytest.raises(ImageTooLargeError):
        prepare_image(data, plan=plan, max_decode_bytes=1000)


def test_dicom_plan_carries_the_parse_prepare_image_reuses() -> None:
    data = encode_dicom(radiograph(np.stack([np.full((20, 30), v, dtype=np.uint16) for v in (1, 2, 3)])))
    plan = plan_decode(data)
    assert (plan.format, plan.width, plan.height, plan.frames, plan.bytes_per_sample) == ("DICOM", 30, 20, 3, 2)
    prepared = prepare_image(data, plan=plan)
    assert prepared.dicom is not None
    assert prepared.dicom.dataset is plan.dicom.dataset  # parsed once


def _realistic_grey(width: int, height: int) -> np.ndarray:
    with Image.open(LARGE_GREY) as img:
        return np.asarray(img.convert("L").resize((width, height), Image.Resampling.BILINEAR))


def _estimate_cases() -> list[tuple[str, bytes, bool]]:
    grey = _realistic_grey(4000, 4000)
    twelve = grey.astype(np.uint16) * 16 + 7
    rgb = np.stack([grey[:3000, :3000], grey[:3000, 1000:], grey[1000:, :3000]], axis=2)
    buffers = {}
    for name, img, params in [
        ("png-16bit-4000", Image.fromarray(twelve), {"compress_level": 1}),
        ("png-rgba-2000", Image.fromarray(np.dstack([rgb[:2000, :2000], grey[:2000, :2000]])), {"compress_level": 1}),
        ("jpeg-rgb-4000", Image.fromarray(np.dstack([grey] * 3)), {"quality": 90}),
        ("jpeg-grey-progressive-4000", Image.fromarray(grey), {"quality": 90, "progressive": True}),
    ]:
        fmt = "PNG" if name.startswith("png") else "JPEG"
        buffers[name] = (encode(img, fmt, **params), False)
    buffers["dicom-rgb-3000"] = (encode_dicom(radiograph(rgb, photometric="RGB")), True)
    sixteen = twelve[:2500, :2000]
    for syntax, name in [(RLELossless, "dicom-16bit-rle"), (JPEG2000Lossless, "dicom-16bit-j2k")]:
        ds = radiograph(sixteen, WindowCenter=2000, WindowWidth=3000)
        ds.compress(syntax, sixteen)
        buffers[name] = (encode_dicom(ds), True)
    palette = radiograph(grey[:2000, :2000], photometric="PALETTE COLOR", bits_stored=8)
    palette.RedPaletteColorLookupTableDescriptor = palette.GreenPaletteColorLookupTableDescriptor = [256, 0, 16]
    palette.BluePaletteColorLookupTableDescriptor = [256, 0, 16]
    ramp = (np.arange(256, dtype=np.uint16) * 257).tobytes()
    palette.RedPaletteColorLookupTableData = palette.GreenPaletteColorLookupTableData = ramp
    palette.BluePaletteColorLookupTableData = ramp[::-1]
    buffers["dicom-palette-2000"] = (encode_dicom(palette), True)
    lut = radiograph(sixteen[:1500, :1500], ModalityLUTSequence=[lut_item([4096, 0, 16], list(range(0, 65536, 16)))])
    buffers["dicom-modality-lut-1500"] = (encode_dicom(lut), True)
    dirty = radiograph(sixteen)  # unused high bits set: the frame is copied and shifted
    dirty.PixelData = (sixteen | 0xA000).tobytes()
    buffers["dicom-16bit-dirty-high-bits"] = (encode_dicom(dirty), True)
    floats = radiograph(np.zeros((2, 2), dtype=np.uint16))
    del floats.PixelData, floats.BitsStored, floats.HighBit, floats.PixelRepresentation
    floats.BitsAllocated, floats.Rows, floats.Columns = 32, 2500, 2000
    floats.FloatPixelData = sixteen.astype(np.float32).tobytes()
    buffers["dicom-float32"] = (encode_dicom(floats), True)
    return [(name, data, dicom) for name, (data, dicom) in buffers.items()]


@pytest.mark.parametrize(("name", "data", "dicom"), _estimate_cases(), ids=lambda value: str(value)[:32])
def test_estimate_is_not_below_the_real_peak(name: str, data: bytes, dicom: bool) -> None:
    """The real peak (RSS high-water of a fresh process: Pillow's and the codecs' buffers included)."""
    measured = measure_decode(data, dicom=dicom, display_max_side=1024)
    assert measured["status"] == 200, measured
    estimate, peak = int(measured["estimate"]), int(measured["peak_rise"])  # type: ignore[call-overload]
    assert estimate >= peak, f"{name}: estimated {estimate} bytes, the decode peaked at {peak}"
    assert estimate <= 3 * peak + 16_000_000, f"{name}: estimated {estimate} bytes for a peak of {peak}: too cautious"


# --- the lookup-table decode matches the per-pixel arithmetic it replaced ------------------------------------------


def _reference_grey(data: bytes, size: int) -> np.ndarray:
    """prepare_image's PNG/JPEG path before the lookup tables: float32 scaling per pixel, full-size copies."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            img.draft("L" if img.mode == "L" else "RGB", (2 * size, 2 * size))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        if img.mode.startswith("I;16"):
            raw = np.asarray(img)
            bits = max(8, int(raw.max()).bit_length())
            values = raw.astype(np.float32) * (255.0 / (2**bits - 1))
            grey = Image.fromarray(np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8))
        else:
            grey = img if img.mode == "L" else img.convert("RGB").convert("L")
        return np.asarray(grey)


@pytest.mark.parametrize(
    "source",
    [
        "png-8bit",
        "png-12bit-in-16",
        "png-16bit-full",
        "png-16bit-low-values",
        "png-rgb",
        "jpeg-large-grey",
        "jpeg-small-rgb",
        "jpeg-exif-rotated",
    ],
)
@pytest.mark.parametrize("resize", ["bilinear", "nearest"])
def test_decode_matches_the_reference_within_one_grey_level(source: str, resize: str) -> None:
    grey = _realistic_grey(700, 900)
    rng = np.random.default_rng(5)
    data = {
        "png-8bit": lambda: encode(Image.fromarray(grey)),
        "png-12bit-in-16": lambda: encode(
            Image.fromarray(grey.astype(np.uint16) * 16 + rng.integers(0, 16, grey.shape, dtype=np.uint16))
        ),
        "png-16bit-full": lambda: encode(Image.fromarray(grey.astype(np.uint16) * 257)),
        "png-16bit-low-values": lambda: encode(Image.fromarray(grey.astype(np.uint16) // 2)),
        "png-rgb": lambda: encode(Image.fromarray(np.dstack([grey, grey // 2, 255 - grey]))),
        "jpeg-large-grey": LARGE_GREY.read_bytes,
        "jpeg-small-rgb": SMALL_RGB.read_bytes,
        "jpeg-exif-rotated": ROTATED.read_bytes,
    }[source]()
    prepared = prepare_image(data, resize=resize, display_max_side=4096)  # type: ignore[arg-type]
    reference = _reference_grey(data, 224)
    assert prepared.display is not None
    worst = int(np.abs(prepared.display.astype(np.int32) - reference).max())
    assert worst <= 1, f"{source}: the full-size grey differs by {worst} levels"
    expected = np.asarray(Image.fromarray(reference).resize((224, 224), preprocessing._RESAMPLE[resize]))
    assert int(np.abs(prepared.pixels[..., 0].astype(np.int32) - expected).max()) <= 1
