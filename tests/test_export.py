"""Tests for the export (export/*.py): Keras models -> verified ONNX bundle, as the service will load it.

Every conversion is a real ResNet50 through tf2onnx, so the expensive results are built once per module and
shared: the demo models exported fused, the same models exported split, a set whose specialist has its own
backbone (auto -> split), the original project's H5 files through the CLI, and one INT8 bundle.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

import bfd.cli
from export import graphs
from export.build import HEADS_FILE, ExportError, ExportOptions, export_bundle
from export.sources import (
    LEGACY_ROUTER_FILE,
    ModelSet,
    SourceError,
    backbones_identical,
    demo_models,
    load_keras_dir,
)
from service.bundle import MANIFEST_NAME, Bundle, FusedGraph, Manifest, SplitGraph, load_bundle
from service.engine import Engine
from service.pipeline import predict_batch
from service.preprocessing import prepare_image_file
from training.architecture import (
    IMAGE_SIZE,
    backbone_of,
    build_backbone,
    build_classifier,
    build_head,
    feature_map_model,
    head_dense_weights,
    head_of,
)

pytestmark = pytest.mark.slow

PARTS = ["elbow", "hand", "shoulder"]
TOLERANCE = 1e-4  # what the export promises between ONNX and Keras probabilities
SAME_MODELS_TOLERANCE = 1e-5  # fused vs split graphs of the very same weights
XRAY_DIR = Path(__file__).parent / "data" / "xray"
XRAY_FILES = sorted(XRAY_DIR.rglob("*.jpg"))
LEGACY_FILES = {
    "router": LEGACY_ROUTER_FILE,
    "specialist/elbow": "ResNet50_Elbow_frac.h5",
    "specialist/hand": "ResNet50_Hand_frac.h5",
    "specialist/shoulder": "ResNet50_Shoulder_frac.h5",
}
PERTURBED_PART = "elbow"  # the demo elbow head answers mid-range probabilities, so a change shows


@dataclass(frozen=True)
class Exported:
    root: Path
    manifest: Manifest

    def bundle(self) -> Bundle:
        return load_bundle(self.root)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def caffe(images: np.ndarray) -> np.ndarray:
    return keras.applications.resnet50.preprocess_input(images.astype("float32"))


def keras_feature_map(backbone: keras.Model, images: np.ndarray) -> np.ndarray:
    """The last conv block's output, straight from Keras (independent of export.graphs)."""
    model = keras.Model(backbone.inputs, backbone.get_layer("conv5_block3_out").output)
    return model.predict(caffe(images), verbose=0)


def assert_close(got: np.ndarray, expected: np.ndarray, tolerance: float, what: str) -> None:
    assert got.shape == expected.shape, what
    diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
    assert diff <= tolerance, f"{what}: max abs diff {diff:.3g} > {tolerance:.1g}"


def assert_map_close(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert_close(got, expected, TOLERANCE * max(1.0, float(np.max(np.abs(expected)))), what)


def bundle_folder_only(parent: Path, name: str) -> None:
    """`parent` holds the bundle `name` and nothing else: no staging folder left behind."""
    assert sorted(p.name for p in parent.iterdir()) == [name]


def run_cli(*args: object) -> int:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["bfd"])  # keep the real command line out of the parser's way
        return bfd.cli.main(["export", *map(str, args)])


# ---------------------------------------------------------------------------------------------------------
# Shared, expensive fixtures


