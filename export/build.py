"""Write a verified bundle: convert, verify, optionally quantize, describe it in the manifest, then publish.

The bundle is assembled in a staging folder next to its destination and moved into place only once every
check passed, so a failed export never leaves a half-written bundle where the service would look.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np

from export.graphs import (
    PROBABILITY_TOLERANCE,
    convert,
    fused_keras_model,
    random_images,
    reference_outputs,
    specialist_keras_model,
    verify_fused,
    verify_router,
    verify_specialist,
)
from export.quantize import measure_agreement, quantize_graph, split_calibration
from export.sources import ModelSet, backbones_identical
from inference.bundle import (
    FileEntry,
    FusedGraph,
    InputContract,
    Manifest,
    QuantizationReport,
    Source,
    SplitGraph,
    Thresholds,
    Verification,
    file_entry,
    graph_file_names,
    load_bundle,
    write_manifest,
)
from inference.preprocessing import prepare_image_file
from training.architecture import head_dense_weights

log = logging.getLogger(__name__)

HEADS_FILE = "heads.npz"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class ExportError(RuntimeError):
    """The export cannot produce a bundle that passes its checks."""


@dataclass(frozen=True)
class ExportOptions:
    name: str | None = None
    version: str | None = None
    graph: Literal["auto", "fused", "split"] = "auto"
    verify_images: int = 8
    seed: int = 0
    int8: bool = False
    calibration_dir: Path | None = None
    min_agreement: float = 0.99
    force: bool = False


def export_bundle(model_set: ModelSet, out: Path, options: ExportOptions) -> Manifest:
    """Convert `model_set` into a verified bundle at `out` and return its manifest."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not options.force:
        raise ExportError(f"{out} exists and is not empty; pass --force to replace it")
    if options.verify_images < 8:
        raise ExportError(f"verification needs at least 8 images, got {options.verify_images}")
    if options.int8 and options.calibration_dir is None:
        raise ExportError("--int8 needs --calibration DIR (a folder of PNG/JPEG radiographs)")
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _write_fp32(model_set, staging, options)
        if options.int8:
            assert options.calibration_dir is not None
            manifest = _quantize(staging, manifest, options.calibration_dir, options)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    load_bundle(out)  # the published bundle must load exactly as the service will load it
    return manifest


def _graph_form(model_set: ModelSet, requested: str) -> Literal["fused", "split"]:
    identical = backbones_identical(model_set)
    if requested == "fused" and not identical:
        raise ExportError("--graph fused needs identical backbones; a specialist's backbone differs")
    if requested == "split":
        return "split"
    return "fused" if identical else "split"


def _write_fp32(model_set: ModelSet, root: Path, options: ExportOptions) -> Manifest:
    images = random_images(options.verify_images, seed=options.seed)
    reference = reference_outputs(model_set, images)
    form = _graph_form(model_set, options.graph)
    graph: FusedGraph | SplitGraph
    if form == "fused":
        graph = FusedGraph(file="model.onnx")
        convert(fused_keras_model(model_set), ["body_part_probs", "p_fractured", "feature_map"], root / graph.file)
        max_diff = verify_fused(root / graph.file, reference, images)
    else:
        graph = SplitGraph(router="router.onnx", specialists={p: f"specialist_{p}.onnx" for p in model_set.parts})
        convert(model_set.router, ["body_part_probs"], root / graph.router)
        max_diff = verify_router(root / graph.router, reference, images)
        for index, part in enumerate(model_set.parts):
            path = root / graph.specialists[part]
            convert(specialist_keras_model(model_set.specialists[part]), ["p_fractured", "feature_map"], path)
            max_diff = max(max_diff, verify_specialist(path, index, part, reference, images))
    log.info("%s graph verified on %d images: max abs diff %.2e", form, len(images), max_diff)
    save_heads(model_set, root / HEADS_FILE)
    graph_files = graph_file_names(graph)
    files = [file_entry(root, name) for name in [*graph_files, HEADS_FILE]]
    manifest = Manifest(
        name=options.name or "bundle",
        version=options.version or _default_version(files[0]),
        created_at=datetime.now(UTC),
        source=Source(
            kind=model_set.kind,
            files=[
                FileEntry(path=p.name, sha256=file_entry(p.parent, p.name).sha256, size_bytes=p.stat().st_size)
                for p in model_set.source_files
            ],
            backbone_weights=model_set.backbone_weights,
        ),
        trained=model_set.trained,
        body_parts=model_set.parts,
        thresholds={p: Thresholds(**model_set.thresholds.get(p, {})) for p in model_set.parts},
        input=InputContract(resize=model_set.resize),
        graph=graph,
        heads_file=HEADS_FILE,
        files=files,
        verification=Verification(images=len(images), max_abs_diff=max_diff, tolerance=PROBABILITY_TOLERANCE),
        metrics=model_set.metrics,
    )
    write_manifest(root, manifest)
    return manifest


