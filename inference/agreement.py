"""How far two models' answers agree on the same images: the one definition every check and benchmark uses.

The INT8 export gate, the fp32/INT8 bundle benchmark and the GPU benchmark's fp16 check all ask "would a
person read the same thing?": the same body part, and the same fracture call of that part's specialist at
the part's decision threshold (from the reference bundle's manifest, never a hard-coded 0.5). A router
flip is counted once (as a body-part disagreement), not again as a fracture disagreement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from inference.bundle import Thresholds
from inference.pipeline import ItemPrediction


@dataclass(frozen=True)
class Agreement:
    images: int
    body_part_agreement: float  # same body part
    fracture_agreement: float  # same part and the same fracture call at that part's decision threshold
    label_agreement: float  # both: the labels a person reads are the same (equals fracture_agreement)
    max_probability_diff: float  # over P(fractured) of the same part and the router's probabilities
    disagreeing_images: list[int]  # indices whose labels differ

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def label_agreement(
    reference: Sequence[ItemPrediction], other: Sequence[ItemPrediction], thresholds: Mapping[str, Thresholds]
) -> Agreement:
    """Agreement of `other` with `reference`, image by image (both in the same order)."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference answers for {len(other)} others")
    if not reference:
        raise ValueError("no images to compare")
    same_part = same_label = 0
    max_diff = 0.0
    disagreeing = []
    for index, (ref, alt) in enumerate(zip(reference, other, strict=True)):
        part_ok = ref.body_part == alt.body_part
        same_part += part_ok
        label_ok = False
        if part_ok:
            threshold = thresholds[ref.body_part].decision
            label_ok = (ref.p_fractured >= threshold) == (alt.p_fractured >= threshold)
            max_diff = max(max_diff, abs(ref.p_fractured - alt.p_fractured))
        if ref.body_part_probs is not None and alt.body_part_probs is not None:
            max_diff = max(max_diff, float(np.max(np.abs(ref.body_part_probs - alt.body_part_probs))))
        same_label += label_ok
        if not label_ok:
            disagreeing.append(index)
    count = len(reference)
    return Agreement(
        images=count,
        body_part_agreement=same_part / count,
        fracture_agreement=same_label / count,
        label_agreement=same_label / count,
        max_probability_diff=max_diff,
        disagreeing_images=disagreeing,
    )
