"""service/engine.py and service/pipeline.py on tiny bundles (tests/factories.py): known answers, no TensorFlow.

A tiny bundle routes an image by its mean intensity m and answers P(fractured) = clip(m + offset[part], 0, 1),
so every expectation below is computed from the image itself. The same images run through the fused and the
split form of the same bundle must give the same answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from factories import (
    DEFAULT_PARTS,
    build_tiny_bundle,
    constant_image,
    encode_jpeg,
    encode_png,
    expected_body_part_probs,
    expected_m,
    image_for_part,
    part_value,
    read_manifest_json,
    replace_file,
    write_manifest_json,
)

from inference.bundle import load_bundle
from inference.engine import PROVIDER_NAMES, Engine, EngineError, choose_providers
from inference.pipeline import ItemPrediction, predict_batch
from inference.preprocessing import prepare_image

PARTS = list(DEFAULT_PARTS)
CPU = "CPUExecutionProvider"
# Offsets make the specialists distinguishable: an item answered by the wrong specialist is caught.
OFFSETS = {"elbow": 0.0, "hand": 0.2, "shoulder": -0.1}
Form = Literal["fused", "split"]
FORMS: tuple[Form, ...] = ("fused", "split")
P_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Engine]:
    """(form, with offsets) -> an Engine on CPU, built once for this module."""
    built: dict[tuple[str, bool], Engine] = {}
    for form in FORMS:
        for offsets in (False, True):
            root = tmp_path_factory.mktemp(f"{form}-{'offsets' if offsets else 'plain'}")
            build_tiny_bundle(root, form=form, specialist_offsets=OFFSETS if offsets else None)
            built[form, offsets] = Engine(load_bundle(root), providers=["cpu"], intra_op_threads=1)
    return built


@pytest.fixture(params=FORMS)
def form(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def engine(engines: dict[tuple[str, bool], Engine], form: str) -> Engine:
    """The tiny bundle without offsets: P(fractured) = m."""
    return engines[form, False]


@pytest.fixture
def offset_engine(engines: dict[tuple[str, bool], Engine], form: str) -> Engine:
    """The tiny bundle with OFFSETS: P(fractured) = clip(m + OFFSETS[part], 0, 1)."""
    return engines[form, True]


def expected_p(image: np.ndarray, part: str, offsets: dict[str, float] | None = None) -> float:
    return float(np.clip(expected_m(image) + (offsets or {}).get(part, 0.0), 0.0, 1.0))


def noisy_image_for_part(part_index: int, rng: np.random.Generator, spread: int = 20) -> np.ndarray:
    """Noise around the part's brightness: routes to the part, and its m is not a round number."""
    center = part_value(part_index, len(PARTS))
    return rng.integers(center - spread, center + spread + 1, size=(224, 224, 3)).astype(np.uint8)


