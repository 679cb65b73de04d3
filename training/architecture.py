"""The system's Keras models, built in one place for training and export alike.

Every model takes the prepared image as `(N, 224, 224, 3) uint8` (see `inference.preprocessing`) and does the
'caffe' normalisation itself in its first layer, so training, export and serving share one preprocessing and
the ONNX graph moves bytes, not floats.

    image (uint8) -> CaffePreprocessing -> ResNet50 (frozen, pooling='avg') -> head
    head: Dense(128, relu) -> Dense(50, relu) -> Dense(n, softmax)

The backbone and the head are nested models named `resnet50` and `head`, so the export can find them and
fuse several heads onto one backbone pass.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

IMAGE_SIZE = 224
FEATURE_DIM = 2048
DEFAULT_PARTS = ("elbow", "hand", "shoulder")
FRACTURE_LABELS = ("fractured", "normal")
# keras.applications.resnet50.preprocess_input ('caffe'): RGB -> BGR, subtract these per-channel means.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
BACKBONE_NAME = "resnet50"
HEAD_NAME = "head"
PREPROCESSING_NAME = "caffe_preprocessing"
IMAGENET_NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_NOTOP_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + IMAGENET_NOTOP_FILE

WeightsSpec = str | os.PathLike[str] | None


class WeightsUnavailableError(RuntimeError):
    """The requested backbone weights cannot be had on this machine."""


@keras.saving.register_keras_serializable(package="bfd")
class CaffePreprocessing(keras.layers.Layer):
    """uint8 RGB -> float32 BGR minus the ImageNet means: `resnet50.preprocess_input` inside the model."""

    def call(self, inputs):  # type: ignore[no-untyped-def,unused-ignore]
        x = keras.ops.cast(inputs, "float32")
        x = keras.ops.take(x, [2, 1, 0], axis=-1)
        return x - keras.ops.convert_to_tensor(np.asarray(CAFFE_MEAN_BGR, dtype="float32"))

    def compute_output_shape(self, input_shape):
        return input_shape


def resolve_backbone_weights(weights: WeightsSpec) -> str | None:
    """Turn 'imagenet' | None | 'none' | a file into what keras.applications accepts, failing fast offline."""
    if weights is None or str(weights).lower() == "none":
        return None
    if str(weights) != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"backbone weights file not found: {path}")
        return str(path)
    cached = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / IMAGENET_NOTOP_FILE
    if cached.is_file():
        return str(cached)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a network that drops packets must not hang the export
    try:
        return str(
            keras.utils.get_file(
                IMAGENET_NOTOP_FILE, IMAGENET_NOTOP_URL, cache_dir=str(cached.parent.parent), cache_subdir="models"
            )
        )
    except Exception as error:  # any network failure: say how to proceed offline
        raise WeightsUnavailableError(
            "ImageNet weights for ResNet50 could not be downloaded "
            f"({type(error).__name__}). On a connected machine fetch {IMAGENET_NOTOP_URL}, then pass "
            f"--weights /path/to/{IMAGENET_NOTOP_FILE} (or place it in {cached.parent}), "
            "or use --weights none for an untrained demo."
        ) from error
    finally:
        socket.setdefaulttimeout(previous_timeout)


def build_backbone(weights: WeightsSpec = None) -> keras.Model:
    """ResNet50 without its top, average-pooled to (N, 2048), frozen."""
    backbone = keras.applications.ResNet50(
        include_top=False,
        weights=resolve_backbone_weights(weights),
        pooling="avg",
        input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
        name=BACKBONE_NAME,
    )
    backbone.trainable = False
    return backbone


def build_head(n_classes: int, name: str = HEAD_NAME) -> keras.Model:
    """The trainable head on pooled features: (N, 2048) float32 -> (N, n_classes) probabilities."""
    if n_classes < 2:
        raise ValueError(f"a head needs at least 2 classes, got {n_classes}")
    return keras.Sequential(
        [
            keras.Input(shape=(FEATURE_DIM,), name="features"),
            keras.layers.Dense(128, activation="relu", name="dense_128"),
            keras.layers.Dense(50, activation="relu", name="dense_50"),
            keras.layers.Dense(n_classes, activation="softmax", name="probabilities"),
        ],
        name=name,
    )


def build_classifier(
    n_classes: int,
    *,
    weights: WeightsSpec = None,
    backbone: keras.Model | None = None,
    head: keras.Model | None = None,
    name: str = "classifier",
) -> keras.Model:
    """uint8 image -> preprocessing -> backbone -> head; pass `backbone` to share one between models."""
    backbone = backbone if backbone is not None else build_backbone(weights)
    head = head if head is not None else build_head(n_classes)
    image = keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype="uint8", name="image")
    features = backbone(CaffePreprocessing(name=PREPROCESSING_NAME)(image))
    return keras.Model(image, head(features), name=name)


def build_router(
    parts: Sequence[str] = DEFAULT_PARTS, weights: WeightsSpec = None, *, backbone: keras.Model | None = None
) -> keras.Model:
    """Body-part classifier; class order is the sorted part names."""
    ordered = sorted(parts)
    if list(parts) != ordered or len(set(ordered)) != len(ordered):
        raise ValueError(f"parts must be sorted and unique (the router's class order), got {list(parts)}")
    return build_classifier(len(ordered), weights=weights, backbone=backbone, name="router")


def build_specialist(
    weights: WeightsSpec = None, *, backbone: keras.Model | None = None, part: str = "part"
) -> keras.Model:
    """Fracture classifier for one body part; classes (fractured, normal)."""
    return build_classifier(len(FRACTURE_LABELS), weights=weights, backbone=backbone, name=f"specialist_{part}")


def compile_for_training(model: keras.Model) -> keras.Model:
    """The system's optimiser and loss: Adam 1e-4, categorical cross-entropy."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=1e-4),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def backbone_of(model: keras.Model) -> keras.Model:
    return model.get_layer(BACKBONE_NAME)


def head_of(model: keras.Model) -> keras.Model:
    return model.get_layer(HEAD_NAME)


def feature_map_model(backbone: keras.Model) -> keras.Model:
    """The backbone with two outputs: the last conv map (N, 7, 7, 2048) and its average pool (N, 2048)."""
    pools = [layer for layer in backbone.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D)]
    if not pools:
        raise ValueError(f"backbone {backbone.name!r} has no global average pooling layer")
    pool = pools[-1]
    return keras.Model(backbone.inputs, [pool.input, pool.output], name=f"{backbone.name}_features")


def head_dense_weights(model: keras.Model) -> list[tuple[np.ndarray, np.ndarray]]:
    """(kernel, bias) of each Dense layer of the head, input side first."""
    dense = [layer for layer in head_of(model).layers if isinstance(layer, keras.layers.Dense)]
    return [(np.asarray(layer.kernel), np.asarray(layer.bias)) for layer in dense]
