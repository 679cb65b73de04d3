"""The model bundle: its manifest schema and a verifying loader.

A bundle is a folder written by `bfd export`: `manifest.json`, one or more ONNX graphs and the heads' weights
(`heads.npz`, for heatmaps). The manifest is the single source of truth for what the graphs expect (the input
contract) and what they return; `models/README.md` documents it field by field.

This module imports neither TensorFlow nor onnxruntime: the service, the export and the evaluation all read
bundles through it, and loading one verifies every file's sha256 so a corrupt or tampered file is refused at
start-up with a message naming it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FRACTURE_LABELS = ("fractured", "normal")


class BundleError(Exception):
    """A bundle that cannot be served: the message names the file and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    path: str = Field(description="Path relative to the bundle folder.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)


class InputContract(_Strict):
    """What every graph takes: raw bytes of a prepared image, never floats."""

    name: str = "image"
    height: int = 224
    width: int = 224
    channels: Literal[3] = 3
    dtype: Literal["uint8"] = "uint8"
    layout: Literal["NHWC"] = "NHWC"
    resize: Literal["bilinear", "nearest"] = "bilinear"
    fit: Literal["stretch"] = "stretch"
    color: Literal["grayscale-replicated"] = "grayscale-replicated"
    normalization: Literal["caffe-in-graph"] = "caffe-in-graph"


class Thresholds(_Strict):
    """Operating points on P(fractured) for one body part."""

    decision: float = Field(0.5, ge=0.0, le=1.0, description="fractured when P(fractured) >= decision")
    high_sensitivity: float | None = Field(None, ge=0.0, le=1.0)
    high_specificity: float | None = Field(None, ge=0.0, le=1.0)


class Abstention(_Strict):
    """When the service abstains (still reporting the probabilities): the bundle's defaults; settings override."""

    min_router_probability: float | None = Field(
        None, ge=0.0, le=1.0, description="abstain when the router's top probability is under this"
    )
    max_colourfulness: float | None = Field(
        None, ge=0.0, description="abstain when the image is more colourful than this (not a radiograph)"
    )


class FusedGraph(_Strict):
    """One graph: the backbone once, then every head."""

    form: Literal["fused"] = "fused"
    file: str
    body_part_probs: str = "body_part_probs"  # (N, P) float32, order = body_parts
    p_fractured: str = "p_fractured"  # (N, P) float32, column i = specialist of body_parts[i]
    feature_map: str = "feature_map"  # (N, 7, 7, 2048) float32, last conv block


class SplitGraph(_Strict):
    """A router graph and one graph per specialist (their backbones differ)."""

    form: Literal["split"] = "split"
    router: str
    specialists: dict[str, str]
    body_part_probs: str = "body_part_probs"  # router output (N, P)
    p_fractured: str = "p_fractured"  # specialist output (N, 1)
    feature_map: str = "feature_map"  # specialist output (N, 7, 7, 2048)


class Source(_Strict):
    kind: Literal["demo", "keras", "legacy-h5"]
    files: list[FileEntry] = Field(default_factory=list)
    backbone_weights: str = Field(description="'imagenet', 'none', or the weights file's name")


class Verification(_Strict):
    images: int = Field(ge=1)
    max_abs_diff: float
    tolerance: float


class QuantizationReport(_Strict):
    method: str
    calibration_images: int
    held_out_images: int
    body_part_agreement: float
    fracture_agreement: float
    max_probability_diff: float
    min_agreement: float


class Manifest(_Strict):
    format_version: Literal[1] = 1
    name: str
    version: str
    created_at: datetime
    source: Source
    trained: bool = Field(description="true only when the heads were trained on real data")
    body_parts: list[str] = Field(min_length=1)
    fracture_labels: tuple[str, str] = FRACTURE_LABELS
    thresholds: dict[str, Thresholds]
    input: InputContract
    graph: Annotated[FusedGraph | SplitGraph, Field(discriminator="form")]
    precision: Literal["fp32", "int8"] = "fp32"
    heads_file: str = "heads.npz"
    files: list[FileEntry]
    verification: Verification
    quantization: QuantizationReport | None = None
    metrics: dict[str, Any] | None = None
    abstention: Abstention | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.body_parts != sorted(set(self.body_parts)):
            raise ValueError(f"body_parts must be sorted and unique (the router's class order), got {self.body_parts}")
        if set(self.thresholds) != set(self.body_parts):
            raise ValueError(f"thresholds must name every body part {self.body_parts}, got {sorted(self.thresholds)}")
        if self.fracture_labels != FRACTURE_LABELS:
            raise ValueError(f"fracture_labels must be {FRACTURE_LABELS}, got {self.fracture_labels}")
        if isinstance(self.graph, SplitGraph) and set(self.graph.specialists) != set(self.body_parts):
            raise ValueError(
                f"split graph must have one specialist per body part {self.body_parts}, "
                f"got {sorted(self.graph.specialists)}"
            )
        listed = {entry.path for entry in self.files}
        missing = [name for name in self.graph_files() + [self.heads_file] if name not in listed]
        if missing:
            raise ValueError(f"files must list every graph and the heads file; not listed: {missing}")
        return self

    def graph_files(self) -> list[str]:
        """Every ONNX file the graph form names, router first."""
        return graph_file_names(self.graph)


def graph_file_names(graph: FusedGraph | SplitGraph) -> list[str]:
    """The ONNX files a graph description names: the fused file, or the router then each specialist."""
    if isinstance(graph, FusedGraph):
        return [graph.file]
    return [graph.router, *(graph.specialists[part] for part in sorted(graph.specialists))]


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    root: Path
    manifest: Manifest

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def model_name(self) -> str:
        return self.manifest.name

    @property
    def model_version(self) -> str:
        return self.manifest.version

    @property
    def sha256(self) -> str:
        """The bundle's fingerprint: sha256 of its manifest, which holds every file's sha256 (checked on load)."""
        return sha256_file(self.root / MANIFEST_NAME)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large graphs don't sit in memory twice."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(root: Path, name: str) -> FileEntry:
    """Describe one file of a bundle (used by the export when writing the manifest)."""
    path = root / name
    return FileEntry(path=name, sha256=sha256_file(path), size_bytes=path.stat().st_size)


def read_manifest(root: Path) -> Manifest:
    """Parse and validate `manifest.json` without checking the other files."""
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: no manifest.json here; build a bundle with `bfd export`")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{manifest_path}: not valid JSON ({error})") from error
    if not isinstance(raw, dict):
        raise BundleError(f"{manifest_path}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: unknown format_version {version!r}; this version reads format {FORMAT_VERSION}"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as error:
        raise BundleError(f"{manifest_path}: invalid manifest: {error}") from error


def load_bundle(root: str | Path) -> Bundle:
    """Read a bundle and verify every file it lists: presence, size and sha256."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"{root}: bundle folder not found; build one with `bfd export --demo --out {root}`")
    manifest = read_manifest(root)
    for entry in manifest.files:
        path = root / entry.path
        if root.resolve() not in path.resolve().parents:
            raise BundleError(f"{path}: listed file lies outside the bundle folder")
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry.size_bytes:
            raise BundleError(f"{path}: size {size} bytes, manifest says {entry.size_bytes}; file corrupt or replaced")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise BundleError(
                f"{path}: sha256 {digest} does not match the manifest's {entry.sha256}; file corrupt or tampered"
            )
    return Bundle(root=root, manifest=manifest)


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write the manifest with stable formatting."""
    path = root / MANIFEST_NAME
    path.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path
