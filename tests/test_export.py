"""Tests for the export (export/*.py): Keras models -> verified ONNX bundle, as the service will load it.

Every conversion is a real ResNet50 through tf2onnx, so the expensive results are built once per module
(`export_helpers`): here the demo models exported fused, the same models exported split, and a set whose
specialist has its own backbone (auto -> split); the original project's H5 files and INT8 have modules of
their own (test_export_legacy.py, test_export_int8.py), so no module holds every model set at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from export_helpers import (
    PARTS,
    PERTURBED_PART,
    SAME_MODELS_TOLERANCE,
    TOLERANCE,
    Exported,
    assert_close,
    assert_map_close,
    bundle_folder_only,
    caffe,
    demo_set,
    fused,
    images,
    keras_answers,
    keras_feature_map,
    run_cli,
    session,
    sha256,
)

import bfd.cli
from export import graphs
from export.build import HEADS_FILE, ExportError, ExportOptions, export_bundle
from export.sources import (
    ModelSet,
    backbones_identical,
)
from inference.bundle import MANIFEST_NAME, FusedGraph, SplitGraph, load_bundle
from inference.engine import Engine
from inference.pipeline import predict_batch
from training.architecture import (
    IMAGE_SIZE,
    backbone_of,
    build_backbone,
    build_classifier,
    build_head,
    feature_map_model,
    head_dense_weights,
    head_of,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def split(demo_set: ModelSet, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    out = tmp_path_factory.mktemp("split") / "demo"
    return Exported(out, export_bundle(demo_set, out, ExportOptions(graph="split")))


@pytest.fixture(scope="module")
def differing_set(demo_set: ModelSet) -> ModelSet:
    """The demo models, except that one specialist runs on its own, slightly different backbone."""
    backbone = build_backbone(None)  # a new object: demo_models shares ONE backbone among all models
    backbone.set_weights(backbone_of(demo_set.router).get_weights())
    bn = backbone.get_layer("conv5_block3_3_bn")
    gamma, *rest = bn.get_weights()
    bn.set_weights([gamma * 1.5, *rest])
    head = build_head(2)
    head.set_weights(head_of(demo_set.specialists[PERTURBED_PART]).get_weights())
    specialist = build_classifier(2, backbone=backbone, head=head, name=f"specialist_{PERTURBED_PART}")
    return ModelSet(
        parts=list(PARTS),
        router=demo_set.router,
        specialists={**demo_set.specialists, PERTURBED_PART: specialist},
        kind="demo",
        trained=False,
        backbone_weights="none",
    )


@pytest.fixture(scope="module")
def auto_split(differing_set: ModelSet, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    out = tmp_path_factory.mktemp("auto") / "differing"
    return Exported(out, export_bundle(differing_set, out, ExportOptions(graph="auto")))


# ---------------------------------------------------------------------------------------------------------
# Fused form


def test_demo_export_is_fused_untrained_fp32_and_verified(fused: Exported) -> None:
    manifest = fused.manifest
    assert isinstance(manifest.graph, FusedGraph)
    assert manifest.graph.form == "fused"  # graph="auto" and one shared backbone
    assert manifest.graph.file == "model.onnx"
    assert manifest.precision == "fp32"
    assert manifest.quantization is None
    assert manifest.trained is False
    assert manifest.name == "demo-fused"
    assert manifest.body_parts == PARTS
    assert manifest.fracture_labels == ("fractured", "normal")
    assert set(manifest.thresholds) == set(PARTS)
    for thresholds in manifest.thresholds.values():
        assert thresholds.decision == 0.5
        assert thresholds.high_sensitivity is None
        assert thresholds.high_specificity is None
    assert manifest.source.kind == "demo"
    assert manifest.source.files == []
    assert manifest.source.backbone_weights == "none"
    assert manifest.input.name == "image"
    assert manifest.input.dtype == "uint8"
    assert manifest.input.resize == "bilinear"
    assert manifest.verification.images == 8
    assert manifest.verification.tolerance == TOLERANCE
    assert 0.0 <= manifest.verification.max_abs_diff <= TOLERANCE


def test_fused_bundle_files_are_listed_with_their_hashes(fused: Exported) -> None:
    loaded = fused.bundle()  # verifies every size and sha256
    assert loaded.manifest == fused.manifest
    assert sorted(p.name for p in fused.root.iterdir()) == sorted([MANIFEST_NAME, "model.onnx", HEADS_FILE])
    assert sorted(entry.path for entry in fused.manifest.files) == sorted(["model.onnx", HEADS_FILE])
    for entry in fused.manifest.files:
        path = fused.root / entry.path
        assert entry.sha256 == sha256(path)
        assert entry.size_bytes == path.stat().st_size
    assert fused.manifest.version.endswith("-" + sha256(fused.root / "model.onnx")[:8])
    bundle_folder_only(fused.root.parent, fused.root.name)


def test_heads_file_holds_every_heads_dense_weights(fused: Exported, demo_set: ModelSet) -> None:
    with np.load(fused.root / HEADS_FILE) as heads:
        expected_keys = set()
        for key, model in demo_set.models().items():
            for index, (kernel, bias) in enumerate(head_dense_weights(model)):
                expected_keys |= {f"{key}/{index}/kernel", f"{key}/{index}/bias"}
                np.testing.assert_array_equal(heads[f"{key}/{index}/kernel"], kernel)
                np.testing.assert_array_equal(heads[f"{key}/{index}/bias"], bias)
        assert set(heads.files) == expected_keys
    assert len(expected_keys) == 4 * 3 * 2


def test_fused_onnx_inputs_and_outputs(fused: Exported, images: np.ndarray) -> None:
    graph = session(fused.root / "model.onnx")
    (image,) = graph.get_inputs()
    assert image.name == "image"
    assert image.type == "tensor(uint8)"
    assert image.shape[1:] == [IMAGE_SIZE, IMAGE_SIZE, 3]
    assert isinstance(image.shape[0], str)  # dynamic batch
    assert [o.name for o in graph.get_outputs()] == ["body_part_probs", "p_fractured", "feature_map"]
    for batch in (images[:1], images):
        body, p_fractured, fmap = graph.run(None, {"image": batch})
        n = len(batch)
        assert body.shape == (n, 3)
        assert p_fractured.shape == (n, 3)
        assert fmap.shape == (n, 7, 7, 2048)
        assert body.dtype == p_fractured.dtype == fmap.dtype == np.float32


def test_fused_onnx_matches_the_keras_models(
    fused: Exported, images: np.ndarray, keras_answers: graphs.Reference
) -> None:
    assert len(images) >= 8
    body, p_fractured, fmap = session(fused.root / "model.onnx").run(None, {"image": images})
    assert_close(body, keras_answers.body_part_probs, TOLERANCE, "body_part_probs")
    assert_close(p_fractured, keras_answers.p_fractured, TOLERANCE, "p_fractured")
    assert_map_close(fmap, keras_answers.feature_maps["router"], "feature_map")
    np.testing.assert_allclose(body.sum(axis=1), 1.0, atol=1e-5)
    assert np.all((p_fractured >= 0.0) & (p_fractured <= 1.0))
    # The specialists' columns are not copies of one another (a wiring mistake would show here).
    assert np.ptp(p_fractured[:, PARTS.index("elbow")]) > 1e-3


def test_verification_refuses_any_disagreement(
    fused: Exported, images: np.ndarray, keras_answers: graphs.Reference
) -> None:
    path = fused.root / "model.onnx"
    assert graphs.verify_fused(path, keras_answers, images) <= TOLERANCE

    p_fractured = keras_answers.p_fractured.copy()
    p_fractured[3, 1] += 10 * TOLERANCE
    wrong_p = graphs.Reference(keras_answers.body_part_probs, p_fractured, keras_answers.feature_maps)
    with pytest.raises(graphs.VerificationError, match="p_fractured"):
        graphs.verify_fused(path, wrong_p, images)

    body = keras_answers.body_part_probs.copy()
    body[0, 0] = np.nan
    wrong_body = graphs.Reference(body, keras_answers.p_fractured, keras_answers.feature_maps)
    with pytest.raises(graphs.VerificationError, match="body_part_probs"):
        graphs.verify_fused(path, wrong_body, images)

    fmap = keras_answers.feature_maps["router"].copy()
    fmap[1, 3, 3, 7] += 0.01 * max(1.0, float(np.abs(fmap).max()))
    wrong_map = graphs.Reference(keras_answers.body_part_probs, keras_answers.p_fractured, {"router": fmap})
    with pytest.raises(graphs.VerificationError, match="feature_map"):
        graphs.verify_fused(path, wrong_map, images)

    with pytest.raises(graphs.VerificationError, match="shape"):
        graphs.verify_fused(path, keras_answers, images[:-1])


# ---------------------------------------------------------------------------------------------------------
# Split form, and fused vs split of the same models


def test_split_export_of_the_same_models(split: Exported, fused: Exported) -> None:
    manifest = split.manifest
    assert isinstance(manifest.graph, SplitGraph)
    assert manifest.graph.router == "router.onnx"
    assert manifest.graph.specialists == {p: f"specialist_{p}.onnx" for p in PARTS}
    assert 0.0 <= manifest.verification.max_abs_diff <= TOLERANCE
    assert split.bundle().manifest == manifest
    files = ["router.onnx", *(f"specialist_{p}.onnx" for p in PARTS), HEADS_FILE]
    assert sorted(entry.path for entry in manifest.files) == sorted(files)
    assert sorted(p.name for p in split.root.iterdir()) == sorted([*files, MANIFEST_NAME])
    # Same models, same heads file contents as the fused form.
    with np.load(split.root / HEADS_FILE) as a, np.load(fused.root / HEADS_FILE) as b:
        assert set(a.files) == set(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


def test_split_onnx_inputs_and_outputs(split: Exported, images: np.ndarray) -> None:
    router = session(split.root / "router.onnx")
    assert [(i.name, i.type) for i in router.get_inputs()] == [("image", "tensor(uint8)")]
    assert [o.name for o in router.get_outputs()] == ["body_part_probs"]
    (body,) = router.run(None, {"image": images[:2]})
    assert body.shape == (2, 3)
    for part in PARTS:
        specialist = session(split.root / f"specialist_{part}.onnx")
        assert [(i.name, i.type) for i in specialist.get_inputs()] == [("image", "tensor(uint8)")]
        assert [o.name for o in specialist.get_outputs()] == ["p_fractured", "feature_map"]
        p_fractured, fmap = specialist.run(None, {"image": images[:2]})
        assert p_fractured.shape == (2, 1)
        assert fmap.shape == (2, 7, 7, 2048)


def _hinted_batch(count: int) -> tuple[list[str | None], list[bool]]:
    hints: list[str | None] = [None, "elbow", "hand", None, "shoulder", "elbow", None, "hand", None, None, None]
    hints = (hints + [None] * count)[:count]
    wants = [i % 3 == 1 for i in range(count)]
    return hints, wants


def test_fused_and_split_answer_alike_through_the_pipeline(
    fused: Exported, split: Exported, images: np.ndarray, keras_answers: graphs.Reference
) -> None:
    hints, wants = _hinted_batch(len(images))
    assert {h for h in hints if h} == set(PARTS)
    assert None in hints
    from_fused = predict_batch(Engine(fused.bundle(), providers=["cpu"]), images, hints, wants)
    from_split = predict_batch(Engine(split.bundle(), providers=["cpu"]), images, hints, wants)
    assert len(from_fused) == len(from_split) == len(images)
    for i, (f, s) in enumerate(zip(from_fused, from_split, strict=True)):
        assert f.body_part == s.body_part, i
        assert f.body_part_from_hint == s.body_part_from_hint == (hints[i] is not None)
        if hints[i] is not None:
            assert f.body_part == hints[i]
            assert s.body_part_probs is None  # the split router is skipped for hinted items
        else:
            assert s.body_part_probs is not None
            assert f.body_part == PARTS[int(np.argmax(keras_answers.body_part_probs[i]))]
            assert_close(s.body_part_probs, f.body_part_probs, SAME_MODELS_TOLERANCE, f"probs {i}")
        assert f.body_part_probs is not None
        assert abs(f.p_fractured - s.p_fractured) <= SAME_MODELS_TOLERANCE, i
        expected = keras_answers.p_fractured[i, PARTS.index(f.body_part)]
        assert abs(f.p_fractured - expected) <= TOLERANCE, i
        if wants[i]:
            assert f.feature_map is not None
            assert s.feature_map is not None
            assert f.feature_map.shape == s.feature_map.shape == (7, 7, 2048)
            scale = max(1.0, float(np.abs(f.feature_map).max()))
            assert_close(s.feature_map, f.feature_map, SAME_MODELS_TOLERANCE * scale, f"map {i}")
        else:
            assert f.feature_map is None
            assert s.feature_map is None


# ---------------------------------------------------------------------------------------------------------
# Graph form follows the backbones


def test_backbones_identical_compares_weights(demo_set: ModelSet, differing_set: ModelSet) -> None:
    assert backbones_identical(demo_set)
    assert not backbones_identical(differing_set)
    own = backbone_of(differing_set.specialists[PERTURBED_PART])
    assert own is not backbone_of(differing_set.router)


def test_auto_writes_split_when_a_backbone_differs(
    auto_split: Exported, fused: Exported, differing_set: ModelSet, images: np.ndarray
) -> None:
    manifest = auto_split.manifest
    assert isinstance(manifest.graph, SplitGraph)
    assert 0.0 <= manifest.verification.max_abs_diff <= TOLERANCE
    auto_split.bundle()

    # The perturbed specialist's graph runs ITS backbone: it matches its Keras model...
    p_own, fmap_own = session(auto_split.root / f"specialist_{PERTURBED_PART}.onnx").run(None, {"image": images})
    specialist = differing_set.specialists[PERTURBED_PART]
    assert_close(p_own[:, 0], specialist.predict(images, verbose=0)[:, 0], TOLERANCE, "own p_fractured")
    assert_map_close(fmap_own, keras_feature_map(backbone_of(specialist), images), "own feature_map")
    # ...and visibly differs from the shared-backbone answer of the fused demo bundle.
    _, p_fused, fmap_fused = session(fused.root / "model.onnx").run(None, {"image": images})
    assert float(np.max(np.abs(p_own[:, 0] - p_fused[:, PARTS.index(PERTURBED_PART)]))) > 1e-3
    assert float(np.max(np.abs(fmap_own - fmap_fused))) > 1e-2
    # The unchanged models still answer like the fused bundle.
    (body,) = session(auto_split.root / "router.onnx").run(None, {"image": images})
    body_fused, *_ = session(fused.root / "model.onnx").run(None, {"image": images})
    assert_close(body, body_fused, SAME_MODELS_TOLERANCE, "router")
    p_hand, _ = session(auto_split.root / "specialist_hand.onnx").run(None, {"image": images})
    assert_close(p_hand[:, 0], p_fused[:, PARTS.index("hand")], SAME_MODELS_TOLERANCE, "hand")


def test_fused_is_refused_when_a_backbone_differs(
    differing_set: ModelSet, tmp_path_factory: pytest.TempPathFactory
) -> None:
    parent = tmp_path_factory.mktemp("refused-fused")
    with pytest.raises(ExportError, match="identical backbones"):
        export_bundle(differing_set, parent / "bundle", ExportOptions(graph="fused"))
    assert list(parent.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# CLI refusals (exit code 2, nothing written)


def _cli_refuses(out: Path, *args: object) -> None:
    before = sorted(p.name for p in out.parent.iterdir())
    assert run_cli(*args, "--out", out) == 2
    assert sorted(p.name for p in out.parent.iterdir()) == before


def test_cli_int8_needs_calibration(tmp_path: Path) -> None:
    _cli_refuses(tmp_path / "bundle", "--demo", "--int8")


def test_cli_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    _cli_refuses(out, "--demo")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_cli_demo_cannot_be_trained(tmp_path: Path) -> None:
    _cli_refuses(tmp_path / "bundle", "--demo", "--trained")


def test_cli_needs_enough_verification_images(tmp_path: Path) -> None:
    _cli_refuses(tmp_path / "bundle", "--demo", "--verify-images", "4")


def test_cli_refuses_a_folder_without_models(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _cli_refuses(tmp_path / "bundle", "--keras-dir", empty)


def test_cli_sources_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--demo", "--keras-dir", tmp_path, "--out", tmp_path / "bundle")
    assert exit_info.value.code == 2


def test_cli_top_level_option_before_the_subcommand(tmp_path: Path) -> None:
    # '--log-level WARNING' takes two words: the subcommand must still be found (and parse, not SystemExit).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["bfd"])
        code = bfd.cli.main(["--log-level", "WARNING", "export", "--demo", "--trained", "--out", str(tmp_path)])
    assert code == 2


def test_export_options_are_checked_before_any_work(demo_set: ModelSet, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--calibration"):
        export_bundle(demo_set, tmp_path / "a", ExportOptions(int8=True))
    with pytest.raises(ExportError, match="at least 8"):
        export_bundle(demo_set, tmp_path / "b", ExportOptions(verify_images=7))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Grad-CAM at serving time (numpy, heads.npz + the bundle's feature map) equals TensorFlow's GradientTape


def tape_grad_cam(specialist: keras.Model, image: np.ndarray) -> np.ndarray:
    """Textbook Grad-CAM with TensorFlow: d(pre-softmax 'fractured' logit) / d(last conv map)."""
    import tensorflow as tf

    conv_model = feature_map_model(backbone_of(specialist))
    dense = [layer for layer in head_of(specialist).layers if isinstance(layer, keras.layers.Dense)]
    with tf.GradientTape() as tape:
        conv, _ = conv_model([caffe(image[None])])
        hidden = tf.reduce_mean(conv, axis=(1, 2))
        for layer in dense[:-1]:
            hidden = layer(hidden)
        logits = tf.matmul(hidden, dense[-1].kernel) + dense[-1].bias  # before the softmax
        score = logits[:, 0]  # 'fractured'
    gradients = tape.gradient(score, conv)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(conv * weights, axis=-1))[0].numpy()
    return cam / cam.max() if cam.max() > 0 else cam


def test_serving_grad_cam_equals_gradient_tape_on_the_keras_model(
    fused: Exported, demo_set: ModelSet, images: np.ndarray
) -> None:
    from inference.heatmap import HeadBank, grad_cam

    engine = Engine(load_bundle(fused.root))
    bank = HeadBank.load(fused.root / HEADS_FILE)
    compared = 0
    for part in PARTS:
        hints: list[str | None] = [part] * len(images)
        predictions = predict_batch(engine, images, hints=hints, want_feature_map=[True] * len(images))
        for image, prediction in zip(images, predictions, strict=True):
            assert prediction.feature_map is not None
            ours = grad_cam(prediction.feature_map, bank.specialist(part))
            reference = tape_grad_cam(demo_set.specialists[part], image)
            assert ours.shape == reference.shape == (7, 7)
            np.testing.assert_allclose(ours, reference, atol=2e-3)
            compared += int(reference.max() > 0)
    assert compared >= len(PARTS)  # not only all-zero maps
