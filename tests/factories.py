"""Tiny bundles for tests: the exact contract of a real bundle, built with `onnx.helper` in milliseconds.

A tiny bundle has the manifest, file list (real sha256), `heads.npz` layout, input and outputs of a bundle
written by `bfd export`, but its graphs compute known answers from the image's mean intensity, so tests can
choose images whose answers differ. With m = mean(image) / 255 per item (over H, W and C) and P body parts:

- `body_part_probs` (N, P) = softmax_i(-50 (m - c_i)^2) with c_i = (i + 0.5) / P: a constant image of value
  `part_value(i, P)` routes to part i with high probability (see `image_for_part`);
- `p_fractured` = clip(m + offset[part], 0, 1): (N, P), one column per part, in the fused graph; (N, 1) in
  each split specialist graph. Offsets default to 0 (`specialist_offsets` makes specialists distinguishable);
- `feature_map` (N, 7, 7, 2048): the gray image averaged over 32x32 cells, the same in every channel, so its
  mean is m (and a specialist's offset is not added to it).

No TensorFlow anywhere: the API, engine and pipeline tests use these bundles.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import onnx
from fastapi import FastAPI
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from inference.bundle import (
    MANIFEST_NAME,
    FusedGraph,
    InputContract,
    Manifest,
    Source,
    SplitGraph,
    Thresholds,
    Verification,
    file_entry,
    write_manifest,
)

OPSET = 17
IR_VERSION = 8  # the IR version of opset 17 (onnx 1.12); every onnxruntime this project supports reads it
IMAGE_SIZE = 224
FEATURE_CELLS = 7
FEATURE_CHANNELS = 2048
ROUTER_SHARPNESS = 50.0
HEADS_FILE = "heads.npz"
DEFAULT_PARTS = ("elbow", "hand", "shoulder")
CREATED_AT = datetime(2025, 1, 1, tzinfo=UTC)  # fixed, so the same arguments give the same bytes


# --- images ------------------------------------------------------------------------------------------------


def constant_image(value: int) -> np.ndarray:
    """(224, 224, 3) uint8 with every byte `value`."""
    if not 0 <= value <= 255:
        raise ValueError(f"pixel value {value} outside 0..255")
    return np.full((IMAGE_SIZE, IMAGE_SIZE, 3), value, dtype=np.uint8)


def part_center(part_index: int, parts_count: int) -> float:
    """c_i: the mean intensity (0..1) the tiny router maps to part `part_index` most confidently."""
    if not 0 <= part_index < parts_count:
        raise ValueError(f"part index {part_index} outside 0..{parts_count - 1}")
    return (part_index + 0.5) / parts_count


def part_value(part_index: int, parts_count: int, brightness_shift: int = 0) -> int:
    """The pixel value of a constant image routed to part `part_index`, optionally shifted a little."""
    return round(255 * part_center(part_index, parts_count)) + brightness_shift


def image_for_part(part_index: int, parts_count: int = len(DEFAULT_PARTS), brightness_shift: int = 0) -> np.ndarray:
    """A constant image the tiny router sends to part `part_index` (keep |shift| small: ~< 255 / (4 P))."""
    return constant_image(part_value(part_index, parts_count, brightness_shift))


def expected_m(image: np.ndarray) -> float:
    """m for one (224, 224, 3) image: what a tiny bundle's p_fractured is (before any offset)."""
    return float(np.asarray(image, dtype=np.float64).mean() / 255.0)


def expected_body_part_probs(image: np.ndarray, parts_count: int) -> np.ndarray:
    """(P,) float64: the tiny router's probabilities for one image."""
    centers = (np.arange(parts_count) + 0.5) / parts_count
    logits = -ROUTER_SHARPNESS * (expected_m(image) - centers) ** 2
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) or (H, W) uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of an (H, W, 3) or (H, W) uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# --- graphs ------------------------------------------------------------------------------------------------


def _const(name: str, values: Any, dtype: Any = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name=name)


