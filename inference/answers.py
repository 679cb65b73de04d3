"""From the models' numbers to the answer a person reads: labels, thresholds, flags, abstention, warnings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from inference.bundle import Manifest
from inference.pipeline import ItemPrediction
from inference.results import (
    UNTRAINED_WARNING,
    BodyPartAnswer,
    DicomAnswer,
    FractureAnswer,
    HeatmapAnswer,
    ImagePrediction,
    ModelAnswer,
    StudyAnswer,
    Summary,
    Timings,
)

PartSource = Literal["router", "client", "dicom"]
DEFAULT_MIN_ROUTER_PROBABILITY = 0.5
DEFAULT_MAX_COLOURFULNESS = 12.0  # radiographs are grey (0); burned-in coloured labels stay far below this


@dataclass(frozen=True)
class AbstentionPolicy:
    """When to say 'out of my depth' instead of a label (the probabilities are still reported)."""

    min_router_probability: float = DEFAULT_MIN_ROUTER_PROBABILITY
    max_colourfulness: float = DEFAULT_MAX_COLOURFULNESS

    @classmethod
    def resolve(
        cls, manifest: Manifest, min_router_probability: float | None, max_colourfulness: float | None
    ) -> AbstentionPolicy:
        """Settings first, then the bundle's manifest, then the defaults."""
        bundle = manifest.abstention
        return cls(
            min_router_probability=_first_set(
                min_router_probability,
                None if bundle is None else bundle.min_router_probability,
                DEFAULT_MIN_ROUTER_PROBABILITY,
            ),
            max_colourfulness=_first_set(
                max_colourfulness, None if bundle is None else bundle.max_colourfulness, DEFAULT_MAX_COLOURFULNESS
            ),
        )

    def reason(self, router_probs: np.ndarray | None, colourfulness: float) -> str | None:
        """Why to abstain, or None. Router probabilities are None when a hint skipped a split router."""
        if colourfulness > self.max_colourfulness:
            return (
                f"not a radiograph: the image is in colour (colourfulness {colourfulness:.1f} > "
                f"{self.max_colourfulness:g})"
            )
        if router_probs is not None and len(router_probs):
            top = float(np.max(router_probs))
            if top < self.min_router_probability:
                return (
                    f"the router is unsure of the body part (top probability {top:.2f} < "
                    f"{self.min_router_probability:g}): the image may show a part or view this model does not know"
                )
        return None


def _first_set(*values: float | None) -> float:
    return next(float(v) for v in values if v is not None)


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


def fracture_answer(manifest: Manifest, part: str, p: float) -> FractureAnswer:
    """Fractured when P(fractured) >= the part's decision threshold; flags at both operating points."""
    thresholds = manifest.thresholds[part]
    return FractureAnswer(
        label="fractured" if p >= thresholds.decision else "normal",
        probability=p,
        threshold=thresholds.decision,
        suspicious=None if thresholds.high_sensitivity is None else p >= thresholds.high_sensitivity,
        definite=None if thresholds.high_specificity is None else p >= thresholds.high_specificity,
    )


def _body_part_answer(manifest: Manifest, part: str, probs: np.ndarray | None, source: PartSource) -> BodyPartAnswer:
    probabilities = None if probs is None else {name: float(probs[i]) for i, name in enumerate(manifest.body_parts)}
    router_label = None
    if source != "router" and probs is not None:
        router_label = manifest.body_parts[int(np.argmax(probs))]
    return BodyPartAnswer(
        label=part,
        probability=None if probabilities is None else probabilities[part],
        probabilities=probabilities,
        source=source,
        router_label=router_label,
    )


def image_prediction(
    manifest: Manifest,
    prediction: ItemPrediction,
    image_name: str,
    timings: Timings,
    *,
    policy: AbstentionPolicy | None = None,
    colourfulness: float = 0.0,
    source: PartSource | None = None,
    heatmap: HeatmapAnswer | None = None,
    dicom: DicomAnswer | None = None,
) -> ImagePrediction:
    """One image's answer."""
    source = source or ("client" if prediction.body_part_from_hint else "router")
    body_part = _body_part_answer(manifest, prediction.body_part, prediction.body_part_probs, source)
    warnings = bundle_warnings(manifest)
    if body_part.router_label is not None and body_part.router_label != body_part.label:
        warnings.append(
            f"the body part came from the {source} ({body_part.label}) but the router says "
            f"{body_part.router_label}; the {body_part.label} specialist answered"
        )
    # A part named by the client is not second-guessed by the router's doubt; a colour photo still is.
    reason = (policy or AbstentionPolicy()).reason(
        prediction.body_part_probs if source == "router" else None, colourfulness
    )
    answer = ImagePrediction(
        image_name=image_name,
        body_part=body_part,
        fracture=fracture_answer(manifest, prediction.body_part, prediction.p_fractured),
        model=model_answer(manifest),
        abstained=reason is not None,
        abstention_reason=reason,
        heatmap=heatmap,
        dicom=dicom,
        warnings=warnings,
        timings_ms=timings,
    )
    answer.summary = summarise(answer)
    return answer


