"""Static INT8 quantization (QDQ, per-channel) with onnxruntime.quantization, and its agreement check.

The agreement is measured with `service.pipeline.predict_batch` on both bundles, i.e. with the code that
serves, on calibration images held out from calibration.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from service.bundle import Bundle
from service.engine import Engine
from service.pipeline import predict_batch

log = logging.getLogger(__name__)

# The backbone is where the time goes: its convolutions, residual adds, pools and activations run in INT8
# (quantizing Conv alone leaves float islands between them: 2.8x instead of 3.0x fp32 here). The tiny
# heads (MatMul) and the softmax stay float, so the probabilities the thresholds act on keep their precision.
OPS_TO_QUANTIZE = ["Conv", "Add", "MaxPool", "GlobalAveragePool", "Relu"]
CALIBRATION_BATCH = 8


class _ImageReader(CalibrationDataReader):
    def __init__(self, images: np.ndarray, input_name: str) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            [images[i : i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)]
        )
        self._input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input_name: batch}


def quantize_graph(source: Path, target: Path, calibration: np.ndarray, *, input_name: str = "image") -> Path:
    """fp32 ONNX -> static INT8 QDQ ONNX calibrated on (N, 224, 224, 3) uint8 images."""
    prepared = target.with_name(target.stem + ".preprocessed.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    try:
        quantize_static(
            str(prepared),
            str(target),
            _ImageReader(calibration, input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=OPS_TO_QUANTIZE,
        )
    finally:
        prepared.unlink(missing_ok=True)
    log.info("quantized %s -> %s (%.1f MB)", source.name, target.name, target.stat().st_size / 1e6)
    return target


def split_calibration(images: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle, then hold out a quarter (at least 4 images) for the agreement check."""
    if len(images) < 8:
        raise ValueError(f"INT8 calibration needs at least 8 images, got {len(images)}")
    order = np.random.default_rng(seed).permutation(len(images))
    held_out = max(4, len(images) // 4)
    return images[order[held_out:]], images[order[:held_out]]


def measure_agreement(fp32: Bundle, int8: Bundle, images: np.ndarray) -> dict[str, float]:
    """Label agreement (body part, fracture at each part's decision threshold) and max probability diff."""
    reference = predict_batch(Engine(fp32, providers=["cpu"]), images)
    quantized = predict_batch(Engine(int8, providers=["cpu"]), images)
    thresholds = fp32.manifest.thresholds
    body_agree = fracture_agree = 0
    max_diff = 0.0
    for ref, q in zip(reference, quantized, strict=True):
        body_agree += ref.body_part == q.body_part
        threshold = thresholds[ref.body_part].decision
        # Compare the fracture call of the same specialist, so a router flip is not counted twice.
        q_same_part = q.p_fractured if q.body_part == ref.body_part else None
        if q_same_part is not None:
            fracture_agree += (ref.p_fractured >= threshold) == (q_same_part >= threshold)
            max_diff = max(max_diff, abs(ref.p_fractured - q_same_part))
        if ref.body_part_probs is not None and q.body_part_probs is not None:
            max_diff = max(max_diff, float(np.max(np.abs(ref.body_part_probs - q.body_part_probs))))
    count = len(images)
    return {
        "body_part_agreement": body_agree / count,
        "fracture_agreement": fracture_agree / count,
        "max_probability_diff": max_diff,
    }
