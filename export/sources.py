"""Where the Keras models come from: a `bfd train` run, the original project's H5 files, or a demo.

Every source is normalised to the canonical architecture of `training.architecture` (uint8 input,
preprocessing inside, nested `resnet50` backbone and `head`), so the rest of the export handles one shape.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np

from training.architecture import (
    BACKBONE_NAME,
    DEFAULT_PARTS,
    FRACTURE_LABELS,
    backbone_of,
    build_backbone,
    build_classifier,
    build_head,
    head_of,
)

log = logging.getLogger(__name__)

ROUTER_FILE = "router.keras"
SPECIALIST_FILE = "specialist_{part}.keras"
RUN_INFO_FILE = "models.json"
LEGACY_ROUTER_FILE = "ResNet50_BodyParts.h5"
LEGACY_SPECIALIST_PATTERN = re.compile(r"^ResNet50_(?P<part>[A-Za-z]+)_frac\.h5$")

ResizeMethod = Literal["bilinear", "nearest"]


class SourceError(ValueError):
    """The models given to the export are missing or do not fit the system's architecture."""


@dataclass
class ModelSet:
    """A router and one specialist per body part, in canonical form."""

    parts: list[str]
    router: keras.Model
    specialists: dict[str, keras.Model]
    kind: Literal["demo", "keras", "legacy-h5"]
    trained: bool
    backbone_weights: str
    resize: ResizeMethod = "bilinear"
    source_files: list[Path] = field(default_factory=list)
    thresholds: dict[str, dict[str, float | None]] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    # The original models, each expecting `preprocess_input` outside (legacy only): checked against ours.
    originals: dict[str, keras.Model] = field(default_factory=dict)

    def models(self) -> dict[str, keras.Model]:
        """'router' and 'specialist/<part>' -> model."""
        return {"router": self.router, **{f"specialist/{p}": m for p, m in self.specialists.items()}}


def demo_models(parts: Sequence[str] = DEFAULT_PARTS, weights: str | None = None, seed: int = 0) -> ModelSet:
    """Untrained heads on one shared backbone; never to be presented as a result."""
    keras.utils.set_random_seed(seed)
    ordered = sorted(parts)
    backbone = build_backbone(weights)
    router = build_classifier(len(ordered), backbone=backbone, name="router")
    specialists = {
        part: build_classifier(len(FRACTURE_LABELS), backbone=backbone, name=f"specialist_{part}") for part in ordered
    }
    return ModelSet(
        parts=ordered,
        router=router,
        specialists=specialists,
        kind="demo",
        trained=False,
        backbone_weights=str(weights or "none"),
    )


