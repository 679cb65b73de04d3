"""Export of the original project's H5 files (Keras-2 models with preprocessing outside): weights copied into our
architecture, checked against the originals, `resize: nearest` recorded; a real ResNet50 conversion.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pytest
from export_helpers import (
    LEGACY_FILES,
    PARTS,
    TOLERANCE,
    Exported,
    assert_close,
    bundle_folder_only,
    caffe,
    images,
    run_cli,
    session,
    sha256,
)

from export.sources import (
    LEGACY_ROUTER_FILE,
    SourceError,
    backbones_identical,
    load_keras_dir,
)
from inference.bundle import FusedGraph, load_bundle
from training.architecture import (
    IMAGE_SIZE,
)

pytestmark = pytest.mark.slow

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
