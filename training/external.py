"""External validation of a bundle on FracAtlas: per-region clinical metrics, abstention out of scope, localisation.

`bfd evaluate --data <FracAtlas>` lands here. The ONNX bundle runs through the service's own code: images are
prepared by `inference.preprocessing`, answered by `inference.pipeline.predict_batch`, turned into the answer a
person reads (abstention included) by `inference.answers.image_prediction` under the bundle's
`AbstentionPolicy`, and explained by `inference.heatmap.grad_cam`, exactly as with `heatmap=true`.

Each image runs routed (the product's answer: which part the router chose, whether it abstained). Images of
a region the bundle covers (REGION_MAP: FracAtlas region -> bundle part) also run with that part named, as a
client would name it, so each specialist is judged on its own region (unless the router already chose that
part: the answer is the same); fractured ones with boxes fetch the feature map for Grad-CAM. Images of the
other regions (leg and hip for MURA's parts) are out of scope: there the service should abstain, and each
answer it gives instead is a failure of abstention.

FracAtlas has no patient ids, so bootstrap intervals resample images. Unless a split file is given, every
image is used: the whole dataset is an external test set, not a split of it.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from inference.answers import AbstentionPolicy, image_prediction
from inference.bundle import Manifest, load_bundle
from inference.engine import Engine
from inference.heatmap import HeadBank, grad_cam
from inference.pipeline import predict_batch
from inference.preprocessing import ImageError, PreparedImage, prepare_image, prepare_image_file
from inference.results import Timings
from training import localisation, metrics
from training.evaluate_options import EvaluateOptions, EvaluationError
from training.evaluation_report import UNTRAINED_REPORT_WARNING, bundle_facts
from training.external_report import Example, ExternalItem, write_figures, write_markdown
from training.fracatlas import (
    MIXED,
    REGIONS,
    SPLIT_UNIT_NOTE,
    Box,
    FracAtlasData,
    FracAtlasImage,
    read_fracatlas,
)
from training.splits import read_split_file

log = logging.getLogger(__name__)

KIND = "external_validation_fracatlas"
# FracAtlas region -> the bundle part that covers it, used where the bundle has that part. MURA's parts give
# hand -> hand and shoulder -> shoulder; a bundle trained on FracAtlas covers all four regions.
REGION_MAP = {"hand": "hand", "leg": "leg", "hip": "hip", "shoulder": "shoulder"}
EXAMPLE_MAX_SIDE = 512  # the service's default heatmap overlay size
LABEL_NOTE = (
    "FracAtlas's positive label is 'fracture' (annotated fractures, with boxes); MURA's is 'abnormal' (fracture, "
    "hardware, degenerative disease, lesions, ...). A bundle trained on MURA detects abnormality, so on FracAtlas "
    "a film with hardware but no fracture counts against its specificity."
)
REGION_NOTE = (
    "FracAtlas regions are coarse: 'hand' covers hand, wrist, forearm and some elbow views; 'leg' foot to knee; "
    "'hip' pelvis and femur; 'shoulder' is often a wide chest-and-shoulder film. A region mapped to a part is "
    "therefore a wider population than that part's training images."
)
TEST_SET_NOTE = (
    "External test set: every image of the dataset (mixed films aside unless kept), not a split of it; nothing "
    "of FracAtlas was used to train or tune a MURA bundle."
)
BOOTSTRAP_NOTE = "FracAtlas has no patient ids: bootstrap intervals resample images, not patients."


def parse_region_map(pairs: Sequence[str]) -> dict[str, str]:
    """`["hand=hand", "shoulder=shoulder"]` -> {"hand": "hand", "shoulder": "shoulder"}; EvaluationError if bad."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        region, sep, part = (text.strip().lower() for text in pair.partition("="))
        if not sep or not region or not part:
            raise EvaluationError(f"--region-map takes REGION=PART pairs like hand=hand, got {pair!r}")
        if region not in REGIONS:
            raise EvaluationError(f"--region-map: {region!r} is not a FracAtlas region; use {', '.join(REGIONS)}")
        if region in mapping:
            raise EvaluationError(f"--region-map: region {region!r} is mapped twice")
        mapping[region] = part
    return mapping