def mixed_batch(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Nine noisy images routed to the parts in a shuffled order, and the part each routes to."""
    rng = np.random.default_rng(seed)
    order = [2, 0, 1, 0, 2, 1, 1, 0, 2]
    return np.stack([noisy_image_for_part(i, rng) for i in order]), [PARTS[i] for i in order]


# --- providers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("requested", [None, [], ["auto"]])
def test_auto_providers_end_with_cpu(requested: list[str] | None) -> None:
    chosen = choose_providers(requested)
    assert chosen[-1] == CPU
    assert set(chosen) <= set(ort.get_available_providers())
    assert len(chosen) == len(set(chosen))
    assert "TensorrtExecutionProvider" not in chosen  # only when asked for: its engine build takes minutes


@pytest.mark.parametrize("requested", [["cpu"], ["CPU"], ["Cpu"]])
def test_cpu_provider_by_name(requested: list[str]) -> None:
    assert choose_providers(requested) == [CPU]


@pytest.mark.parametrize("requested", [["tpu"], ["cpu", "openvino"], ["CPUExecutionProvider"]])
def test_unknown_provider_is_refused(requested: list[str]) -> None:
    with pytest.raises(EngineError, match="unknown providers") as caught:
        choose_providers(requested)
    assert requested[-1].lower() in str(caught.value)


def test_unavailable_provider_falls_back_to_cpu(caplog: pytest.LogCaptureFixture) -> None:
    missing = [n for n, full in PROVIDER_NAMES.items() if full not in ort.get_available_providers()]
    if not missing:
        pytest.skip("every provider this service knows is available here")
    with caplog.at_level(logging.WARNING, logger="inference.engine"):
        assert choose_providers([missing[0]]) == [CPU]
    assert f"provider {missing[0]} requested but not available" in caplog.text


def test_engine_runs_on_cpu(engine: Engine) -> None:
    assert engine.active_provider == CPU
    assert engine.active_providers[-1] == CPU
    assert engine.requested_providers == [CPU]
    assert engine.intra_op_threads == 1
    assert engine.body_parts == PARTS
    assert engine.input_name == "image"


def test_engine_default_providers(tmp_path: Path) -> None:
    engine = Engine(load_bundle(build_tiny_bundle(tmp_path / "b")))
    assert engine.active_provider == choose_providers(None)[0]
    assert engine.intra_op_threads >= 1
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert engine.active_provider == CPU


def test_engine_unknown_provider(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="unknown providers"):
        Engine(load_bundle(build_tiny_bundle(tmp_path / "b")), providers=["gpu"])


# --- the graphs' contract -------------------------------------------------------------------------------------


def test_tiny_graphs_have_the_bundle_contract(engine: Engine) -> None:
    manifest = engine.bundle.manifest
    for name in manifest.graph_files():
        model = onnx.load(str(engine.bundle.path(name)))
        onnx.checker.check_model(model, full_check=True)
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
        (image,) = model.graph.input
        assert image.name == manifest.input.name
        assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        dims = image.type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == ["N", 224, 224, 3]
        outputs = [o.name for o in model.graph.output]
        graph = manifest.graph
        if graph.form == "fused":
            expected = [graph.body_part_probs, graph.p_fractured, graph.feature_map]
        elif name == graph.router:
            expected = [graph.body_part_probs]
        else:
            expected = [graph.p_fractured, graph.feature_map]
        assert outputs == expected


def test_raw_outputs_have_the_documented_shapes(engine: Engine) -> None:
    images = np.stack([image_for_part(i) for i in range(len(PARTS))] + [constant_image(0)])
    n, p = len(images), len(PARTS)
    if engine.fused:
        outputs = engine.run_fused(images, feature_map=True)
        assert outputs.body_part_probs.shape == (n, p)
        assert outputs.p_fractured.shape == (n, p)
        assert outputs.feature_map is not None
        assert outputs.feature_map.shape == (n, 7, 7, 2048)
        assert engine.run_fused(images).feature_map is None
        arrays = [outputs.body_part_probs, outputs.p_fractured, outputs.feature_map]
    else:
        probs = engine.run_router(images)
        assert probs.shape == (n, p)
        p_fractured, fmap = engine.run_specialist("hand", images, feature_map=True)
        assert p_fractured.shape == (n,)
        assert fmap is not None
        assert fmap.shape == (n, 7, 7, 2048)
        assert engine.run_specialist("hand", images)[1] is None
        arrays = [probs, p_fractured, fmap]
    assert all(a.dtype == np.float32 for a in arrays)


BAD_INPUTS: dict[str, Callable[[], Any]] = {
    "float32": lambda: np.zeros((1, 224, 224, 3), np.float32),
    "int8": lambda: np.zeros((1, 224, 224, 3), np.int8),
    "no-batch-axis": lambda: np.zeros((224, 224, 3), np.uint8),
    "nchw": lambda: np.zeros((1, 3, 224, 224), np.uint8),
    "grey": lambda: np.zeros((1, 224, 224), np.uint8),
    "one-channel": lambda: np.zeros((1, 224, 224, 1), np.uint8),
    "wrong-size": lambda: np.zeros((1, 256, 256, 3), np.uint8),
}


@pytest.mark.parametrize("make", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_wrong_input_is_refused(engine: Engine, make: Callable[[], np.ndarray]) -> None:
    images = make()
    calls: list[Callable[[], object]] = [lambda: predict_batch(engine, images, [PARTS[0]] * len(images))]
    if engine.fused:
        calls.append(lambda: engine.run_fused(images))
    else:
        calls += [lambda: engine.run_router(images), lambda: engine.run_specialist(PARTS[0], images)]
    for call in calls:
        with pytest.raises(ValueError, match=r"expected \(N, 224, 224, 3\) uint8"):
            call()


# --- predict_batch --------------------------------------------------------------------------------------------


def check_routed(item: ItemPrediction, image: np.ndarray, part: str, offsets: dict[str, float] | None = None) -> None:
    assert item.body_part == part
    assert item.body_part_from_hint is False
    assert item.body_part_probs is not None
    assert item.body_part_probs.shape == (len(PARTS),)
    np.testing.assert_allclose(item.body_part_probs, expected_body_part_probs(image, len(PARTS)), atol=1e-5)
    assert item.body_part_probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert isinstance(item.p_fractured, float)
    assert item.p_fractured == pytest.approx(expected_p(image, part, offsets), abs=P_TOLERANCE)


@pytest.mark.parametrize("shift", [0, -20, 20])
def test_constant_images_route_by_brightness(engine: Engine, shift: int) -> None:
    images = np.stack([image_for_part(i, len(PARTS), shift) for i in range(len(PARTS))])
    results = predict_batch(engine, images)
    assert len(results) == len(PARTS)
    for image, part, item in zip(images, PARTS, results, strict=True):
        check_routed(item, image, part)
        assert item.body_part_probs is not None
        assert item.body_part_probs.max() > 0.9
        assert item.feature_map is None


def test_noisy_mixed_batch_keeps_order(engine: Engine) -> None:
    images, parts = mixed_batch()
    results = predict_batch(engine, images)
    assert [r.body_part for r in results] == parts
    for image, part, item in zip(images, parts, results, strict=True):
        check_routed(item, image, part)


def test_each_item_gets_its_own_specialist(offset_engine: Engine) -> None:
    images, parts = mixed_batch(seed=1)
    results = predict_batch(offset_engine, images)
    for image, part, item in zip(images, parts, results, strict=True):
        check_routed(item, image, part, OFFSETS)
    # The offsets really separate the specialists: no two parts give the same answer here.
    by_part = {
        part: {
            round(r.p_fractured - expected_m(img), 4)
            for img, r in zip(images, results, strict=True)
            if r.body_part == part
        }
        for part in PARTS
    }
    assert by_part == {p: {OFFSETS[p]} for p in PARTS}


def test_p_fractured_is_clipped(offset_engine: Engine) -> None:
    dark, bright = constant_image(0), constant_image(255)
    results = predict_batch(offset_engine, np.stack([dark, bright, bright]), [None, None, "hand"])
    assert [r.body_part for r in results] == ["elbow", "shoulder", "hand"]
    assert [r.p_fractured for r in results] == pytest.approx([0.0, 0.9, 1.0], abs=P_TOLERANCE)


def test_split_groups_one_specialist_run_per_part(
    engines: dict[tuple[str, bool], Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engines["split", True]
    calls: list[tuple[str, int, bool]] = []
    original = engine.run_specialist

    def spy(part: str, images: np.ndarray, *, feature_map: bool = False) -> Any:
        calls.append((part, len(images), feature_map))
        return original(part, images, feature_map=feature_map)

    monkeypatch.setattr(engine, "run_specialist", spy)
    images, parts = mixed_batch()
    wants = [i == 4 for i in range(len(images))]  # one shoulder item wants a map
    predict_batch(engine, images, want_feature_map=wants)
    assert sorted(calls) == [("elbow", 3, False), ("hand", 3, False), ("shoulder", 3, True)]
    assert parts[4] == "shoulder"


def test_fused_and_split_agree(engines: dict[tuple[str, bool], Engine]) -> None:
    images, _ = mixed_batch(seed=2)
    extra = np.random.default_rng(3).integers(0, 256, size=(3, 224, 224, 3), dtype=np.uint8)
    images = np.concatenate([images, extra])
    hints = [None, "elbow", None, None, "shoulder", None, "hand", None, None, None, "elbow", None]
    wants = [i % 3 == 0 for i in range(len(images))]
    for offsets in (False, True):
        fused = predict_batch(engines["fused", offsets], images, hints, wants)
        split = predict_batch(engines["split", offsets], images, hints, wants)
        for hint, a, b in zip(hints, fused, split, strict=True):
            assert a.body_part == b.body_part
            assert a.body_part_from_hint == b.body_part_from_hint == (hint is not None)
            assert a.p_fractured == pytest.approx(b.p_fractured, abs=1e-6)
            if hint is None:
                assert a.body_part_probs is not None
                assert b.body_part_probs is not None
                np.testing.assert_allclose(a.body_part_probs, b.body_part_probs, atol=1e-6)
            if a.feature_map is None:
                assert b.feature_map is None
            else:
                assert b.feature_map is not None
                np.testing.assert_allclose(a.feature_map, b.feature_map, atol=1e-6)


def test_hints_override_routing(offset_engine: Engine) -> None:
    bright = image_for_part(2)  # routes to shoulder
    images = np.stack([bright, bright, bright, image_for_part(0)])
    hints = ["elbow", None, "hand", None]
    results = predict_batch(offset_engine, images, hints)
    assert [r.body_part for r in results] == ["elbow", "shoulder", "hand", "elbow"]
    assert [r.body_part_from_hint for r in results] == [True, False, True, False]
    for image, item in zip(images, results, strict=True):
        assert item.p_fractured == pytest.approx(expected_p(image, item.body_part, OFFSETS), abs=P_TOLERANCE)
    check_routed(results[1], bright, "shoulder", OFFSETS)
    check_routed(results[3], images[3], "elbow", OFFSETS)
    hinted = [results[0], results[2]]
    if offset_engine.fused:  # one graph run answers everything: the router's answer comes along
        for item in hinted:
            assert item.body_part_probs is not None
            assert PARTS[int(np.argmax(item.body_part_probs))] == "shoulder"
    else:  # the split router never saw the hinted images
        assert all(item.body_part_probs is None for item in hinted)


def test_split_router_is_skipped_when_every_item_has_a_hint(
    engines: dict[tuple[str, bool], Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engines["split", False]

    def router_must_not_run(images: np.ndarray) -> np.ndarray:
        raise AssertionError("the router ran although every item had a hint")

    monkeypatch.setattr(engine, "run_router", router_must_not_run)
    images = np.stack([image_for_part(0), image_for_part(1)])
    results = predict_batch(engine, images, ["shoulder", "shoulder"])
    assert [r.body_part for r in results] == ["shoulder", "shoulder"]
    assert all(r.body_part_probs is None for r in results)


@pytest.mark.parametrize("hint", ["knee", "Hand", ""])
def test_unknown_hint_is_refused(engine: Engine, hint: str) -> None:
    with pytest.raises(ValueError, match="unknown body part hints") as caught:
        predict_batch(engine, np.stack([image_for_part(0), image_for_part(1)]), [None, hint])
    assert repr(hint) in str(caught.value)


@pytest.mark.parametrize(("hints", "wants"), [([None], None), (None, [True]), ([None] * 3, [False] * 2)])
def test_mismatched_lengths_are_refused(engine: Engine, hints: Any, wants: Any) -> None:
    with pytest.raises(ValueError, match="images"):
        predict_batch(engine, np.stack([image_for_part(0), image_for_part(1)]), hints, wants)


def test_empty_batch(engine: Engine) -> None:
    assert predict_batch(engine, np.zeros((0, 224, 224, 3), np.uint8)) == []


def spatial_image() -> np.ndarray:
    """A horizontal ramp with a bright square: the feature map's cells differ from one another."""
    ramp = np.tile(np.linspace(0, 255, 224).round().astype(np.uint8), (224, 1))
    ramp[32:96, 128:192] = 250
    return np.repeat(ramp[:, :, None], 3, axis=2)


def expected_cells(image: np.ndarray) -> np.ndarray:
    """(7, 7): the tiny bundle's feature map in every channel, the gray image averaged over 32x32 cells."""
    gray = image.astype(np.float64).mean(axis=2) / 255.0
    return gray.reshape(7, 32, 7, 32).mean(axis=(1, 3))


def test_feature_maps_only_for_items_that_asked(offset_engine: Engine) -> None:
    images = np.stack([spatial_image(), image_for_part(0), image_for_part(2), spatial_image()[::-1].copy()])
    wants = [True, False, True, False]
    results = predict_batch(offset_engine, images, want_feature_map=wants)
    for image, want, item in zip(images, wants, results, strict=True):
        if not want:
            assert item.feature_map is None
            continue
        assert item.feature_map is not None
        assert item.feature_map.shape == (7, 7, 2048)
        assert item.feature_map.dtype == np.float32
        cells = expected_cells(image)
        np.testing.assert_allclose(item.feature_map, np.broadcast_to(cells[:, :, None], (7, 7, 2048)), atol=1e-5)
        # the map is per item, not shared within the batch, and the offsets do not touch it
        assert float(item.feature_map.mean()) == pytest.approx(expected_m(image), abs=1e-5)
    assert results[0].feature_map is not None
    assert results[0].feature_map.std() > 0.1


def test_no_feature_maps_by_default(engine: Engine) -> None:
    results = predict_batch(engine, np.stack([spatial_image(), image_for_part(1)]))
    assert all(r.feature_map is None for r in results)


# --- image helpers through the service's decoder --------------------------------------------------------------


@pytest.mark.parametrize("encode", [encode_png, encode_jpeg], ids=["png", "jpeg"])
def test_encoded_part_images_route_after_decoding(engine: Engine, encode: Callable[[np.ndarray], bytes]) -> None:
    """What the API tests post: an encoded part image, prepared as the service prepares uploads."""
    resize = engine.bundle.manifest.input.resize
    prepared = [prepare_image(encode(image_for_part(i)), resize=resize).pixels for i in range(len(PARTS))]
    results = predict_batch(engine, np.stack(prepared))
    assert [r.body_part for r in results] == PARTS
    for i, item in enumerate(results):
        assert item.p_fractured == pytest.approx(part_value(i, len(PARTS)) / 255, abs=2 / 255)


def test_png_is_lossless() -> None:
    image = spatial_image()
    assert np.array_equal(prepare_image(encode_png(image)).pixels, image)


# --- graphs onnxruntime refuses -------------------------------------------------------------------------------


@pytest.mark.parametrize(("form_", "name"), [("fused", "model.onnx"), ("split", "specialist_hand.onnx")])
def test_garbage_graph_is_refused_naming_the_file(tmp_path: Path, form_: Form, name: str) -> None:
    root = build_tiny_bundle(tmp_path / "b", form=form_)
    replace_file(root, name, b"this is not an ONNX graph\n" * 10)
    bundle = load_bundle(root)  # the hashes match: only onnxruntime can tell
    with pytest.raises(EngineError, match="onnxruntime cannot load this graph") as caught:
        Engine(bundle, providers=["cpu"])
    assert str(root / name) in str(caught.value)


def test_graph_input_must_match_the_manifest(tmp_path: Path) -> None:
    root = build_tiny_bundle(tmp_path / "b")
    manifest = read_manifest_json(root)
    manifest["input"]["name"] = "pixels"
    write_manifest_json(root, manifest)
    with pytest.raises(EngineError, match=r"graph inputs \['image'\], manifest says \['pixels'\]") as caught:
        Engine(load_bundle(root), providers=["cpu"])
    assert str(root / "model.onnx") in str(caught.value)
