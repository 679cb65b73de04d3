"""Keras -> ONNX: the graphs a bundle holds, their conversion with tf2onnx, and their verification.

Fused form: image -> preprocessing -> backbone once -> (router head, every specialist head), with the last
conv feature map as a third output for heatmaps. Split form: the router as it is, and per specialist a graph
returning P(fractured) and its own feature map. Verification compares every ONNX output with the SOURCE
Keras models (not the rebuilt graph), so a fusion mistake is caught as well as a conversion one.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx
import tf2onnx.optimizer

from export.memory import release_memory
from export.sources import ModelSet
from training.architecture import (
    CAFFE_MEAN_BGR,
    IMAGE_SIZE,
    CaffePreprocessing,
    backbone_of,
    build_head,
    feature_map_model,
    head_of,
)

log = logging.getLogger(__name__)

OPSET = 17
CATCH_ERRORS_ENV = "TF2ONNX_CATCH_ERRORS"  # tf2onnx.constants.ENV_TF2ONNX_CATCH_ERRORS
INPUT_NAME = "image"
PROBABILITY_TOLERANCE = 1e-4
# The feature map is unbounded (ReLU), so its tolerance is relative to its largest value.
FEATURE_MAP_RELATIVE_TOLERANCE = 1e-4


class VerificationError(RuntimeError):
    """ONNX and Keras disagree beyond tolerance: the bundle is refused."""


def fused_keras_model(model_set: ModelSet) -> keras.Model:
    """One backbone pass, then every head: [body_part_probs (N,P), p_fractured (N,P), feature_map]."""
    image = keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype="uint8", name=INPUT_NAME)
    fmap, pooled = feature_map_model(backbone_of(model_set.router))(CaffePreprocessing()(image))
    body = _renamed_head(model_set.router, "head_router")(pooled)
    columns = [_renamed_head(model_set.specialists[p], f"head_specialist_{p}")(pooled)[:, :1] for p in model_set.parts]
    p_fractured = keras.ops.concatenate(columns, axis=-1)
    return keras.Model(image, [body, p_fractured, fmap], name="fused")


def _renamed_head(model: keras.Model, name: str) -> keras.Model:
    """A copy of the model's head under a unique name (Keras refuses one name twice in a graph)."""
    head = head_of(model)
    copy = build_head(head.outputs[0].shape[-1], name=name)
    copy.set_weights(head.get_weights())
    return copy


def specialist_keras_model(specialist: keras.Model) -> keras.Model:
    """One specialist on its own backbone: [p_fractured (N,1), feature_map]."""
    image = keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype="uint8", name=INPUT_NAME)
    fmap, pooled = feature_map_model(backbone_of(specialist))(CaffePreprocessing()(image))
    return keras.Model(image, [head_of(specialist)(pooled)[:, :1], fmap], name=specialist.name)


def convert(model: keras.Model, output_names: list[str], path: Path, *, opset: int = OPSET) -> Path:
    """Convert with tf2onnx, a dynamic batch and the uint8 'image' input; outputs renamed in order."""
    spec = (tf.TensorSpec((None, IMAGE_SIZE, IMAGE_SIZE, 3), tf.uint8, name=INPUT_NAME),)

    @tf.function(input_signature=spec)
    def forward(image: tf.Tensor) -> list[tf.Tensor]:
        outputs = model(image, training=False)
        return list(outputs) if isinstance(outputs, list | tuple) else [outputs]

    with _lean_conversion():
        proto, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=opset)
    _rename_outputs(proto, output_names)
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    del proto
    release_memory()
    return path


@contextlib.contextmanager
def _lean_conversion() -> Iterator[None]:
    """tf2onnx as it is, minus two of its habits that cost a ResNet50 conversion gigabytes (7.7 GB -> 3.6 GB):

    - it deep-copies the whole graph before each optimizer pass, to undo a pass that fails ("catch errors");
      a failing pass must fail the export loudly anyway (verification would catch a wrong graph);
    - each pass leaves the replaced tensors in reference cycles until the collector happens to run, so their
      garbage piles up over the passes: each pass is followed by a collection here.
    """
    registry = tf2onnx.optimizer._optimizers  # the registry optimize_graph reads when no list is given
    saved = dict(registry)
    previous = os.environ.get(CATCH_ERRORS_ENV)
    os.environ[CATCH_ERRORS_ENV] = "FALSE"
    registry.update({name: _collected(factory) for name, factory in saved.items()})
    try:
        yield
    finally:
        registry.clear()
        registry.update(saved)
        if previous is None:
            os.environ.pop(CATCH_ERRORS_ENV, None)
        else:
            os.environ[CATCH_ERRORS_ENV] = previous


def _collected(factory: type) -> type:
    """The optimizer pass `factory`, collecting the garbage it made once it has run."""

    class Collected(factory):
        def optimize(self, graph: object, iteration: int) -> object:
            try:
                return super().optimize(graph, iteration)
            finally:
                gc.collect()

    Collected.__name__ = factory.__name__
    return Collected