def resolve_region_map(body_parts: Sequence[str], override: Mapping[str, str] | None = None) -> dict[str, str]:
    """Region -> part for this bundle: the override as given (checked), else REGION_MAP where the bundle has the part.

    An override replaces the table: regions it does not name are out of scope.
    """
    if override is not None:
        unknown = {region: part for region, part in override.items() if part not in body_parts}
        if unknown:
            raise EvaluationError(
                f"--region-map names part(s) the bundle does not have: {unknown}; its parts are {list(body_parts)}"
            )
        bad = [region for region in override if region not in REGIONS]
        if bad:
            raise EvaluationError(f"not FracAtlas region(s): {bad}; use {', '.join(REGIONS)}")
        return dict(override)
    return {region: part for region, part in REGION_MAP.items() if part in body_parts}


def evaluate_external(options: EvaluateOptions) -> tuple[dict[str, Any], list[Path]]:
    """Run the bundle on FracAtlas and write report.json, report.md and figures into `options.out`."""
    data = read_fracatlas(options.data, keep_mixed=options.keep_mixed)
    images, subset = _chosen_images(data, options.split_file)
    bundle = load_bundle(options.bundle)
    manifest = bundle.manifest
    region_map = resolve_region_map(manifest.body_parts, options.region_map)
    out_of_scope = [region for region in REGIONS if region not in region_map]
    log.info("region map %s; out of scope: %s", region_map or "{}", ", ".join(out_of_scope) or "none")
    engine = Engine(bundle, providers=options.providers)
    heads = HeadBank.load(bundle.path(manifest.heads_file))
    policy = AbstentionPolicy.resolve(manifest, None, None)
    started = time.perf_counter()
    items, skipped = run_external(
        engine, manifest, heads, policy, images, region_map, batch_size=options.batch_size, progress=options.progress
    )
    wall_s = time.perf_counter() - started
    if not items:
        raise EvaluationError(f"{data.root}: no readable image ({len(skipped)} skipped)")
    report = build_external_report(
        manifest, items, region_map, policy=policy, n_resamples=options.n_resamples, seed=options.seed
    )
    report["data"] = {
        "path": str(options.data),
        "root": str(data.root),
        "images": subset,
        "listed_in_csv": data.listed,
        "evaluated": len(items),
        "mixed_left_out": _combos(data.mixed_left_out),
        "mixed_kept": options.keep_mixed,
        "skipped_images": skipped,
        "problems": data.problems,
    }
    report["timing"] = {"wall_s": round(wall_s, 1), "images_per_s": round(len(items) / wall_s, 1) if wall_s else None}
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    examples = _examples(items, options.examples, manifest.input.resize)
    figures = write_figures(report, items, examples, out)
    write_markdown(report, figures, out / "report.md")
    return report, [out / "report.json", out / "report.md", *figures]


def _chosen_images(data: FracAtlasData, split_file: Path | None) -> tuple[list[FracAtlasImage], str]:
    if split_file is None:
        return data.images, TEST_SET_NOTE
    records, splits = read_split_file(split_file, data.root)
    test = {record.relative_path for record, split in zip(records, splits, strict=True) if split == "test"}
    chosen = [image for image in data.images if image.relative_path in test]
    if not chosen:
        raise EvaluationError(f"{split_file}: its test split holds no image of {data.root}")
    return chosen, f"the test split of {split_file} ({len(chosen)} images). {SPLIT_UNIT_NOTE}"


def _prepare(image: FracAtlasImage, resize: Any) -> PreparedImage | str:
    try:
        return prepare_image_file(image.path, resize=resize)
    except ImageError as error:
        return error.reason
    except OSError as error:
        return f"cannot be read: {error.strerror or error}"


