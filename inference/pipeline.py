"""Routing then specialist, on top of the engine: one function from a batch of images to answers.

Fused bundle: one graph run answers everything (backbone once). Split bundle: the router runs on the images
that carry no body-part hint, then images are grouped by part and each group runs through its specialist
as one batch. The batcher calls `predict_batch` with whatever it gathered; evaluation and the INT8 agreement
check call it too, so they measure the code that serves.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from inference.engine import Engine


@dataclass(frozen=True)
class ItemPrediction:
    """The models' answer for one image."""

    body_part: str
    body_part_from_hint: bool
    body_part_probs: np.ndarray | None  # (P,) router probabilities; None when a hint skipped the split router
    p_fractured: float
    feature_map: np.ndarray | None  # (7, 7, 2048) when asked for
    # P(fractured) under every part's specialist, when one pass computed them all (a fused graph): a study
    # whose part is another than this image's reads it here instead of running the image again.
    p_fractured_by_part: Mapping[str, float] | None = None


def predict_batch(
    engine: Engine,
    images: np.ndarray,
    hints: Sequence[str | None] | None = None,
    want_feature_map: Sequence[bool] | None = None,
    route_hinted: Sequence[bool] | None = None,
) -> list[ItemPrediction]:
    """(N, 224, 224, 3) uint8 -> one ItemPrediction per image, in order.

    `route_hinted[i]` runs the router for image i even though it has a hint (a DICOM body part the answer
    checks against the router); a fused graph always has the router's answer anyway.
    """
    count = len(images)
    hints = list(hints) if hints is not None else [None] * count
    wants = list(want_feature_map) if want_feature_map is not None else [False] * count
    routes = list(route_hinted) if route_hinted is not None else [False] * count
    if len(hints) != count or len(wants) != count or len(routes) != count:
        raise ValueError(
            f"got {count} images, {len(hints)} hints, {len(wants)} feature-map flags and {len(routes)} route flags"
        )
    unknown = {h for h in hints if h is not None and h not in engine.body_parts}
    if unknown:
        raise ValueError(f"unknown body part hints {sorted(unknown)}; this bundle knows {engine.body_parts}")
    if engine.fused:
        return _predict_fused(engine, images, hints, wants)
    return _predict_split(engine, images, hints, wants, routes)


def _predict_fused(
    engine: Engine, images: np.ndarray, hints: list[str | None], wants: list[bool]
) -> list[ItemPrediction]:
    outputs = engine.run_fused(images, feature_map=any(wants))
    results = []
    for i, hint in enumerate(hints):
        part_index = engine.body_parts.index(hint) if hint else int(np.argmax(outputs.body_part_probs[i]))
        results.append(
            ItemPrediction(
                body_part=engine.body_parts[part_index],
                body_part_from_hint=hint is not None,
                body_part_probs=outputs.body_part_probs[i],
                p_fractured=float(outputs.p_fractured[i, part_index]),
                feature_map=outputs.feature_map[i] if wants[i] and outputs.feature_map is not None else None,
                p_fractured_by_part={
                    part: float(outputs.p_fractured[i, j]) for j, part in enumerate(engine.body_parts)
                },
            )
        )
    return results


def _predict_split(
    engine: Engine, images: np.ndarray, hints: list[str | None], wants: list[bool], routes: list[bool]
) -> list[ItemPrediction]:
    parts: list[str] = [h or "" for h in hints]
    probs: list[np.ndarray | None] = [None] * len(images)
    to_route = [i for i, hint in enumerate(hints) if hint is None or routes[i]]
    if to_route:
        routed = engine.run_router(images[to_route])
        for row, i in enumerate(to_route):
            probs[i] = routed[row]
            if hints[i] is None:
                parts[i] = engine.body_parts[int(np.argmax(routed[row]))]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, part in enumerate(parts):
        groups[part].append(i)
    p_fractured = np.zeros(len(images), dtype=np.float32)
    feature_maps: list[np.ndarray | None] = [None] * len(images)
    for part, members in groups.items():
        want_maps = any(wants[i] for i in members)
        p, maps = engine.run_specialist(part, images[members], feature_map=want_maps)
        p_fractured[members] = p
        if maps is not None:
            for row, i in enumerate(members):
                feature_maps[i] = maps[row] if wants[i] else None
    return [
        ItemPrediction(
            body_part=parts[i],
            body_part_from_hint=hints[i] is not None,
            body_part_probs=probs[i],
            p_fractured=float(p_fractured[i]),
            feature_map=feature_maps[i],
        )
        for i in range(len(images))
    ]