UNTRAINED_BANNER = "UNTRAINED MODEL - meaningless: this bundle was not trained on real data; do not use its answers."


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _flag(value: bool | None, *, trained: bool = True) -> str:
    if value is None:
        return "unknown"
    if not trained:
        return "undecided"
    return "yes" if value else "no"


def summarise(answer: ImagePrediction) -> Summary:
    """The sentences an answer comes down to: what every door shows, so no two can disagree.

    An untrained bundle's finding and flags are 'undecided' (its P and threshold are still quoted): its
    numbers mean nothing, so no sentence may read as a fracture found or ruled out.
    """
    part, fracture, model = answer.body_part, answer.fracture, answer.model
    body = f"Body part: {part.label}"
    if part.probability is not None:
        body += f" (router p = {_p(part.probability)})"
    if part.source != "router":
        body += f", from the {'DICOM header' if part.source == 'dicom' else 'client'}"
        if part.router_label:
            body += f"; the router said {part.router_label}"
    above = fracture.probability >= fracture.threshold
    label = fracture.label.upper() if fracture.label == "fractured" else fracture.label
    if not model.trained:
        label = "undecided (untrained model)"
    fracture_text = (
        f"Fracture: {label} - P(fractured) = {_p(fracture.probability)} {'>=' if above else '<'} "
        f"threshold {_p(fracture.threshold)}"
    )
    probabilities = part.probabilities or {}
    probabilities_text = "Router probabilities: " + (
        ", ".join(f"{name} {_p(p)}" for name, p in sorted(probabilities.items(), key=lambda kv: -kv[1]))
        if probabilities
        else "not computed"
    )
    flags = (
        f"Flags: suspicious (high-sensitivity point): {_flag(fracture.suspicious, trained=model.trained)}; "
        f"definite (high-specificity point): {_flag(fracture.definite, trained=model.trained)}"
    )
    abstention = (
        f"ABSTAINED: {answer.abstention_reason or 'no reason given'} - do not use the label"
        if answer.abstained
        else "Abstained: no"
    )
    model_text = (
        f"Model: {model.name} {model.version} ({model.graph}, {model.precision}, "
        f"{'trained' if model.trained else 'untrained'})"
    )
    untrained = None if model.trained else UNTRAINED_BANNER
    head = [text for text in (untrained, abstention if answer.abstained else None) if text]
    lines = [*head, body, fracture_text, probabilities_text, flags, *([] if answer.abstained else [abstention])]
    return Summary(
        untrained=untrained,
        abstention=abstention,
        body_part=body,
        fracture=fracture_text,
        probabilities=probabilities_text,
        flags=flags,
        model=model_text,
        lines=[*lines, model_text],
    )


def summary_lines(answer: ImagePrediction) -> list[str]:
    """What a picture or a DICOM object carries as text: 'research use only', then the summary's sentences."""
    summary = answer.summary or summarise(answer)
    return ["RESEARCH USE ONLY - not a diagnosis", *summary.lines]


def study_part(manifest: Manifest, images: Sequence[ImagePrediction]) -> tuple[str, np.ndarray | None, PartSource]:
    """A study's body part: the one named by the client/DICOM when all its images agree, else the argmax of
    the summed router probabilities. Also the mean router probabilities, when every image has them."""
    named = {p.body_part.label for p in images if p.body_part.source != "router"}
    sources = {p.body_part.source for p in images}
    probs = [p.body_part.probabilities for p in images]
    mean = None
    if all(pr is not None for pr in probs):
        mean = np.mean([[pr[name] for name in manifest.body_parts] for pr in probs if pr is not None], axis=0)
    if len(named) == 1 and sources != {"router"} and "router" not in sources:
        source: PartSource = "client" if "client" in sources else "dicom"
        return next(iter(named)), mean, source
    if mean is None:  # a mix of named and routed images on a split graph: count what each image says
        labels = [p.body_part.label for p in images]
        return max(sorted(set(labels)), key=labels.count), None, "router"
    return manifest.body_parts[int(np.argmax(mean))], mean, "router"


def study_answer(
    manifest: Manifest,
    images: Sequence[ImagePrediction],
    part: str,
    mean_probs: np.ndarray | None,
    source: PartSource,
    p_fractured: Sequence[float],
    policy: AbstentionPolicy,
) -> StudyAnswer:
    """The study's answer from its images' P(fractured) under `part`'s specialist (MURA: their mean)."""
    p = float(np.mean(p_fractured))
    reason = None
    if all(image.abstention_reason and image.abstention_reason.startswith("not a radiograph") for image in images):
        reason = "not a radiograph: every image of the study is in colour"
    elif source == "router":
        reason = policy.reason(mean_probs, 0.0)
    return StudyAnswer(
        images=len(images),
        body_part=_body_part_answer(manifest, part, mean_probs, source),
        fracture=fracture_answer(manifest, part, p),
        abstained=reason is not None,
        abstention_reason=reason,
    )