def _default_version(primary: FileEntry) -> str:
    """Date plus the first graph's hash: the same models give the same suffix."""
    return f"{datetime.now(UTC):%Y.%m.%d}-{primary.sha256[:8]}"


def save_heads(model_set: ModelSet, path: Path) -> None:
    """Every head's Dense weights, for Grad-CAM in numpy at serving time: '<model>/<i>/kernel|bias'."""
    arrays: dict[str, np.ndarray] = {}
    for key, model in model_set.models().items():
        for index, (kernel, bias) in enumerate(head_dense_weights(model)):
            arrays[f"{key}/{index}/kernel"] = kernel
            arrays[f"{key}/{index}/bias"] = bias
    with path.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub reads ** as its allow_pickle


def load_calibration_images(directory: Path, resize: Literal["bilinear", "nearest"]) -> np.ndarray:
    """Every PNG/JPEG under `directory`, prepared exactly as the service prepares uploads."""
    paths = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ExportError(f"{directory}: no PNG or JPEG images for calibration")
    return np.stack([prepare_image_file(p, resize=resize).pixels for p in paths])


def _quantize(fp32_root: Path, fp32: Manifest, calibration_dir: Path, options: ExportOptions) -> Manifest:
    images = load_calibration_images(calibration_dir, fp32.input.resize)
    calibration, held_out = split_calibration(images, seed=options.seed)
    int8_root = fp32_root / "int8"
    int8_root.mkdir()
    graph_files = graph_file_names(fp32.graph)
    for name in graph_files:
        quantize_graph(fp32_root / name, int8_root / name, calibration, input_name=fp32.input.name)
    shutil.copy2(fp32_root / HEADS_FILE, int8_root / HEADS_FILE)
    files = [file_entry(int8_root, name) for name in [*graph_files, HEADS_FILE]]
    draft = fp32.model_copy(update={"precision": "int8", "files": files, "version": fp32.version + "-int8"})
    write_manifest(int8_root, draft)
    agreement = measure_agreement(load_bundle(fp32_root), load_bundle(int8_root), held_out)
    report = QuantizationReport(
        method="onnxruntime static QDQ, per-channel int8 weights, uint8 activations, MinMax, backbone ops",
        calibration_images=len(calibration),
        held_out_images=len(held_out),
        min_agreement=options.min_agreement,
        **agreement,
    )
    log.info("INT8 agreement on %d held-out images: %s", len(held_out), agreement)
    worst = min(report.body_part_agreement, report.fracture_agreement)
    if worst < options.min_agreement:
        raise ExportError(
            f"INT8 label agreement {worst:.1%} is under the required {options.min_agreement:.1%} "
            f"(body part {report.body_part_agreement:.1%}, fracture {report.fracture_agreement:.1%}); "
            "bundle refused. Calibrate on more representative images or lower --min-agreement knowingly."
        )
    manifest = draft.model_copy(update={"quantization": report})
    # Replace the fp32 files with the int8 ones: the published bundle is one precision.
    for name in [*graph_files, HEADS_FILE]:
        (int8_root / name).replace(fp32_root / name)
    write_manifest(fp32_root, manifest)
    shutil.rmtree(int8_root)
    return manifest
