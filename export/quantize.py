"""Static INT8 quantization (QDQ, per-channel) with onnxruntime.quantization, and its agreement check.

The agreement is measured with `inference.pipeline.predict_batch` on both bundles, i.e. with the code that
serves, on calibration images held out from calibration.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
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

from export.memory import release_memory
from inference.agreement import label_agreement
from inference.bundle import Bundle
from inference.engine import Engine
from inference.pipeline import predict_batch

log = logging.getLogger(__name__)

# The backbone is where the time goes: its convolutions, residual adds, pools and activations run in INT8
# (quantizing Conv alone leaves float islands between them: 2.8x instead of 3.0x fp32 here). The tiny
# heads (MatMul) and the softmax stay float, so the probabilities the thresholds act on keep their precision.
OPS_TO_QUANTIZE = ["Conv", "Add", "MaxPool", "GlobalAveragePool", "Relu"]
CALIBRATION_BATCH = 4  # images per calibration run: its activations are what calibration holds at once


class _ImageReader(CalibrationDataReader):
    """Calibration batches; `set_range` (onnxruntime's strided calibration) narrows them to a stride of batches."""

    def __init__(self, images: np.ndarray, input_name: str) -> None:
        self._all = [images[i : i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)]
        self._batches: Iterator[np.ndarray] = iter(self._all)
        self._input_name = input_name

    def __len__(self) -> int:
        return len(self._all)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._batches = iter(self._all[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input_name: batch}


def _quantize_here(source: Path, target: Path, calibration: np.ndarray, input_name: str) -> Path:
    """The quantization itself, in whichever process runs it."""
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
            # One batch at a time: min/max are folded into the ranges after each batch (the same ranges as all at
            # once), so calibration holds one batch's activations whatever the number of images. Not
            # `CalibMaxIntermediateOutputs`: in onnxruntime 1.32 reaching it drops the collected activations
            # without folding them ("No data is collected.").
            extra_options={"CalibStridedMinMax": 1},
        )
    finally:
        prepared.unlink(missing_ok=True)
    return target


def quantize_graph(source: Path, target: Path, calibration: np.ndarray, *, input_name: str = "image") -> Path:
    """fp32 ONNX -> static INT8 QDQ ONNX calibrated on (N, 224, 224, 3) uint8 images, in a child process.

    onnxruntime's quantizer keeps models, calibration sessions and their tensors alive after it returns
    (a gigabyte a run for ResNet50, measured), so it runs in a process of its own that takes them with it.
    """
    context = multiprocessing.get_context("spawn")  # never fork a process that runs TensorFlow
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        result = pool.submit(_quantize_here, source, target, calibration, input_name).result()
    release_memory()
    log.info("quantized %s -> %s (%.1f MB)", source.name, target.name, target.stat().st_size / 1e6)
    return result


def split_calibration(images: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle, then hold out a quarter (at least 4 images) for the agreement check."""
    if len(images) < 8:
        raise ValueError(f"INT8 calibration needs at least 8 images, got {len(images)}")
    order = np.random.default_rng(seed).permutation(len(images))
    held_out = max(4, len(images) // 4)
    return images[order[held_out:]], images[order[:held_out]]


def measure_agreement(fp32: Bundle, int8: Bundle, images: np.ndarray) -> dict[str, float]:
    """Label agreement of the INT8 bundle with fp32 on `images` (`inference.agreement`) and the largest
    probability difference, both through the serving code (`predict_batch`)."""
    reference = predict_batch(Engine(fp32, providers=["cpu"]), images)
    quantized = predict_batch(Engine(int8, providers=["cpu"]), images)
    agreement = label_agreement(reference, quantized, fp32.manifest.thresholds)
    release_memory()  # the two engines' sessions are gone: give their memory back before the next step
    return {
        "body_part_agreement": agreement.body_part_agreement,
        "fracture_agreement": agreement.fracture_agreement,
        "max_probability_diff": agreement.max_probability_diff,
    }
