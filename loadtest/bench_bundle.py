"""Bundle throughput in-process: fp32 vs INT8 (or any bundles) in ONE run, plus their label agreement.

    python -m loadtest.bench_bundle --bundle models/demo --bundle models/demo-int8 --images tests/data/xray

Images are prepared once (decode is not timed here: this measures the graphs). Label agreement is the one
definition the export gate uses too (`inference.agreement`). Writes JSON and Markdown.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from inference.agreement import label_agreement
from inference.bundle import load_bundle
from inference.engine import Engine
from inference.pipeline import ItemPrediction, predict_batch
from loadtest.images import model_inputs


def measure(engine: Engine, images: np.ndarray, batch_size: int, seconds: float) -> float:
    """Images per second through predict_batch at one batch size, best of 3 windows."""
    batch = np.resize(images, (batch_size, *images.shape[1:]))
    predict_batch(engine, batch)  # warm-up
    rates = []
    for _ in range(3):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            predict_batch(engine, batch)
            done += batch_size
        rates.append(done / (time.perf_counter() - start))
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, action="append", required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=6.0, help="per bundle and batch size")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    args = parser.parse_args()

    bundles = [load_bundle(path) for path in args.bundle]
    images = model_inputs(args.images, bundles[0].manifest.input.resize)
    results: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[ItemPrediction]] = {}
    for bundle in bundles:
        engine = Engine(bundle, providers=["cpu"])
        rates = {b: measure(engine, images, b, args.seconds) for b in args.batch_sizes}
        answers[str(bundle.root)] = predict_batch(engine, images)
        results[str(bundle.root)] = {
            "precision": bundle.manifest.precision,
            "graph": bundle.manifest.graph.form,
            "images_per_second": rates,
            "answers": [(a.body_part, a.p_fractured) for a in answers[str(bundle.root)]],
        }
    base_key = str(bundles[0].root)
    base = results[base_key]
    lines = [
        "| bundle | precision | "
        + " | ".join(f"batch {b} img/s" for b in args.batch_sizes)
        + " | best vs first | label agreement vs first |",
        "|---" * (len(args.batch_sizes) + 4) + "|",
    ]
    for key, result in results.items():
        best = max(result["images_per_second"].values()) / max(base["images_per_second"].values())
        # The first bundle's thresholds decide "fractured" for both (inference.agreement: one definition).
        agreement = label_agreement(answers[base_key], answers[key], bundles[0].manifest.thresholds)
        same, max_diff = agreement.label_agreement, agreement.max_probability_diff
        result["speedup_vs_first"] = best
        result["agreement_vs_first"] = same
        result["max_p_fractured_diff_vs_first"] = max_diff
        cells = " | ".join(f"{result['images_per_second'][b]:.1f}" for b in args.batch_sizes)
        lines.append(f"| {key} | {result['precision']} | {cells} | {best:.2f}x | {same:.1%} (max ΔP {max_diff:.3f}) |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bundle_throughput.json").write_text(json.dumps(results, indent=2))
    table = "\n".join(lines)
    (args.out / "bundle_throughput.md").write_text(
        f"# Bundle throughput ({len(images)} images from {args.images})\n\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