def _tensor(name: str, shape: Sequence[str | int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _mean_nodes() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """'image' (N,224,224,3) uint8 -> 'x01' (the image in [0, 1]) and its per-item mean 'm_col' (N,1).

    The mean is taken in float64: onnxruntime's float32 ReduceMean over 150528 values is off by ~1e-4.
    """
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["x", "c255"], ["x01"]),
        helper.make_node("Cast", ["image"], ["x64"], to=TensorProto.DOUBLE),
        helper.make_node("ReduceMean", ["x64"], ["mean64"], axes=[1, 2, 3], keepdims=0),  # (N,)
        helper.make_node("Div", ["mean64", "c255_64"], ["m64"]),
        helper.make_node("Cast", ["m64"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis1"], ["m_col"]),  # (N,1)
    ]
    initializers = [
        _const("c255", 255.0),
        _const("c255_64", 255.0, np.float64),
        _const("axis1", [1], np.int64),
    ]
    return nodes, initializers


def _feature_map_nodes() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """'x01' -> 'feature_map' (N,7,7,2048): the gray image averaged over 32x32 cells, in every channel."""
    cell = IMAGE_SIZE // FEATURE_CELLS
    nodes = [
        helper.make_node("Transpose", ["x01"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("ReduceMean", ["nchw"], ["gray"], axes=[1], keepdims=1),  # (N,1,224,224)
        helper.make_node("AveragePool", ["gray"], ["cells"], kernel_shape=[cell, cell], strides=[cell, cell]),
        helper.make_node("Transpose", ["cells"], ["cells_nhwc"], perm=[0, 2, 3, 1]),  # (N,7,7,1)
        helper.make_node("Expand", ["cells_nhwc", "fmap_shape"], ["feature_map"]),  # (N,7,7,2048)
    ]
    return nodes, [_const("fmap_shape", [1, 1, 1, FEATURE_CHANNELS], np.int64)]


def _router_nodes(parts_count: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """'m_col' (N,1) -> 'body_part_probs' (N,P)."""
    centers = (np.arange(parts_count) + 0.5) / parts_count
    nodes = [
        helper.make_node("Sub", ["m_col", "centers"], ["delta"]),
        helper.make_node("Mul", ["delta", "delta"], ["delta2"]),
        helper.make_node("Mul", ["delta2", "sharpness"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["body_part_probs"], axis=-1),
    ]
    initializers = [_const("centers", centers.reshape(1, -1)), _const("sharpness", -ROUTER_SHARPNESS)]
    return nodes, initializers


def _fracture_nodes(offsets: Sequence[float]) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """'m_col' (N,1) -> 'p_fractured' (N, len(offsets)) = clip(m + offset, 0, 1)."""
    nodes = [
        helper.make_node("Add", ["m_col", "offsets"], ["p_raw"]),
        helper.make_node("Clip", ["p_raw", "zero", "one"], ["p_fractured"]),
    ]
    initializers = [
        _const("offsets", np.asarray(offsets, dtype=np.float32).reshape(1, -1)),
        _const("zero", 0.0),
        _const("one", 1.0),
    ]
    return nodes, initializers


def _save_graph(
    path: Path,
    name: str,
    pieces: Sequence[tuple[list[onnx.NodeProto], list[onnx.TensorProto]]],
    outputs: list[onnx.ValueInfoProto],
) -> None:
    nodes = [node for piece_nodes, _ in pieces for node in piece_nodes]
    initializers = [tensor for _, piece_init in pieces for tensor in piece_init]
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", IMAGE_SIZE, IMAGE_SIZE, 3])
    graph = helper.make_graph(nodes, name, [image], outputs, initializer=initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="tests.factories",
    )
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))


def _fmap_output() -> onnx.ValueInfoProto:
    return _tensor("feature_map", ["N", FEATURE_CELLS, FEATURE_CELLS, FEATURE_CHANNELS])


def write_fused_graph(path: Path, parts_count: int, offsets: Sequence[float]) -> None:
    """One graph: [body_part_probs (N,P), p_fractured (N,P), feature_map (N,7,7,2048)]."""
    pieces = [_mean_nodes(), _router_nodes(parts_count), _fracture_nodes(offsets), _feature_map_nodes()]
    outputs = [
        _tensor("body_part_probs", ["N", parts_count]),
        _tensor("p_fractured", ["N", parts_count]),
        _fmap_output(),
    ]
    _save_graph(path, "tiny_fused", pieces, outputs)


def write_router_graph(path: Path, parts_count: int) -> None:
    """The split router: [body_part_probs (N,P)]."""
    outputs = [_tensor("body_part_probs", ["N", parts_count])]
    _save_graph(path, "tiny_router", [_mean_nodes(), _router_nodes(parts_count)], outputs)


def write_specialist_graph(path: Path, offset: float = 0.0) -> None:
    """A split specialist: [p_fractured (N,1), feature_map (N,7,7,2048)]."""
    pieces = [_mean_nodes(), _fracture_nodes([offset]), _feature_map_nodes()]
    _save_graph(path, "tiny_specialist", pieces, [_tensor("p_fractured", ["N", 1]), _fmap_output()])


def write_heads(path: Path, parts: Sequence[str], seed: int = 0) -> None:
    """'<model>/<i>/kernel|bias' float32 for 'router' and 'specialist/<part>', the real heads' shapes."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, Any] = {}  # Any: numpy's stubs read **dict[str, ndarray] as allow_pickle
    for key, classes in [("router", len(parts)), *((f"specialist/{p}", 2) for p in parts)]:
        widths = [FEATURE_CHANNELS, 128, 50, classes]
        for index in range(3):
            fan_in, fan_out = widths[index], widths[index + 1]
            arrays[f"{key}/{index}/kernel"] = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(
                np.float32
            )
            arrays[f"{key}/{index}/bias"] = np.zeros(fan_out, dtype=np.float32)
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


# --- bundles -----------------------------------------------------------------------------------------------


def build_tiny_bundle(
    root: Path,
    *,
    form: Literal["fused", "split"] = "fused",
    parts: Sequence[str] = DEFAULT_PARTS,
    trained: bool = False,
    thresholds: Mapping[str, Mapping[str, Any]] | None = None,
    resize: Literal["bilinear", "nearest"] = "bilinear",
    name: str = "tiny",
    version: str = "0.0.1-test",
    specialist_offsets: Mapping[str, float] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny bundle into `root` (created if needed) and return `root`.

    `parts` is used in the order given (the manifest validator requires it sorted and unique; passing an
    unsorted list gets you the same BundleError a bad export would). `thresholds` maps a part to `Thresholds`
    fields (missing parts get the defaults). `specialist_offsets` adds a constant per part to that part's
    P(fractured), in both forms.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    parts = list(parts)
    offsets = dict(specialist_offsets or {})
    unknown = set(offsets) - set(parts)
    if unknown:
        raise ValueError(f"specialist_offsets for unknown parts {sorted(unknown)}")
    graph: FusedGraph | SplitGraph
    if form == "fused":
        graph = FusedGraph(file="model.onnx")
        write_fused_graph(root / graph.file, len(parts), [offsets.get(p, 0.0) for p in parts])
    elif form == "split":
        graph = SplitGraph(router="router.onnx", specialists={p: f"specialist_{p}.onnx" for p in parts})
        write_router_graph(root / graph.router, len(parts))
        for part in parts:
            write_specialist_graph(root / graph.specialists[part], offsets.get(part, 0.0))
    else:
        raise ValueError(f"form must be 'fused' or 'split', got {form!r}")
    write_heads(root / HEADS_FILE, parts)
    graph_files = [graph.file] if isinstance(graph, FusedGraph) else [graph.router, *graph.specialists.values()]
    thresholds = thresholds or {}
    manifest = Manifest(
        name=name,
        version=version,
        created_at=CREATED_AT,
        source=Source(kind="demo", backbone_weights="none"),
        trained=trained,
        body_parts=parts,
        thresholds={p: Thresholds(**thresholds.get(p, {})) for p in parts},
        input=InputContract(resize=resize),
        graph=graph,
        heads_file=HEADS_FILE,
        files=[file_entry(root, n) for n in [*graph_files, HEADS_FILE]],
        verification=Verification(images=8, max_abs_diff=0.0, tolerance=1e-4),
        metrics=metrics,
    )
    write_manifest(root, manifest)
    return root


# --- serving a bundle in-process (the real app and lifespan, no network) ------------------------------------


@asynccontextmanager
async def serving(bundle: Path, **settings: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app on `bundle` with its lifespan running, and an async client talking to it over ASGI."""
    from asgi_lifespan import LifespanManager

    from service.main import create_app
    from service.settings import Settings

    app = create_app(Settings(bundle=bundle, **settings))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield app, client


# --- editing a bundle (for tests of refusals) --------------------------------------------------------------


def read_manifest_json(root: Path) -> dict[str, Any]:
    """The manifest as a plain JSON object, for tests that break it."""
    return json.loads((Path(root) / MANIFEST_NAME).read_text(encoding="utf-8"))


def write_manifest_json(root: Path, data: Any) -> None:
    """Write any JSON value as the manifest, bypassing validation."""
    (Path(root) / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def replace_file(root: Path, name: str, content: bytes) -> None:
    """Overwrite a listed file AND update its manifest entry (sha256, size), so the bundle still loads."""
    root = Path(root)
    (root / name).write_bytes(content)
    data = read_manifest_json(root)
    entry = file_entry(root, name)
    for listed in data["files"]:
        if listed["path"] == name:
            listed.update(sha256=entry.sha256, size_bytes=entry.size_bytes)
            break
    else:
        raise KeyError(f"{name} is not listed in {root / MANIFEST_NAME}")
    write_manifest_json(root, data)