def load_keras_dir(directory: Path, *, trained: bool | None = None) -> ModelSet:
    """Load a `bfd train` run, or the original project's H5 files, from one folder."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SourceError(f"{directory}: not a folder")
    if (directory / ROUTER_FILE).is_file():
        return _load_canonical(directory, trained)
    if (directory / LEGACY_ROUTER_FILE).is_file():
        return _load_legacy(directory, trained)
    raise SourceError(
        f"{directory}: expected {ROUTER_FILE} + {SPECIALIST_FILE.format(part='<part>')} (from `bfd train`) "
        f"or the original project's {LEGACY_ROUTER_FILE} + ResNet50_<Part>_frac.h5"
    )


def _load_canonical(directory: Path, trained: bool | None) -> ModelSet:
    info: dict[str, Any] = {}
    if (directory / RUN_INFO_FILE).is_file():
        info = json.loads((directory / RUN_INFO_FILE).read_text(encoding="utf-8"))
    parts = sorted(info.get("body_parts") or _parts_from_files(directory))
    router = _load(directory / ROUTER_FILE)
    specialists = {part: _load(directory / SPECIALIST_FILE.format(part=part)) for part in parts}
    files = [directory / ROUTER_FILE, *(directory / SPECIALIST_FILE.format(part=p) for p in parts)]
    model_set = ModelSet(
        parts=parts,
        router=router,
        specialists=specialists,
        kind="keras",
        trained=bool(info.get("trained", False)) if trained is None else trained,
        backbone_weights=str(info.get("backbone_weights", "unknown")),
        resize=info.get("resize", "bilinear"),
        source_files=files,
        thresholds=info.get("thresholds", {}),
        metrics=info.get("metrics"),
    )
    _check_shapes(model_set)
    return model_set


def _parts_from_files(directory: Path) -> list[str]:
    prefix, suffix = SPECIALIST_FILE.split("{part}")
    parts = [p.name[len(prefix) : -len(suffix)] for p in directory.glob(SPECIALIST_FILE.format(part="*"))]
    if not parts:
        raise SourceError(f"{directory}: no {SPECIALIST_FILE.format(part='<part>')} files")
    return parts


def _load_legacy(directory: Path, trained: bool | None) -> ModelSet:
    specialist_files = {
        match["part"].lower(): path
        for path in sorted(directory.iterdir())
        if (match := LEGACY_SPECIALIST_PATTERN.match(path.name))
    }
    if not specialist_files:
        raise SourceError(f"{directory}: {LEGACY_ROUTER_FILE} found but no ResNet50_<Part>_frac.h5")
    parts = sorted(specialist_files)
    originals = {"router": _load(directory / LEGACY_ROUTER_FILE)}
    originals.update({f"specialist/{p}": _load(specialist_files[p]) for p in parts})
    model_set = ModelSet(
        parts=parts,
        router=_canonical_from_legacy(originals["router"], len(parts), "router"),
        specialists={
            p: _canonical_from_legacy(originals[f"specialist/{p}"], len(FRACTURE_LABELS), f"specialist_{p}")
            for p in parts
        },
        kind="legacy-h5",
        # The original project's files are its trained models; --untrained overrides for test fixtures.
        trained=True if trained is None else trained,
        backbone_weights="imagenet",
        # Keras' flow_from_dataframe resized with nearest neighbour when those models were trained.
        resize="nearest",
        source_files=[directory / LEGACY_ROUTER_FILE, *(specialist_files[p] for p in parts)],
        originals=originals,
    )
    _check_shapes(model_set)
    return model_set


def _load(path: Path) -> keras.Model:
    if not path.is_file():
        raise SourceError(f"{path}: model file missing")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for unreadable files
        raise SourceError(f"{path}: cannot be loaded as a Keras model ({error})") from error


def _find_layer(model: keras.Model, name: str) -> keras.layers.Layer | None:
    """A layer by name, searching nested models too (some saves nest ResNet50 as one layer)."""
    for layer in model.layers:
        if layer.name == name:
            return layer
        if isinstance(layer, keras.Model) and (found := _find_layer(layer, name)) is not None:
            return found
    return None


def _canonical_from_legacy(original: keras.Model, n_classes: int, name: str) -> keras.Model:
    """Copy a flat Keras-2 ResNet50+head model's weights into our architecture, layer by layer."""
    canonical = build_classifier(n_classes, backbone=build_backbone(None), head=build_head(n_classes), name=name)
    for layer in backbone_of(canonical).layers:
        if not layer.weights:
            continue
        source = _find_layer(original, layer.name)
        if source is None:
            raise SourceError(f"{original.name}: no layer {layer.name!r}; not the original ResNet50 architecture")
        layer.set_weights(source.get_weights())
    dense = [layer for layer in _all_layers(original) if isinstance(layer, keras.layers.Dense)]
    ours = [layer for layer in head_of(canonical).layers if isinstance(layer, keras.layers.Dense)]
    if [d.units for d in dense] != [o.units for o in ours]:
        raise SourceError(
            f"{original.name}: head Dense units {[d.units for d in dense]}, expected {[o.units for o in ours]}"
        )
    for source, target in zip(dense, ours, strict=True):
        target.set_weights(source.get_weights())
    return canonical


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    layers: list[keras.layers.Layer] = []
    for layer in model.layers:
        layers.extend(_all_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return layers


def _check_shapes(model_set: ModelSet) -> None:
    expected = {"router": len(model_set.parts)} | {f"specialist/{p}": 2 for p in model_set.parts}
    for key, model in model_set.models().items():
        if _find_layer(model, BACKBONE_NAME) is None:
            raise SourceError(f"{key}: no nested {BACKBONE_NAME!r} backbone; not built by training.architecture")
        got = model.outputs[0].shape[-1]
        if got != expected[key]:
            raise SourceError(f"{key}: outputs {got} classes, expected {expected[key]} for parts {model_set.parts}")


def backbones_identical(model_set: ModelSet) -> bool:
    """True when every model's backbone holds the same weights, so one backbone pass serves all heads."""
    reference = backbone_of(model_set.router).get_weights()
    for part, model in model_set.specialists.items():
        weights = backbone_of(model).get_weights()
        if len(weights) != len(reference) or any(
            a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(weights, reference, strict=True)
        ):
            log.info("specialist %s has its own backbone weights: writing the split graph form", part)
            return False
    return True