def _rename_outputs(proto: onnx.ModelProto, names: list[str]) -> None:
    outputs = proto.graph.output
    if len(outputs) != len(names):
        raise VerificationError(f"converted graph has {len(outputs)} outputs, expected {names}")
    for output, new in zip(outputs, names, strict=True):
        old = output.name
        for node in proto.graph.node:
            node.output[:] = [new if name == old else name for name in node.output]
            node.input[:] = [new if name == old else name for name in node.input]
        output.name = new


def random_images(count: int, seed: int = 0) -> np.ndarray:
    """(count, 224, 224, 3) uint8 test images: gray radiograph-like replicas plus full-colour noise."""
    rng = np.random.default_rng(seed)
    gray = rng.integers(0, 256, size=(count, IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8)
    images = np.repeat(gray, 3, axis=-1)
    images[::2] = rng.integers(0, 256, size=images[::2].shape, dtype=np.uint8)
    return images


@dataclass(frozen=True)
class Reference:
    """What the source Keras models answer on the verification images."""

    body_part_probs: np.ndarray  # (N, P)
    p_fractured: np.ndarray  # (N, P)
    feature_maps: dict[str, np.ndarray]  # 'router' and each part -> (N, 7, 7, 2048)


def reference_outputs(model_set: ModelSet, images: np.ndarray) -> Reference:
    """Run the source models in Keras; checks legacy originals against their canonical copies too."""
    body = model_set.router.predict(images, verbose=0)
    p_fractured = np.stack([model_set.specialists[p].predict(images, verbose=0)[:, 0] for p in model_set.parts], axis=1)
    caffe = _caffe(images)
    router_backbone = backbone_of(model_set.router)
    maps = {"router": feature_map_model(router_backbone).predict(caffe, verbose=0)[0]}
    for part in model_set.parts:
        backbone = backbone_of(model_set.specialists[part])
        # A specialist sharing the router's backbone object has the same map: no second backbone pass.
        shared = backbone is router_backbone
        maps[part] = maps["router"] if shared else feature_map_model(backbone).predict(caffe, verbose=0)[0]
    for key, original in model_set.originals.items():
        expected = original.predict(caffe, verbose=0)
        ours = body if key == "router" else model_set.models()[key].predict(images, verbose=0)
        _compare(f"{key} (original H5 with preprocess_input outside)", ours, expected, PROBABILITY_TOLERANCE)
    return Reference(body, p_fractured, maps)


def _caffe(images: np.ndarray) -> np.ndarray:
    """keras.applications.resnet50.preprocess_input, written out so the check does not share our layer."""
    return images[..., ::-1].astype(np.float32) - np.asarray(CAFFE_MEAN_BGR, dtype=np.float32)


def _compare(what: str, got: np.ndarray, expected: np.ndarray, tolerance: float) -> float:
    if got.shape != expected.shape:
        raise VerificationError(f"{what}: shape {got.shape}, expected {expected.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
    if not diff <= tolerance:  # also catches NaN
        raise VerificationError(f"{what}: ONNX differs from Keras by {diff:.3g} (> {tolerance:.1g})")
    return diff


def _compare_map(what: str, got: np.ndarray, expected: np.ndarray) -> None:
    scale = max(1.0, float(np.max(np.abs(expected))))
    _compare(what, got, expected, FEATURE_MAP_RELATIVE_TOLERANCE * scale)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def verify_fused(path: Path, reference: Reference, images: np.ndarray) -> float:
    """Max abs probability difference of the fused graph against the source models."""
    body, p_fractured, fmap = _session(path).run(None, {INPUT_NAME: images})
    diff = max(
        _compare(f"{path.name}: body_part_probs", body, reference.body_part_probs, PROBABILITY_TOLERANCE),
        _compare(f"{path.name}: p_fractured", p_fractured, reference.p_fractured, PROBABILITY_TOLERANCE),
    )
    _compare_map(f"{path.name}: feature_map", fmap, reference.feature_maps["router"])
    return diff


def verify_router(path: Path, reference: Reference, images: np.ndarray) -> float:
    (body,) = _session(path).run(None, {INPUT_NAME: images})
    return _compare(f"{path.name}: body_part_probs", body, reference.body_part_probs, PROBABILITY_TOLERANCE)


def verify_specialist(path: Path, part_index: int, part: str, reference: Reference, images: np.ndarray) -> float:
    p_fractured, fmap = _session(path).run(None, {INPUT_NAME: images})
    expected = reference.p_fractured[:, part_index : part_index + 1]
    diff = _compare(f"{path.name}: p_fractured", p_fractured, expected, PROBABILITY_TOLERANCE)
    _compare_map(f"{path.name}: feature_map", fmap, reference.feature_maps[part])
    return diff
