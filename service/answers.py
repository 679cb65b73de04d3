"""From the models' numbers to the answer a person reads: labels, thresholds, flags, warnings."""

from __future__ import annotations

from service.bundle import Manifest
from service.pipeline import ItemPrediction
from service.schemas import (
    UNTRAINED_WARNING,
    BodyPartAnswer,
    FractureAnswer,
    ImagePrediction,
    ModelAnswer,
    Timings,
)


def model_answer(manifest: Manifest) -> ModelAnswer:
    return ModelAnswer(
        name=manifest.name,
        version=manifest.version,
        trained=manifest.trained,
        precision=manifest.precision,
        graph=manifest.graph.form,
    )


def bundle_warnings(manifest: Manifest) -> list[str]:
    return [] if manifest.trained else [UNTRAINED_WARNING]


def image_prediction(
    manifest: Manifest, prediction: ItemPrediction, image_name: str, timings: Timings
) -> ImagePrediction:
    """One image's answer; fractured when P(fractured) >= the part's decision threshold."""
    thresholds = manifest.thresholds[prediction.body_part]
    p = prediction.p_fractured
    probs = prediction.body_part_probs
    probabilities = None if probs is None else {part: float(probs[i]) for i, part in enumerate(manifest.body_parts)}
    return ImagePrediction(
        image_name=image_name,
        body_part=BodyPartAnswer(
            label=prediction.body_part,
            probability=None if probabilities is None else probabilities[prediction.body_part],
            probabilities=probabilities,
            source="client" if prediction.body_part_from_hint else "router",
        ),
        fracture=FractureAnswer(
            label="fractured" if p >= thresholds.decision else "normal",
            probability=p,
            threshold=thresholds.decision,
            suspicious=None if thresholds.high_sensitivity is None else p >= thresholds.high_sensitivity,
            definite=None if thresholds.high_specificity is None else p >= thresholds.high_specificity,
        ),
        model=model_answer(manifest),
        warnings=bundle_warnings(manifest),
        timings_ms=timings,
    )
