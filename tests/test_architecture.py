"""Tests for training/architecture.py: the Keras models every other part of the system is built from."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from training import architecture
from training.architecture import (
    BACKBONE_NAME,
    CAFFE_MEAN_BGR,
    DEFAULT_PARTS,
    FEATURE_DIM,
    HEAD_NAME,
    IMAGE_SIZE,
    IMAGENET_NOTOP_FILE,
    PREPROCESSING_NAME,
    CaffePreprocessing,
    WeightsUnavailableError,
    backbone_of,
    build_head,
    build_router,
    build_specialist,
    head_dense_weights,
    head_of,
    resolve_backbone_weights,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def uint8_images(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def router() -> keras.Model:
    keras.utils.set_random_seed(1)
    return build_router(list(DEFAULT_PARTS))


@pytest.fixture(scope="module")
def specialist() -> keras.Model:
    keras.utils.set_random_seed(2)
    return build_specialist(part="hand")


def test_router_takes_uint8_images_and_returns_one_probability_per_part(router: keras.Model) -> None:
    (image,) = router.inputs
    assert tuple(image.shape) == (None, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert image.dtype == "uint8"
    assert tuple(router.outputs[0].shape) == (None, 3)
    assert router.name == "router"

    probs = router.predict(uint8_images(3, seed=0), verbose=0)
    assert probs.shape == (3, 3)
    assert probs.dtype == np.float32
    assert np.all(probs >= 0.0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_specialist_returns_two_class_probabilities(specialist: keras.Model) -> None:
    assert tuple(specialist.inputs[0].shape) == (None, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert specialist.inputs[0].dtype == "uint8"
    assert tuple(specialist.outputs[0].shape) == (None, 2)
    assert specialist.name == "specialist_hand"
    probs = specialist.predict(uint8_images(2, seed=1), verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("which", ["router", "specialist"])
def test_layer_order_is_image_preprocessing_backbone_head(
    which: str, router: keras.Model, specialist: keras.Model
) -> None:
    model = router if which == "router" else specialist
    assert [layer.name for layer in model.layers] == ["image", PREPROCESSING_NAME, BACKBONE_NAME, HEAD_NAME]
    assert isinstance(model.get_layer(PREPROCESSING_NAME), CaffePreprocessing)
    assert backbone_of(model) is model.layers[2]
    assert head_of(model) is model.layers[3]
    assert tuple(backbone_of(model).outputs[0].shape) == (None, FEATURE_DIM)


@pytest.mark.parametrize("which", ["router", "specialist"])
def test_backbone_is_frozen_and_only_the_head_trains(which: str, router: keras.Model, specialist: keras.Model) -> None:
    model = router if which == "router" else specialist
    backbone = backbone_of(model)
    assert backbone.trainable is False
    assert backbone.trainable_weights == []
    assert len(backbone.non_trainable_weights) > 300  # ResNet50: conv kernels, BN statistics...
    head = head_of(model)
    assert len(head.trainable_weights) == 6  # 3 x (kernel, bias)
    assert {id(w) for w in model.trainable_weights} == {id(w) for w in head.trainable_weights}


@pytest.mark.parametrize(("which", "n_classes"), [("router", 3), ("specialist", 2)])
def test_head_is_dense_128_50_n_relu_relu_softmax(
    which: str, n_classes: int, router: keras.Model, specialist: keras.Model
) -> None:
    model = router if which == "router" else specialist
    dense = [layer for layer in head_of(model).layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == [128, 50, n_classes]
    assert [layer.activation.__name__ for layer in dense] == ["relu", "relu", "softmax"]
    shapes = [(kernel.shape, bias.shape) for kernel, bias in head_dense_weights(model)]
    assert shapes == [((FEATURE_DIM, 128), (128,)), ((128, 50), (50,)), ((50, n_classes), (n_classes,))]


def test_build_head_refuses_fewer_than_two_classes() -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_head(1)


def test_caffe_preprocessing_equals_keras_preprocess_input() -> None:
    images = uint8_images(4, seed=3)
    ours = keras.ops.convert_to_numpy(CaffePreprocessing()(images))
    expected = keras.applications.resnet50.preprocess_input(images.astype("float32").copy())
    assert ours.dtype == np.float32
    assert ours.shape == images.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    # And written out: RGB -> BGR, minus the ImageNet means.
    manual = images[..., ::-1].astype(np.float32) - np.asarray(CAFFE_MEAN_BGR, dtype=np.float32)
    np.testing.assert_allclose(ours, manual, atol=1e-5, rtol=0)


@pytest.mark.parametrize("parts", [["hand", "elbow", "shoulder"], ["shoulder", "hand"], ["elbow", "elbow", "hand"]])
def test_build_router_refuses_unsorted_or_duplicate_parts(parts: list[str]) -> None:
    with pytest.raises(ValueError, match="sorted and unique"):
        build_router(parts)


@pytest.mark.parametrize("weights", [None, "none", "None"])
def test_no_weights_means_random_init(weights: str | None) -> None:
    assert resolve_backbone_weights(weights) is None


def test_missing_weights_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / IMAGENET_NOTOP_FILE
    with pytest.raises(WeightsUnavailableError, match="not found"):
        resolve_backbone_weights(missing)
    with pytest.raises(WeightsUnavailableError, match="not found"):
        resolve_backbone_weights(str(tmp_path))  # a folder is not a weights file


def test_existing_weights_file_is_passed_through(tmp_path: Path) -> None:
    weights = tmp_path / "backbone.h5"
    weights.write_bytes(b"not checked here")
    assert resolve_backbone_weights(weights) == str(weights)


def test_imagenet_weights_are_found_in_keras_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = tmp_path / "models" / IMAGENET_NOTOP_FILE
    cached.parent.mkdir()
    cached.write_bytes(b"cached")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert resolve_backbone_weights("imagenet") == str(cached)


def test_imagenet_weights_offline_fail_fast_with_advice(tmp_path: Path) -> None:
    # A fresh interpreter, because Keras reads KERAS_HOME once at import; and an unreachable URL
    # (a closed local port), so the download fails the same way on a connected machine.
    keras_home = tmp_path / "keras_home"
    keras_home.mkdir()
    script = textwrap.dedent(
        """
        from training import architecture
        architecture.IMAGENET_NOTOP_URL = "http://127.0.0.1:9/" + architecture.IMAGENET_NOTOP_FILE
        try:
            architecture.resolve_backbone_weights("imagenet")
        except architecture.WeightsUnavailableError as error:
            print("REFUSED:" + str(error))
        else:
            print("NOT REFUSED")
        """
    )
    env = {**os.environ, "KERAS_HOME": str(keras_home), "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    refused = [line for line in result.stdout.splitlines() if line.startswith("REFUSED:")]
    assert refused, result.stdout[-2000:]
    message = refused[0]
    assert "--weights" in message
    assert "--weights none" in message
    assert IMAGENET_NOTOP_FILE in message
    assert str(keras_home / "models") in message
    assert elapsed < 60
    assert not (keras_home / "models" / IMAGENET_NOTOP_FILE).exists()


def test_default_url_is_the_keras_applications_notop_file() -> None:
    assert architecture.IMAGENET_NOTOP_URL.endswith("/" + IMAGENET_NOTOP_FILE)
    assert architecture.IMAGENET_NOTOP_URL.startswith("https://")


def test_saved_keras_model_round_trips(tmp_path: Path, specialist: keras.Model) -> None:
    path = tmp_path / "specialist_hand.keras"
    specialist.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer(PREPROCESSING_NAME), CaffePreprocessing)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in specialist.layers]
    assert backbone_of(loaded).trainable_weights == []
    images = uint8_images(3, seed=4)
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), specialist.predict(images, verbose=0))
