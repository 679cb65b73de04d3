"""Static INT8 export: calibrated on radiographs, checked for agreement with fp32, refused below the bound."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from export_helpers import (
    XRAY_FILES,
    Exported,
    bundle_folder_only,
    demo_set,
    fused,
    session,
)
from PIL import Image

from export.build import HEADS_FILE, ExportError, ExportOptions, export_bundle
from export.sources import (
    ModelSet,
)
from inference.bundle import MANIFEST_NAME, FusedGraph
from inference.engine import Engine
from inference.pipeline import predict_batch
from inference.preprocessing import prepare_image_file

pytestmark = pytest.mark.slow

# ---------------------------------------------------------------------------------------------------------
# INT8


def synthetic_radiograph(seed: int) -> Image.Image:
    """A gray, radiograph-like picture: a dark field, a bright 'bone' band, gradients and noise."""
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(200, 480)), int(rng.integers(200, 480))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    distance = np.abs((x - width / 2) * np.cos(angle) + (y - height / 2) * np.sin(angle))
    bone = 170.0 * np.exp(-((distance / rng.uniform(15, 60)) ** 2))
    field = 30.0 + 40.0 * (x / width) + rng.normal(0.0, 12.0, size=(height, width))
    return Image.fromarray(np.clip(field + bone, 0, 255).astype(np.uint8), mode="L")


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("calibration")
    for path in XRAY_FILES:
        shutil.copy(path, directory / path.name)
    (directory / "synthetic").mkdir()
    for seed in range(12):
        synthetic_radiograph(seed).save(directory / "synthetic" / f"radiograph_{seed:02d}.png")
    (directory / "README.txt").write_text("ignored: not an image\n")
    return directory


MIN_AGREEMENT = 0.75


@pytest.fixture(scope="module")
def int8(demo_set: ModelSet, calibration_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    out = tmp_path_factory.mktemp("int8") / "demo"
    options = ExportOptions(name="demo-int8", int8=True, calibration_dir=calibration_dir, min_agreement=MIN_AGREEMENT)
    return Exported(out, export_bundle(demo_set, out, options))


def test_int8_bundle_reports_its_quantization(int8: Exported, fused: Exported) -> None:
    manifest = int8.manifest
    assert manifest.precision == "int8"
    assert isinstance(manifest.graph, FusedGraph)
    assert manifest.version.endswith("-int8")
    assert int8.bundle().manifest == manifest
    report = manifest.quantization
    assert report is not None
    images = len(XRAY_FILES) + 12
    assert report.calibration_images + report.held_out_images == images
    assert report.held_out_images == max(4, images // 4)
    assert report.calibration_images >= 8
    for agreement in (report.body_part_agreement, report.fracture_agreement):
        assert 0.0 <= agreement <= 1.0
        assert agreement >= MIN_AGREEMENT
        # Whole images: an agreement is a count over the held-out set.
        assert round(agreement * report.held_out_images, 6) == round(agreement * report.held_out_images)
    assert 0.0 <= report.max_probability_diff <= 1.0
    assert report.min_agreement == MIN_AGREEMENT
    # One precision per bundle: the int8 graph replaced the fp32 one, no working files left.
    assert sorted(p.name for p in int8.root.iterdir()) == sorted([MANIFEST_NAME, "model.onnx", HEADS_FILE])
    assert (int8.root / "model.onnx").stat().st_size < 0.5 * (fused.root / "model.onnx").stat().st_size
    bundle_folder_only(int8.root.parent, int8.root.name)


def test_int8_graph_is_quantized_and_still_answers(int8: Exported, fused: Exported, calibration_dir: Path) -> None:
    ops = {node.op_type for node in onnx.load(str(int8.root / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    graph = session(int8.root / "model.onnx")
    assert [(i.name, i.type) for i in graph.get_inputs()] == [("image", "tensor(uint8)")]
    assert [o.name for o in graph.get_outputs()] == ["body_part_probs", "p_fractured", "feature_map"]

    real = np.stack([prepare_image_file(p, resize="bilinear").pixels for p in XRAY_FILES])
    from_int8 = predict_batch(Engine(int8.bundle(), providers=["cpu"]), real)
    from_fp32 = predict_batch(Engine(fused.bundle(), providers=["cpu"]), real)
    for q, f in zip(from_int8, from_fp32, strict=True):
        assert q.body_part == f.body_part
        assert abs(q.p_fractured - f.p_fractured) < 0.1


def test_int8_under_min_agreement_is_refused_and_leaves_nothing(
    demo_set: ModelSet, calibration_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    parent = tmp_path_factory.mktemp("int8-refused")
    options = ExportOptions(int8=True, calibration_dir=calibration_dir, min_agreement=1.01)
    with pytest.raises(ExportError, match="agreement"):
        export_bundle(demo_set, parent / "bundle", options)
    assert list(parent.iterdir()) == []  # neither the bundle nor its staging folder
