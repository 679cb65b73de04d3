"""service/bundle.py: the manifest schema and the verifying loader, on tiny bundles (no TensorFlow).

Every refusal is a BundleError whose message names the file at fault and the problem; each case below breaks a
freshly built tiny bundle in exactly one way.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from factories import (
    DEFAULT_PARTS,
    build_tiny_bundle,
    read_manifest_json,
    replace_file,
    write_manifest_json,
)

from inference.bundle import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    BundleError,
    FusedGraph,
    Manifest,
    SplitGraph,
    load_bundle,
    read_manifest,
    sha256_file,
)


@pytest.fixture
def fused(tmp_path: Path) -> Path:
    return build_tiny_bundle(tmp_path / "fused", form="fused")


@pytest.fixture
def split(tmp_path: Path) -> Path:
    return build_tiny_bundle(tmp_path / "split", form="split")


def edit_manifest(root: Path, change: Callable[[dict[str, Any]], object]) -> None:
    data = read_manifest_json(root)
    change(data)
    write_manifest_json(root, data)


def refused(root: Path | str) -> str:
    with pytest.raises(BundleError) as caught:
        load_bundle(root)
    return str(caught.value)


# --- loading good bundles ------------------------------------------------------------------------------------


def test_fused_tiny_bundle_loads(fused: Path) -> None:
    bundle = load_bundle(fused)
    manifest = bundle.manifest
    assert bundle.root == fused
    assert (bundle.model_name, bundle.model_version) == ("tiny", "0.0.1-test")
    assert isinstance(manifest.graph, FusedGraph)
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.body_parts == list(DEFAULT_PARTS)
    assert manifest.graph_files() == ["model.onnx"]
    assert sorted(e.path for e in manifest.files) == ["heads.npz", "model.onnx"]
    assert manifest.trained is False
    assert manifest.source.kind == "demo"
    assert manifest.precision == "fp32"
    assert manifest.quantization is None
    for entry in manifest.files:
        assert entry.sha256 == sha256_file(fused / entry.path)
        assert entry.size_bytes == (fused / entry.path).stat().st_size


def test_split_tiny_bundle_loads(split: Path) -> None:
    manifest = load_bundle(str(split)).manifest  # a str path works too
    assert isinstance(manifest.graph, SplitGraph)
    assert manifest.graph_files() == ["router.onnx"] + [f"specialist_{p}.onnx" for p in DEFAULT_PARTS]
    assert sorted(e.path for e in manifest.files) == sorted([*manifest.graph_files(), "heads.npz"])


def test_factory_options_reach_the_manifest(tmp_path: Path) -> None:
    root = build_tiny_bundle(
        tmp_path / "b",
        parts=("ankle", "wrist"),
        trained=True,
        thresholds={"wrist": {"decision": 0.3, "high_sensitivity": 0.1}},
        resize="nearest",
        name="other",
        version="9.9",
    )
    manifest = load_bundle(root).manifest
    assert manifest.body_parts == ["ankle", "wrist"]
    assert manifest.trained is True
    assert manifest.thresholds["wrist"].decision == 0.3
    assert manifest.thresholds["wrist"].high_sensitivity == 0.1
    assert manifest.thresholds["ankle"].decision == 0.5
    assert manifest.input.resize == "nearest"
    assert (manifest.name, manifest.version) == ("other", "9.9")


def test_heads_file_has_the_export_layout(fused: Path) -> None:
    with np.load(fused / "heads.npz") as heads:
        arrays = {key: heads[key] for key in heads.files}
    parts = len(DEFAULT_PARTS)
    expected: dict[str, tuple[int, ...]] = {}
    for model, classes in [("router", parts), *((f"specialist/{p}", 2) for p in DEFAULT_PARTS)]:
        for index, (fan_in, fan_out) in enumerate([(2048, 128), (128, 50), (50, classes)]):
            expected[f"{model}/{index}/kernel"] = (fan_in, fan_out)
            expected[f"{model}/{index}/bias"] = (fan_out,)
    assert {k: v.shape for k, v in arrays.items()} == expected
    assert all(v.dtype == np.float32 for v in arrays.values())


def test_manifest_round_trips(fused: Path, split: Path) -> None:
    for root in (fused, split):
        manifest = read_manifest(root)
        assert Manifest.model_validate_json(manifest.model_dump_json()) == manifest
        assert Manifest.model_validate(json.loads(manifest.model_dump_json())) == manifest
        assert Manifest.model_validate(manifest.model_dump()) == manifest


def test_tiny_bundle_is_reproducible(tmp_path: Path) -> None:
    first = build_tiny_bundle(tmp_path / "a", form="split")
    second = build_tiny_bundle(tmp_path / "b", form="split")
    assert (first / MANIFEST_NAME).read_bytes() == (second / MANIFEST_NAME).read_bytes()


# --- refusals: the folder and the manifest file ---------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    message = refused(missing)
    assert str(missing) in message
    assert "bundle folder not found" in message


def test_missing_manifest(fused: Path) -> None:
    (fused / MANIFEST_NAME).unlink()
    message = refused(fused)
    assert str(fused / MANIFEST_NAME) in message
    assert "no manifest.json" in message


def test_manifest_is_a_folder(fused: Path) -> None:
    (fused / MANIFEST_NAME).unlink()
    (fused / MANIFEST_NAME).mkdir()
    assert "no manifest.json" in refused(fused)


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00garbage"])
def test_manifest_not_json(fused: Path, content: bytes) -> None:
    (fused / MANIFEST_NAME).write_bytes(content)
    message = refused(fused)
    assert str(fused / MANIFEST_NAME) in message
    assert "not valid JSON" in message


@pytest.mark.parametrize(("value", "kind"), [([1, 2], "list"), ("manifest", "str"), (None, "NoneType")])
def test_manifest_not_an_object(fused: Path, value: object, kind: str) -> None:
    write_manifest_json(fused, value)
    message = refused(fused)
    assert str(fused / MANIFEST_NAME) in message
    assert f"expected a JSON object, got {kind}" in message


@pytest.mark.parametrize("version", [7, 0, "1", None])
def test_unknown_format_version(fused: Path, version: object) -> None:
    edit_manifest(fused, lambda m: m.update(format_version=version))
    message = refused(fused)
    assert str(fused / MANIFEST_NAME) in message
    assert "format_version" in message
    assert repr(version) in message


def test_missing_format_version(fused: Path) -> None:
    edit_manifest(fused, lambda m: m.pop("format_version"))
    assert "unknown format_version None" in refused(fused)


# --- refusals: the manifest's content -------------------------------------------------------------------------


def _unsorted_parts(m: dict[str, Any]) -> None:
    m["body_parts"] = ["hand", "elbow", "shoulder"]


def _duplicate_parts(m: dict[str, Any]) -> None:
    m["body_parts"] = ["elbow", "elbow", "hand", "shoulder"]


def _thresholds_short(m: dict[str, Any]) -> None:
    del m["thresholds"]["hand"]


def _thresholds_extra(m: dict[str, Any]) -> None:
    m["thresholds"]["knee"] = {"decision": 0.5}


def _graph_not_listed(m: dict[str, Any]) -> None:
    m["files"] = [e for e in m["files"] if e["path"] != "model.onnx"]


def _heads_not_listed(m: dict[str, Any]) -> None:
    m["files"] = [e for e in m["files"] if e["path"] != "heads.npz"]


def _bad_sha_format(m: dict[str, Any]) -> None:
    m["files"][0]["sha256"] = "XYZ"


INVALID_MANIFESTS: list[tuple[str, Callable[[dict[str, Any]], object], list[str]]] = [
    ("trained-not-bool", lambda m: m.update(trained="maybe"), ["trained", "valid boolean"]),
    ("extra-field", lambda m: m.update(colour="blue"), ["colour", "Extra inputs are not permitted"]),
    ("extra-nested-field", lambda m: m["input"].update(gamma=2.2), ["input.gamma", "Extra inputs"]),
    ("missing-field", lambda m: m.pop("name"), ["name", "Field required"]),
    ("bad-date", lambda m: m.update(created_at="yesterday"), ["created_at"]),
    ("input-dtype", lambda m: m["input"].update(dtype="float32"), ["input.dtype", "'uint8'"]),
    ("input-layout", lambda m: m["input"].update(layout="NCHW"), ["input.layout", "'NHWC'"]),
    ("unknown-graph-form", lambda m: m["graph"].update(form="tree"), ["graph", "tree"]),
    ("unsorted-body-parts", _unsorted_parts, ["body_parts must be sorted and unique", "'hand', 'elbow'"]),
    ("duplicate-body-parts", _duplicate_parts, ["body_parts must be sorted and unique"]),
    ("no-body-parts", lambda m: m.update(body_parts=[]), ["body_parts", "at least 1"]),
    ("thresholds-missing-a-part", _thresholds_short, ["thresholds must name every body part"]),
    ("thresholds-unknown-part", _thresholds_extra, ["thresholds must name every body part", "knee"]),
    (
        "threshold-out-of-range",
        lambda m: m["thresholds"]["hand"].update(decision=1.5),
        ["thresholds.hand.decision", "less than or equal to 1"],
    ),
    (
        "fracture-labels",
        lambda m: m.update(fracture_labels=["normal", "fractured"]),
        ["fracture_labels must be"],
    ),
    ("graph-file-not-listed", _graph_not_listed, ["not listed: ['model.onnx']"]),
    ("heads-file-not-listed", _heads_not_listed, ["not listed: ['heads.npz']"]),
    ("sha-not-hex", _bad_sha_format, ["files.0.sha256", "pattern"]),
    ("negative-size", lambda m: m["files"][0].update(size_bytes=-1), ["files.0.size_bytes"]),
    ("precision", lambda m: m.update(precision="fp16"), ["precision", "fp16"]),
    ("source-kind", lambda m: m["source"].update(kind="pytorch"), ["source.kind"]),
    ("verification-images", lambda m: m["verification"].update(images=0), ["verification.images"]),
]


@pytest.mark.parametrize(
    ("change", "expected"),
    [pytest.param(change, expected, id=case) for case, change, expected in INVALID_MANIFESTS],
)
def test_invalid_manifest(fused: Path, change: Callable[[dict[str, Any]], object], expected: list[str]) -> None:
    edit_manifest(fused, change)
    message = refused(fused)
    assert str(fused / MANIFEST_NAME) in message
    assert "invalid manifest" in message
    for fragment in expected:
        assert fragment in message


def test_split_specialists_must_match_body_parts(split: Path) -> None:
    edit_manifest(split, lambda m: m["graph"]["specialists"].pop("hand"))
    message = refused(split)
    assert str(split / MANIFEST_NAME) in message
    assert "one specialist per body part" in message
    assert "['elbow', 'shoulder']" in message


def test_split_specialist_for_an_unknown_part(split: Path) -> None:
    edit_manifest(split, lambda m: m["graph"]["specialists"].update(knee="specialist_hand.onnx"))
    assert "one specialist per body part" in refused(split)


def test_split_specialist_file_not_listed(split: Path) -> None:
    edit_manifest(split, lambda m: m.update(files=[e for e in m["files"] if e["path"] != "specialist_hand.onnx"]))
    assert "not listed: ['specialist_hand.onnx']" in refused(split)


def test_read_manifest_does_not_check_files(fused: Path) -> None:
    (fused / "model.onnx").unlink()
    assert read_manifest(fused).graph_files() == ["model.onnx"]
    assert "missing" in refused(fused)


# --- refusals: the files the manifest lists -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.onnx", "heads.npz"])
def test_listed_file_missing(fused: Path, name: str) -> None:
    (fused / name).unlink()
    message = refused(fused)
    assert str(fused / name) in message
    assert "listed in the manifest but missing" in message


def test_listed_file_is_a_folder(fused: Path) -> None:
    (fused / "heads.npz").unlink()
    (fused / "heads.npz").mkdir()
    assert "missing" in refused(fused)


def test_split_specialist_missing(split: Path) -> None:
    (split / "specialist_shoulder.onnx").unlink()
    message = refused(split)
    assert str(split / "specialist_shoulder.onnx") in message
    assert "missing" in message


@pytest.mark.parametrize("delta", [1, -1])
def test_file_with_wrong_size(fused: Path, delta: int) -> None:
    path = fused / "model.onnx"
    data = path.read_bytes()
    listed = len(data)
    path.write_bytes(data + b"\0" if delta > 0 else data[:-1])
    message = refused(fused)
    assert str(path) in message
    assert f"size {listed + delta} bytes, manifest says {listed}" in message


@pytest.mark.parametrize("name", ["model.onnx", "heads.npz"])
def test_file_with_a_flipped_byte(fused: Path, name: str) -> None:
    path = fused / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    message = refused(fused)
    assert str(path) in message
    assert "sha256" in message
    assert sha256_file(path) in message
    assert "corrupt or tampered" in message


def test_split_specialists_swapped(tmp_path: Path) -> None:
    """Two specialists of the same size: swapping their files is caught by the hashes, not the sizes."""
    root = build_tiny_bundle(tmp_path / "b", form="split", specialist_offsets={"hand": 0.25})
    hand, shoulder = root / "specialist_hand.onnx", root / "specialist_shoulder.onnx"
    hand_bytes, shoulder_bytes = hand.read_bytes(), shoulder.read_bytes()
    assert len(hand_bytes) == len(shoulder_bytes)
    assert hand_bytes != shoulder_bytes
    hand.write_bytes(shoulder_bytes)
    shoulder.write_bytes(hand_bytes)
    message = refused(root)
    assert "sha256" in message
    assert str(hand) in message


@pytest.mark.parametrize("escape", ["../x", "sub/../../x"])
def test_listed_path_escaping_the_folder(fused: Path, escape: str) -> None:
    outside = fused.parent / "x"
    shutil.copy(fused / "heads.npz", outside)  # present, right size and hash: only its place is wrong
    heads = next(e for e in read_manifest_json(fused)["files"] if e["path"] == "heads.npz")
    edit_manifest(fused, lambda m: m["files"].append({**heads, "path": escape}))
    message = refused(fused)
    assert escape in message
    assert "outside the bundle folder" in message


def test_listed_absolute_path(fused: Path) -> None:
    outside = fused.parent / "x"
    shutil.copy(fused / "heads.npz", outside)
    heads = next(e for e in read_manifest_json(fused)["files"] if e["path"] == "heads.npz")
    edit_manifest(fused, lambda m: m["files"].append({**heads, "path": str(outside)}))
    message = refused(fused)
    assert str(outside) in message
    assert "outside the bundle folder" in message


def test_listed_symlink_pointing_outside(fused: Path) -> None:
    outside = fused.parent / "elsewhere.onnx"
    (fused / "model.onnx").rename(outside)
    (fused / "model.onnx").symlink_to(outside)
    assert "outside the bundle folder" in refused(fused)


def test_replace_file_keeps_the_bundle_loadable(fused: Path) -> None:
    """The helper other tests use to plant a bad graph: it updates sha256 and size, so only the content is bad."""
    replace_file(fused, "model.onnx", b"not an onnx graph")
    entry = next(e for e in load_bundle(fused).manifest.files if e.path == "model.onnx")
    assert entry.size_bytes == len(b"not an onnx graph")