def run_external(
    engine: Engine,
    manifest: Manifest,
    heads: HeadBank,
    policy: AbstentionPolicy,
    images: Sequence[FracAtlasImage],
    region_map: Mapping[str, str],
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[list[ExternalItem], dict[str, str]]:
    """Every readable image through the pipeline, in batches; unreadable ones are skipped and listed."""
    items: list[ExternalItem] = []
    skipped: dict[str, str] = {}
    with (
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode") as pool,
        tqdm(total=len(images), desc="evaluate", unit="img", disable=not progress) as bar,
    ):
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            decode_start = time.perf_counter()
            prepared = list(pool.map(lambda image: _prepare(image, manifest.input.resize), chunk))
            decode_ms = (time.perf_counter() - decode_start) * 1000 / len(chunk)
            good = [(i, p) for i, p in zip(chunk, prepared, strict=True) if isinstance(p, PreparedImage)]
            skipped.update({i.relative_path: p for i, p in zip(chunk, prepared, strict=True) if isinstance(p, str)})
            if good:
                items.extend(_run_batch(engine, manifest, heads, policy, good, region_map, decode_ms))
            bar.update(len(chunk))
    for path, reason in skipped.items():
        log.warning("skipped %s: %s", path, reason)
    return items, skipped


def _run_batch(
    engine: Engine,
    manifest: Manifest,
    heads: HeadBank,
    policy: AbstentionPolicy,
    good: list[tuple[FracAtlasImage, PreparedImage]],
    region_map: Mapping[str, str],
    decode_ms: float,
) -> list[ExternalItem]:
    pixels = np.stack([prepared.pixels for _, prepared in good])
    started = time.perf_counter()
    routed = predict_batch(engine, pixels)
    # Only fractured images with boxes need the feature map (Grad-CAM); an image the router already sent to its
    # mapped part and that needs no map has its answer: running it again would give the same numbers.
    wants = {k: image.label == 1 and bool(image.boxes) for k, (image, _) in enumerate(good)}
    hinted: dict[int, Any] = {
        k: routed[k]
        for k, (image, _) in enumerate(good)
        if image.region in region_map and routed[k].body_part == region_map[image.region] and not wants[k]
    }
    rerun = [k for k, (image, _) in enumerate(good) if image.region in region_map and k not in hinted]
    if rerun:
        answers = predict_batch(
            engine,
            pixels[rerun],
            hints=[region_map[good[k][0].region] for k in rerun],
            want_feature_map=[wants[k] for k in rerun],
        )
        hinted.update(zip(rerun, answers, strict=True))
    inference_ms = (time.perf_counter() - started) * 1000 / len(good)
    timings = Timings(
        decode_ms=decode_ms,
        queue_ms=0.0,
        inference_ms=inference_ms,
        total_ms=decode_ms + inference_ms,
        batch_size=len(good),
    )
    items = []
    for k, ((image, prepared), prediction) in enumerate(zip(good, routed, strict=True)):
        answer = image_prediction(
            manifest, prediction, image.relative_path, timings, policy=policy, colourfulness=prepared.colourfulness
        )
        width, height = prepared.original_width, prepared.original_height
        boxes = _boxes_in_display_frame(image, width, height)
        cam = case = None
        by_part = hinted.get(k)
        if by_part is not None and by_part.feature_map is not None:
            cam = grad_cam(by_part.feature_map, heads.specialist(by_part.body_part))
            case = localisation.localise(cam, boxes, width, height)
        probs = prediction.body_part_probs
        assert probs is not None  # no hint: the router always ran
        items.append(
            ExternalItem(
                image=image,
                width=width,
                height=height,
                router_probs=np.asarray(probs, dtype=np.float64),
                routed_part=prediction.body_part,
                abstained=answer.abstained,
                abstention_reason=answer.abstention_reason,
                answer_label=answer.fracture.label,
                p_routed=prediction.p_fractured,
                p_mapped=None if by_part is None else by_part.p_fractured,
                cam=cam,
                localisation=case,
            )
        )
    return items


def _boxes_in_display_frame(image: FracAtlasImage, width: int, height: int) -> list[Box]:
    """The boxes in the frame of the image as decoded; rescaled (and logged) if the annotation says another size."""
    if image.annotation_size is None or image.annotation_size == (width, height):
        return list(image.boxes)
    ann_w, ann_h = image.annotation_size
    log.warning(
        "%s: annotation size %dx%d but the image displays %dx%d; boxes rescaled",
        image.relative_path,
        ann_w,
        ann_h,
        width,
        height,
    )
    sx, sy = width / ann_w, height / ann_h
    return [Box(b.x_min * sx, b.y_min * sy, b.x_max * sx, b.y_max * sy) for b in image.boxes]


# ---------------------------------------------------------------------------------------------------- report


def build_external_report(
    manifest: Manifest,
    items: Sequence[ExternalItem],
    region_map: Mapping[str, str],
    *,
    policy: AbstentionPolicy,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every figure of the external validation, JSON-ready, from the items (no model needed: testable)."""
    per_region: dict[str, Any] = {}
    for region, part in region_map.items():
        mine = [item for item in items if item.image.region == region]
        per_region[region] = _region_block(manifest, part, mine, n_resamples, seed)
    out_regions = [region for region in REGIONS if region not in region_map]
    outside = [item for item in items if item.image.region in out_regions]
    located = [item for item in items if item.localisation is not None]
    report: dict[str, Any] = {
        "kind": KIND,
        "bundle": {**bundle_facts(manifest), "body_parts": manifest.body_parts},
        "warnings": [] if manifest.trained else [UNTRAINED_REPORT_WARNING],
        "notes": {"label": LABEL_NOTE, "regions": REGION_NOTE, "test_set": TEST_SET_NOTE, "bootstrap": BOOTSTRAP_NOTE},
        "intervals": {
            "proportions": "Wilson score 95%",
            "auroc_kappa": f"image-level bootstrap 95% percentile ({n_resamples} resamples, seed {seed})",
        },
        "abstention_policy": {
            "min_router_probability": policy.min_router_probability,
            "max_colourfulness": policy.max_colourfulness,
        },
        "region_map": dict(region_map),
        "images_per_region": dict(sorted(Counter(item.image.region for item in items).items())),
        "per_region": per_region,
        "out_of_scope": {"regions": out_regions, **_abstention_block(outside)},
        "localisation": _localisation_block(located, region_map, items, n_resamples, seed),
    }
    report["out_of_scope"]["per_region"] = {
        region: _abstention_block([item for item in outside if item.image.region == region]) for region in out_regions
    }
    mixed = [item for item in items if item.image.region == MIXED]
    if mixed:
        report["mixed"] = {
            "note": "films of several regions: neither scored as in scope nor counted as out of scope",
            **_abstention_block(mixed),
        }
    return report


def _region_block(
    manifest: Manifest, part: str, items: Sequence[ExternalItem], n_resamples: int, seed: int
) -> dict[str, Any]:
    """One mapped region: the part's specialist on it (part named), and what the routed product answered."""
    if not items:
        return {"part": part, "images": 0, "note": "no image of this region"}
    labels = np.asarray([item.image.label for item in items], dtype=np.int64)
    scores = np.asarray([item.p_mapped for item in items], dtype=np.float64)
    thresholds = manifest.thresholds[part]
    level = metrics.level_metrics(
        labels, scores, [item.image.image_id for item in items], thresholds, n_resamples, seed
    )
    for name in ("auroc", "kappa"):  # binary_report names its groups patients; here they are images
        level[name]["method"] = str(level[name]["method"]).replace("patient", "image")
    answered = [item for item in items if not item.abstained]
    fractured = [item for item in answered if item.image.label == 1]
    normal = [item for item in answered if item.image.label == 0]
    return {
        "part": part,
        "images": len(items),
        "fractured": int(labels.sum()),
        "hardware": sum(item.image.hardware for item in items),
        "thresholds": thresholds.model_dump(),
        "specialist": level,
        "routing": {
            "routed_to_part": metrics.proportion(sum(item.routed_part == part for item in items), len(items)).as_dict(),
            "abstained": metrics.proportion(len(items) - len(answered), len(items)).as_dict(),
            "router_choice": _choices(items),
        },
        "end_to_end": {
            "rule": "the routed answer as the service gives it; abstentions are not answers",
            "answered": len(answered),
            "answered_by_another_part": sum(item.routed_part != part for item in answered),
            "sensitivity": metrics.proportion(
                sum(item.answer_label == "fractured" for item in fractured), len(fractured)
            ).as_dict(),
            "specificity": metrics.proportion(
                sum(item.answer_label == "normal" for item in normal), len(normal)
            ).as_dict(),
        },
    }


def _abstention_block(items: Sequence[ExternalItem]) -> dict[str, Any]:
    """How often the service abstained on these images, why, and which part the router chose."""
    answered = [item for item in items if not item.abstained]
    reasons = Counter(_reason_kind(item.abstention_reason) for item in items if item.abstained)
    return {
        "images": len(items),
        "abstained": metrics.proportion(len(items) - len(answered), len(items)).as_dict(),
        "answered": metrics.proportion(len(answered), len(items)).as_dict(),
        "answered_fractured": sum(item.answer_label == "fractured" for item in answered),
        "abstention_reasons": dict(sorted(reasons.items())),
        "router_choice": _choices(items),
        "router_choice_when_answered": _choices(answered),
    }


def _reason_kind(reason: str | None) -> str:
    text = reason or ""
    if text.startswith("not a radiograph"):
        return "colour image"
    if text.startswith("the router is unsure"):
        return "router unsure of the body part"
    return "other"


def _choices(items: Sequence[ExternalItem]) -> dict[str, int]:
    return dict(sorted(Counter(item.routed_part for item in items).items()))


def _localisation_block(
    located: Sequence[ExternalItem],
    region_map: Mapping[str, str],
    items: Sequence[ExternalItem],
    n_resamples: int,
    seed: int,
) -> dict[str, Any]:
    cases = [item.localisation for item in located if item.localisation is not None]
    without_boxes = sum(
        1 for item in items if item.image.region in region_map and item.image.label == 1 and not item.image.boxes
    )
    return {
        "method": (
            "Grad-CAM (inference.heatmap.grad_cam) of the mapped part's specialist, the part named as a client names "
            "it with heatmap=true; its maximum (centre of the highest of the 7x7 cells, mapped through the "
            "stretch-to-224 resize back to the displayed image, EXIF orientation applied) must fall inside a "
            "fracture box; energy is the share of the bilinearly stretched map inside the boxes (mean over maps "
            "not zero everywhere)"
        ),
        "baselines": (
            "centre: a Gaussian peaked at the image centre (sigma a quarter of each side); random pointer: the "
            "share of the image the boxes cover"
        ),
        "fractured_without_boxes": without_boxes,
        "overall": localisation.summarise(cases, n_resamples=n_resamples, seed=seed),
        "per_region": {
            region: localisation.summarise(
                [item.localisation for item in located if item.image.region == region and item.localisation],
                n_resamples=n_resamples,
                seed=seed,
            )
            for region in region_map
        },
        "images": [
            {
                "image_id": item.image.image_id,
                "region": item.image.region,
                "width": item.width,
                "height": item.height,
                "boxes": len(item.image.boxes),
                **localisation.as_dict(item.localisation),
            }
            for item in located
            if item.localisation is not None
        ],
    }


def _combos(images: Sequence[FracAtlasImage]) -> dict[str, Any]:
    combos = Counter("+".join(image.regions) for image in images)
    return {"images": len(images), "by_regions": dict(sorted(combos.items()))}


def _examples(items: Sequence[ExternalItem], count: int, resize: Any) -> list[Example]:
    """Up to `count` located images, half hits and half misses where possible, in image-id order."""
    located = sorted((i for i in items if i.localisation is not None), key=lambda i: i.image.image_id)
    hits = [i for i in located if i.localisation and i.localisation.hit]
    misses = [i for i in located if i.localisation and not i.localisation.hit]
    chosen = hits[: count // 2] + misses[: count - count // 2]
    chosen += [i for i in located if i not in chosen][: count - len(chosen)]
    examples = []
    for item in sorted(chosen, key=lambda i: i.image.image_id):
        try:
            prepared = prepare_image(item.image.path.read_bytes(), resize=resize, display_max_side=EXAMPLE_MAX_SIDE)
        except (ImageError, OSError) as error:  # it decoded a moment ago; a file changing under us is not fatal
            log.warning("example %s not drawn: %s", item.image.relative_path, error)
            continue
        if prepared.display is not None:
            examples.append(Example(item=item, display=prepared.display))
    return examples