@pytest.fixture(scope="module")
def demo_set() -> ModelSet:
    return demo_models()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Fresh images, not the export's own verification images: random gray/colour plus the real JPEGs."""
    rng = np.random.default_rng(2024)
    gray = rng.integers(0, 256, size=(5, IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8)
    colour = rng.integers(0, 256, size=(4, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    real = [prepare_image_file(path, resize="bilinear").pixels for path in XRAY_FILES]
    batch = np.concatenate([np.repeat(gray, 3, axis=-1), colour, np.stack(real)])
    assert batch.shape == (9 + len(XRAY_FILES), IMAGE_SIZE, IMAGE_SIZE, 3)
    return batch


@pytest.fixture(scope="module")
def keras_answers(demo_set: ModelSet, images: np.ndarray) -> graphs.Reference:
    """What the demo Keras models answer on `images`, computed directly with Keras."""
    body = demo_set.router.predict(images, verbose=0)
    p_fractured = np.stack([demo_set.specialists[p].predict(images, verbose=0)[:, 0] for p in PARTS], axis=1)
    fmap = keras_feature_map(backbone_of(demo_set.router), images)
    return graphs.Reference(body, p_fractured, {"router": fmap})


@pytest.fixture(scope="module")
def fused(demo_set: ModelSet, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    out = tmp_path_factory.mktemp("fused") / "demo"
    return Exported(out, export_bundle(demo_set, out, ExportOptions(name="demo-fused")))


@pytest.fixture(scope="module")
def split(demo_set: ModelSet, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    out = tmp_path_factory.mktemp("split") / "demo"
    return Exported(out, export_bundle(demo_set, out, ExportOptions(graph="split")))


@pytest.fixture(scope="module")
def differing_set(demo_set: ModelSet) -> ModelSet:
    """The demo models, except that one specialist runs on its own, slightly different backbone."""
    backbone = build_backbone(None)  # a new object: demo_models shares ONE backbone among all models
    backbone.set_weights(backbone_of(demo_set.router).get_weights())
    bn = backbone.get_layer("conv5_block3_3_bn")
    gamma, *rest = bn.get_weights()
    bn.set_weights([gamma * 1.5, *rest])
    head = build_head(2)
    head.set_weights(head_of(demo_set.specialists[PERTURBED_PART]).get_weights())
    specialist = build_classifier(2, backbone=backbone, head=head, name=f"specialist_{PERTURBED_PART}")
    return ModelSet(
        parts=list(PARTS),
        router=demo_set.router,
        specialists={**demo_set.specialists, PERTURBED_PART: specialist},
        kind="demo",
        trained=False,
        backbone_weights="none",
    )


@pytest.fixture(scope="module")
def auto_split(differing_set: ModelSet, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    out = tmp_path_factory.mktemp("auto") / "differing"
    return Exported(out, export_bundle(differing_set, out, ExportOptions(graph="auto")))


# ---------------------------------------------------------------------------------------------------------
# Fused form


def test_demo_export_is_fused_untrained_fp32_and_verified(fused: Exported) -> None:
    manifest = fused.manifest
    assert isinstance(manifest.graph, FusedGraph)
    assert manifest.graph.form == "fused"  # graph="auto" and one shared backbone
    assert manifest.graph.file == "model.onnx"
    assert manifest.precision == "fp32"
    assert manifest.quantization is None
    assert manifest.trained is False
    assert manifest.name == "demo-fused"
    assert manifest.body_parts == PARTS
    assert manifest.fracture_labels == ("fractured", "normal")
    assert set(manifest.thresholds) == set(PARTS)
    for thresholds in manifest.thresholds.values():
        assert thresholds.decision == 0.5
        assert thresholds.high_sensitivity is None
        assert thresholds.high_specificity is None
    assert manifest.source.kind == "demo"
    assert manifest.source.files == []
    assert manifest.source.backbone_weights == "none"
    assert manifest.input.name == "image"
    assert manifest.input.dtype == "uint8"
    assert manifest.input.resize == "bilinear"
    assert manifest.verification.images == 8
    assert manifest.verification.tolerance == TOLERANCE
    assert 0.0 <= manifest.verification.max_abs_diff <= TOLERANCE


def test_fused_bundle_files_are_listed_with_their_hashes(fused: Exported) -> None:
    loaded = fused.bundle()  # verifies every size and sha256
    assert loaded.manifest == fused.manifest
    assert sorted(p.name for p in fused.root.iterdir()) == sorted([MANIFEST_NAME, "model.onnx", HEADS_FILE])
    assert sorted(entry.path for entry in fused.manifest.files) == sorted(["model.onnx", HEADS_FILE])
    for entry in fused.manifest.files:
        path = fused.root / entry.path
        assert entry.sha256 == sha256(path)
        assert entry.size_bytes == path.stat().st_size
    assert fused.manifest.version.endswith("-" + sha256(fused.root / "model.onnx")[:8])
    bundle_folder_only(fused.root.parent, fused.root.name)


def test_heads_file_holds_every_heads_dense_weights(fused: Exported, demo_set: ModelSet) -> None:
    with np.load(fused.root / HEADS_FILE) as heads:
        expected_keys = set()
        for key, model in demo_set.models().items():
            for index, (kernel, bias) in enumerate(head_dense_weights(model)):
                expected_keys |= {f"{key}/{index}/kernel", f"{key}/{index}/bias"}
                np.testing.assert_array_equal(heads[f"{key}/{index}/kernel"], kernel)
                np.testing.assert_array_equal(heads[f"{key}/{index}/bias"], bias)
        assert set(heads.files) == expected_keys
    assert len(expected_keys) == 4 * 3 * 2


def test_fused_onnx_inputs_and_outputs(fused: Exported, images: np.ndarray) -> None:
    graph = session(fused.root / "model.onnx")
    (image,) = graph.get_inputs()
    assert image.name == "image"
    assert image.type == "tensor(uint8)"
    assert image.shape[1:] == [IMAGE_SIZE, IMAGE_SIZE, 3]
    assert isinstance(image.shape[0], str)  # dynamic batch
    assert [o.name for o in graph.get_outputs()] == ["body_part_probs", "p_fractured", "feature_map"]
    for batch in (images[:1], images):
        body, p_fractured, fmap = graph.run(None, {"image": batch})
        n = len(batch)
        assert body.shape == (n, 3)
        assert p_fractured.shape == (n, 3)
        assert fmap.shape == (n, 7, 7, 2048)
        assert body.dtype == p_fractured.dtype == fmap.dtype == np.float32


def test_fused_onnx_matches_the_keras_models(
    fused: Exported, images: np.ndarray, keras_answers: graphs.Reference
) -> None:
    assert len(images) >= 8
    body, p_fractured, fmap = session(fused.root / "model.onnx").run(None, {"image": images})
    assert_close(body, keras_answers.body_part_probs, TOLERANCE, "body_part_probs")
    assert_close(p_fractured, keras_answers.p_fractured, TOLERANCE, "p_fractured")
    assert_map_close(fmap, keras_answers.feature_maps["router"], "feature_map")
    np.testing.assert_allclose(body.sum(axis=1), 1.0, atol=1e-5)
    assert np.all((p_fractured >= 0.0) & (p_fractured <= 1.0))
    # The specialists' columns are not copies of one another (a wiring mistake would show here).
    assert np.ptp(p_fractured[:, PARTS.index("elbow")]) > 1e-3


def test_verification_refuses_any_disagreement(
    fused: Exported, images: np.ndarray, keras_answers: graphs.Reference
) -> None:
    path = fused.root / "model.onnx"
    assert graphs.verify_fused(path, keras_answers, images) <= TOLERANCE

    p_fractured = keras_answers.p_fractured.copy()
    p_fractured[3, 1] += 10 * TOLERANCE
    wrong_p = graphs.Reference(keras_answers.body_part_probs, p_fractured, keras_answers.feature_maps)
    with pytest.raises(graphs.VerificationError, match="p_fractured"):
        graphs.verify_fused(path, wrong_p, images)

    body = keras_answers.body_part_probs.copy()
    body[0, 0] = np.nan
    wrong_body = graphs.Reference(body, keras_answers.p_fractured, keras_answers.feature_maps)
    with pytest.raises(graphs.VerificationError, match="body_part_probs"):
        graphs.verify_fused(path, wrong_body, images)

    fmap = keras_answers.feature_maps["router"].copy()
    fmap[1, 3, 3, 7] += 0.01 * max(1.0, float(np.abs(fmap).max()))
    wrong_map = graphs.Reference(keras_answers.body_part_probs, keras_answers.p_fractured, {"router": fmap})
    with pytest.raises(graphs.VerificationError, match="feature_map"):
        graphs.verify_fused(path, wrong_map, images)

    with pytest.raises(graphs.VerificationError, match="shape"):
        graphs.verify_fused(path, keras_answers, images[:-1])


# ---------------------------------------------------------------------------------------------------------
# Split form, and fused vs split of the same models


def test_split_export_of_the_same_models(split: Exported, fused: Exported) -> None:
    manifest = split.manifest
    assert isinstance(manifest.graph, SplitGraph)
    assert manifest.graph.router == "router.onnx"
    assert manifest.graph.specialists == {p: f"specialist_{p}.onnx" for p in PARTS}
    assert 0.0 <= manifest.verification.max_abs_diff <= TOLERANCE
    assert split.bundle().manifest == manifest
    files = ["router.onnx", *(f"specialist_{p}.onnx" for p in PARTS), HEADS_FILE]
    assert sorted(entry.path for entry in manifest.files) == sorted(files)
    assert sorted(p.name for p in split.root.iterdir()) == sorted([*files, MANIFEST_NAME])
    # Same models, same heads file contents as the fused form.
    with np.load(split.root / HEADS_FILE) as a, np.load(fused.root / HEADS_FILE) as b:
        assert set(a.files) == set(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


def test_split_onnx_inputs_and_outputs(split: Exported, images: np.ndarray) -> None:
    router = session(split.root / "router.onnx")
    assert [(i.name, i.type) for i in router.get_inputs()] == [("image", "tensor(uint8)")]
    assert [o.name for o in router.get_outputs()] == ["body_part_probs"]
    (body,) = router.run(None, {"image": images[:2]})
    assert body.shape == (2, 3)
    for part in PARTS:
        specialist = session(split.root / f"specialist_{part}.onnx")
        assert [(i.name, i.type) for i in specialist.get_inputs()] == [("image", "tensor(uint8)")]
        assert [o.name for o in specialist.get_outputs()] == ["p_fractured", "feature_map"]
        p_fractured, fmap = specialist.run(None, {"image": images[:2]})
        assert p_fractured.shape == (2, 1)
        assert fmap.shape == (2, 7, 7, 2048)


def _hinted_batch(count: int) -> tuple[list[str | None], list[bool]]:
    hints: list[str | None] = [None, "elbow", "hand", None, "shoulder", "elbow", None, "hand", None, None, None]
    hints = (hints + [None] * count)[:count]
    wants = [i % 3 == 1 for i in range(count)]
    return hints, wants


def test_fused_and_split_answer_alike_through_the_pipeline(
    fused: Exported, split: Exported, images: np.ndarray, keras_answers: graphs.Reference
) -> None:
    hints, wants = _hinted_batch(len(images))
    assert {h for h in hints if h} == set(PARTS)
    assert None in hints
    from_fused = predict_batch(Engine(fused.bundle(), providers=["cpu"]), images, hints, wants)
    from_split = predict_batch(Engine(split.bundle(), providers=["cpu"]), images, hints, wants)
    assert len(from_fused) == len(from_split) == len(images)
    for i, (f, s) in enumerate(zip(from_fused, from_split, strict=True)):
        assert f.body_part == s.body_part, i
        assert f.body_part_from_hint == s.body_part_from_hint == (hints[i] is not None)
        if hints[i] is not None:
            assert f.body_part == hints[i]
            assert s.body_part_probs is None  # the split router is skipped for hinted items
        else:
            assert s.body_part_probs is not None
            assert f.body_part == PARTS[int(np.argmax(keras_answers.body_part_probs[i]))]
            assert_close(s.body_part_probs, f.body_part_probs, SAME_MODELS_TOLERANCE, f"probs {i}")
        assert f.body_part_probs is not None
        assert abs(f.p_fractured - s.p_fractured) <= SAME_MODELS_TOLERANCE, i
        expected = keras_answers.p_fractured[i, PARTS.index(f.body_part)]
        assert abs(f.p_fractured - expected) <= TOLERANCE, i
        if wants[i]:
            assert f.feature_map is not None
            assert s.feature_map is not None
            assert f.feature_map.shape == s.feature_map.shape == (7, 7, 2048)
            scale = max(1.0, float(np.abs(f.feature_map).max()))
            assert_close(s.feature_map, f.feature_map, SAME_MODELS_TOLERANCE * scale, f"map {i}")
        else:
            assert f.feature_map is None
            assert s.feature_map is None


# ---------------------------------------------------------------------------------------------------------
# Graph form follows the backbones


def test_backbones_identical_compares_weights(demo_set: ModelSet, differing_set: ModelSet) -> None:
    assert backbones_identical(demo_set)
    assert not backbones_identical(differing_set)
    own = backbone_of(differing_set.specialists[PERTURBED_PART])
    assert own is not backbone_of(differing_set.router)


def test_auto_writes_split_when_a_backbone_differs(
    auto_split: Exported, fused: Exported, differing_set: ModelSet, images: np.ndarray
) -> None:
    manifest = auto_split.manifest
    assert isinstance(manifest.graph, SplitGraph)
    assert 0.0 <= manifest.verification.max_abs_diff <= TOLERANCE
    auto_split.bundle()

    # The perturbed specialist's graph runs ITS backbone: it matches its Keras model...
    p_own, fmap_own = session(auto_split.root / f"specialist_{PERTURBED_PART}.onnx").run(None, {"image": images})
    specialist = differing_set.specialists[PERTURBED_PART]
    assert_close(p_own[:, 0], specialist.predict(images, verbose=0)[:, 0], TOLERANCE, "own p_fractured")
    assert_map_close(fmap_own, keras_feature_map(backbone_of(specialist), images), "own feature_map")
    # ...and visibly differs from the shared-backbone answer of the fused demo bundle.
    _, p_fused, fmap_fused = session(fused.root / "model.onnx").run(None, {"image": images})
    assert float(np.max(np.abs(p_own[:, 0] - p_fused[:, PARTS.index(PERTURBED_PART)]))) > 1e-3
    assert float(np.max(np.abs(fmap_own - fmap_fused))) > 1e-2
    # The unchanged models still answer like the fused bundle.
    (body,) = session(auto_split.root / "router.onnx").run(None, {"image": images})
    body_fused, *_ = session(fused.root / "model.onnx").run(None, {"image": images})
    assert_close(body, body_fused, SAME_MODELS_TOLERANCE, "router")
    p_hand, _ = session(auto_split.root / "specialist_hand.onnx").run(None, {"image": images})
    assert_close(p_hand[:, 0], p_fused[:, PARTS.index("hand")], SAME_MODELS_TOLERANCE, "hand")


def test_fused_is_refused_when_a_backbone_differs(
    differing_set: ModelSet, tmp_path_factory: pytest.TempPathFactory
) -> None:
    parent = tmp_path_factory.mktemp("refused-fused")
    with pytest.raises(ExportError, match="identical backbones"):
        export_bundle(differing_set, parent / "bundle", ExportOptions(graph="fused"))
    assert list(parent.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# The original project's H5 files


def original_model(n_classes: int, backbone_weights: list[np.ndarray] | None) -> keras.Model:
    """The original project's flat Keras-2 model: preprocess_input outside, ResNet50 + Dense head."""
    base = keras.applications.ResNet50(
        include_top=False, weights=None, pooling="avg", input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3)
    )
    if backbone_weights is not None:
        base.set_weights(backbone_weights)
    x = keras.layers.Dense(128, activation="relu")(base.output)
    x = keras.layers.Dense(50, activation="relu")(x)
    out = keras.layers.Dense(n_classes, activation="softmax")(x)
    return keras.Model(base.input, out)


@dataclass(frozen=True)
class Legacy:
    directory: Path
    originals: dict[str, keras.Model]  # 'router' and 'specialist/<part>'


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Legacy:
    keras.utils.set_random_seed(7)
    directory = tmp_path_factory.mktemp("legacy")
    # One backbone's weights for all four files, so the export may fuse them.
    shared = keras.applications.ResNet50(
        include_top=False, weights=None, pooling="avg", input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3)
    ).get_weights()
    originals = {"router": original_model(3, shared)}
    for part in PARTS:
        originals[f"specialist/{part}"] = original_model(2, shared)
    for key, model in originals.items():
        model.save(directory / LEGACY_FILES[key])
    (directory / "notes.txt").write_text("not a model\n")
    return Legacy(directory, originals)


@pytest.fixture(scope="module")
def legacy_bundle(legacy: Legacy, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    out = tmp_path_factory.mktemp("legacy-out") / "original"
    assert run_cli("--keras-dir", legacy.directory, "--untrained", "--out", out) == 0
    bundle = load_bundle(out)
    return Exported(out, bundle.manifest)


def test_legacy_files_load_as_canonical_models(legacy: Legacy) -> None:
    model_set = load_keras_dir(legacy.directory, trained=False)
    assert model_set.kind == "legacy-h5"
    assert model_set.trained is False
    assert model_set.resize == "nearest"
    assert model_set.parts == PARTS
    assert [p.name for p in model_set.source_files] == list(LEGACY_FILES.values())
    assert set(model_set.originals) == set(LEGACY_FILES)
    assert backbones_identical(model_set)
    for key, model in model_set.models().items():
        assert [layer.name for layer in model.layers][1:] == ["caffe_preprocessing", "resnet50", "head"], key
        assert model.inputs[0].dtype == "uint8"


def test_legacy_export_through_the_cli(legacy: Legacy, legacy_bundle: Exported) -> None:
    manifest = legacy_bundle.manifest
    assert manifest.source.kind == "legacy-h5"
    assert manifest.input.resize == "nearest"
    assert manifest.trained is False  # --untrained
    assert manifest.name == legacy_bundle.root.name
    assert manifest.body_parts == PARTS
    # Four separate backbones with equal weights: compared by value, so fused.
    assert isinstance(manifest.graph, FusedGraph)
    assert 0.0 <= manifest.verification.max_abs_diff <= TOLERANCE
    assert [entry.path for entry in manifest.source.files] == list(LEGACY_FILES.values())
    for entry in manifest.source.files:
        path = legacy.directory / entry.path
        assert entry.sha256 == sha256(path)
        assert entry.size_bytes == path.stat().st_size
    bundle_folder_only(legacy_bundle.root.parent, legacy_bundle.root.name)


def test_legacy_bundle_answers_like_the_original_models(
    legacy: Legacy, legacy_bundle: Exported, images: np.ndarray
) -> None:
    body, p_fractured, _ = session(legacy_bundle.root / "model.onnx").run(None, {"image": images})
    float_inputs = caffe(images)
    expected_body = legacy.originals["router"].predict(float_inputs, verbose=0)
    assert_close(body, expected_body, TOLERANCE, "router")
    for index, part in enumerate(PARTS):
        expected = legacy.originals[f"specialist/{part}"].predict(float_inputs, verbose=0)[:, 0]
        assert_close(p_fractured[:, index], expected, TOLERANCE, part)
    # The heads are different models: their columns differ.
    assert float(np.max(np.abs(p_fractured[:, 0] - p_fractured[:, 1]))) > 1e-3


def test_legacy_folder_needs_specialists(tmp_path: Path, legacy: Legacy) -> None:
    shutil.copy(legacy.directory / LEGACY_ROUTER_FILE, tmp_path / LEGACY_ROUTER_FILE)
    with pytest.raises(SourceError, match="no ResNet50_<Part>_frac.h5"):
        load_keras_dir(tmp_path)


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


# ---------------------------------------------------------------------------------------------------------
# CLI refusals (exit code 2, nothing written)


def _cli_refuses(out: Path, *args: object) -> None:
    before = sorted(p.name for p in out.parent.iterdir())
    assert run_cli(*args, "--out", out) == 2
    assert sorted(p.name for p in out.parent.iterdir()) == before


def test_cli_int8_needs_calibration(tmp_path: Path) -> None:
    _cli_refuses(tmp_path / "bundle", "--demo", "--int8")


def test_cli_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    _cli_refuses(out, "--demo")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_cli_demo_cannot_be_trained(tmp_path: Path) -> None:
    _cli_refuses(tmp_path / "bundle", "--demo", "--trained")


def test_cli_needs_enough_verification_images(tmp_path: Path) -> None:
    _cli_refuses(tmp_path / "bundle", "--demo", "--verify-images", "4")


def test_cli_refuses_a_folder_without_models(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _cli_refuses(tmp_path / "bundle", "--keras-dir", empty)


def test_cli_sources_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--demo", "--keras-dir", tmp_path, "--out", tmp_path / "bundle")
    assert exit_info.value.code == 2


def test_cli_top_level_option_before_the_subcommand(tmp_path: Path) -> None:
    # '--log-level WARNING' takes two words: the subcommand must still be found (and parse, not SystemExit).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["bfd"])
        code = bfd.cli.main(["--log-level", "WARNING", "export", "--demo", "--trained", "--out", str(tmp_path)])
    assert code == 2


def test_export_options_are_checked_before_any_work(demo_set: ModelSet, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--calibration"):
        export_bundle(demo_set, tmp_path / "a", ExportOptions(int8=True))
    with pytest.raises(ExportError, match="at least 8"):
        export_bundle(demo_set, tmp_path / "b", ExportOptions(verify_images=7))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Grad-CAM at serving time (numpy, heads.npz + the bundle's feature map) equals TensorFlow's GradientTape


def tape_grad_cam(specialist: keras.Model, image: np.ndarray) -> np.ndarray:
    """Textbook Grad-CAM with TensorFlow: d(pre-softmax 'fractured' logit) / d(last conv map)."""
    import tensorflow as tf

    conv_model = feature_map_model(backbone_of(specialist))
    dense = [layer for layer in head_of(specialist).layers if isinstance(layer, keras.layers.Dense)]
    with tf.GradientTape() as tape:
        conv, _ = conv_model([caffe(image[None])])
        hidden = tf.reduce_mean(conv, axis=(1, 2))
        for layer in dense[:-1]:
            hidden = layer(hidden)
        logits = tf.matmul(hidden, dense[-1].kernel) + dense[-1].bias  # before the softmax
        score = logits[:, 0]  # 'fractured'
    gradients = tape.gradient(score, conv)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(conv * weights, axis=-1))[0].numpy()
    return cam / cam.max() if cam.max() > 0 else cam


def test_serving_grad_cam_equals_gradient_tape_on_the_keras_model(
    fused: Exported, demo_set: ModelSet, images: np.ndarray
) -> None:
    from service.heatmap import HeadBank, grad_cam

    engine = Engine(load_bundle(fused.root))
    bank = HeadBank.load(fused.root / HEADS_FILE)
    compared = 0
    for part in PARTS:
        hints: list[str | None] = [part] * len(images)
        predictions = predict_batch(engine, images, hints=hints, want_feature_map=[True] * len(images))
        for image, prediction in zip(images, predictions, strict=True):
            assert prediction.feature_map is not None
            ours = grad_cam(prediction.feature_map, bank.specialist(part))
            reference = tape_grad_cam(demo_set.specialists[part], image)
            assert ours.shape == reference.shape == (7, 7)
            np.testing.assert_allclose(ours, reference, atol=2e-3)
            compared += int(reference.max() > 0)
    assert compared >= len(PARTS)  # not only all-zero maps
