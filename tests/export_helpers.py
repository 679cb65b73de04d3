"""What the export tests share: their constants, checks, and the fixtures every module builds once for itself.

Each test module that imports a fixture from here gets its own (module-scoped) instance, built when the module
starts and dropped when it ends, so a module's ResNet50 models and conversions never weigh on the next one.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import onnxruntime as ort
import pytest

import bfd.cli
from export import graphs
from export.build import ExportOptions, export_bundle
from export.sources import (
    LEGACY_ROUTER_FILE,
    ModelSet,
    demo_models,
)
from inference.bundle import Bundle, Manifest, load_bundle
from inference.preprocessing import prepare_image_file
from training.architecture import (
    IMAGE_SIZE,
    backbone_of,
)

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


# Shared, expensive fixtures (module-scoped: one per importing module)


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
