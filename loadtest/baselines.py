"""Baseline servers the load benchmark compares our service against, each runnable as its own process.

    python -m loadtest.baselines naive --bundle models/demo --port 8101
    python -m loadtest.baselines keras --bundle models/demo --port 8102
    python -m loadtest.baselines split-bundle --bundle models/demo --out loadtest/results/demo-split

This module owns the two strawmen, so that `loadtest.bench_load` measures what our batching service buys
against what people actually write, with everything but the inference style held equal: the same
`inference.preprocessing.prepare_image`, the same route (`POST /v1/predict`, multipart field `file`) and the
same answer fields (`predictions[0].body_part.label`, `predictions[0].fracture.probability`).

- naive: what a user writes by hand around the bundle's graphs: a plain sync FastAPI endpoint (FastAPI runs
  it in its threadpool), per request one router ONNX session run then the chosen specialist's ONNX session
  run (two backbone passes, the split graph form), onnxruntime's default session options, no batching
  (`--tuned`: the service's thread settings instead, to show what the defaults alone cost).
  A fused bundle has no separate router graph, so its split twin is exported once into loadtest/results/
  (`split-bundle`, needs TensorFlow) or an existing split bundle is reused (`--split-bundle`).
- keras: the original project's approach: Keras `model.predict` on the router, then `predict` on the chosen
  specialist, one image at a time, requests served one at a time (one worker, a lock around the work).
  The Keras models are `export.sources.demo_models(weights=None)`: untrained, which does not change speed,
  and the same seeded weights as a demo bundle, so their answers match the demo bundle's.

Neither baseline is production code: they exist to be measured. Like every answer of this project, theirs are
research use only and, for the untrained demo, meaningless.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, UploadFile

from inference.bundle import BundleError, Manifest, SplitGraph, load_bundle, read_manifest
from inference.preprocessing import ImageError, prepare_image

log = logging.getLogger("loadtest.baselines")

DEFAULT_RESULTS = Path("loadtest/results")
DISCLAIMER = "Research use only. Not a medical device and not a diagnosis. Baseline for load tests."


def default_split_dir(manifest: Manifest) -> Path:
    """Where the split twin of a fused bundle is written and looked for: loadtest/results/<name>-split."""
    return DEFAULT_RESULTS / f"{manifest.name}-split"


def resolve_split_bundle(bundle_path: Path, split_path: Path | None) -> Path | None:
    """The split bundle the naive baseline runs: the bundle itself when split, else the one given or found."""
    manifest = read_manifest(bundle_path)  # naive_app loads (and verifies) whichever bundle this names
    if isinstance(manifest.graph, SplitGraph):
        return bundle_path
    candidate = split_path or default_split_dir(manifest)
    if (candidate / "manifest.json").is_file():
        split = read_manifest(candidate)
        if not isinstance(split.graph, SplitGraph):
            raise BundleError(f"{candidate}: not a split bundle (graph form {split.graph.form})")
        if split.body_parts != manifest.body_parts:
            raise BundleError(f"{candidate}: body parts {split.body_parts} differ from {manifest.body_parts}")
        return candidate
    return None


def export_split_bundle(bundle_path: Path, out: Path) -> Path:
    """Export the split twin of a DEMO bundle (same seeded untrained models) with TensorFlow, once."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from export.build import ExportOptions, export_bundle
    from export.sources import demo_models

    manifest = read_manifest(bundle_path)
    if manifest.source.kind != "demo":
        raise BundleError(
            f"{bundle_path}: a {manifest.source.kind} bundle; its split twin cannot be rebuilt from here. Export "
            "one yourself (`bfd export --keras-dir RUN --graph split --out DIR`) and pass --split-bundle DIR"
        )
    weights = None if manifest.source.backbone_weights == "none" else manifest.source.backbone_weights
    model_set = demo_models(manifest.body_parts, weights)
    options = ExportOptions(name=f"{manifest.name}-split", graph="split", force=True)
    log.info("exporting the split twin of %s into %s (TensorFlow, a few minutes)", bundle_path, out)
    export_bundle(model_set, out, options)
    return out


def _read_upload(file: UploadFile, resize: str) -> np.ndarray:
    data = file.file.read()
    try:
        prepared = prepare_image(data, resize=resize)  # type: ignore[arg-type]
    except ImageError as error:
        raise HTTPException(422, error.reason) from error  # a naive endpoint does not tell kinds apart
    return prepared.pixels[None]


def _answer(
    name: str | None, parts: Sequence[str], probs: np.ndarray, p_fractured: float, threshold: float
) -> dict[str, Any]:
    index = int(np.argmax(probs))
    return {
        "predictions": [
            {
                "image_name": name,
                "body_part": {
                    "label": parts[index],
                    "probability": float(probs[index]),
                    "probabilities": {p: float(v) for p, v in zip(parts, probs, strict=True)},
                    "source": "router",
                },
                "fracture": {
                    "label": "fractured" if p_fractured >= threshold else "normal",
                    "probability": p_fractured,
                    "threshold": threshold,
                },
                "disclaimer": DISCLAIMER,
            }
        ]
    }


def naive_app(split_root: Path, *, tuned: bool = False) -> FastAPI:
    """Per request: router session, then the specialist's session; sync endpoint, no batching.

    Untuned (the default) is what a hand-written server does: onnxruntime's default session options, i.e. each
    session its own pool of intra-op threads that keep spinning after a run, so the router's threads still
    burn the cores while the specialist runs. `tuned` gives every session the service's thread settings
    (intra-op threads = cores, no spinning): the same two passes and no batching, without that contention.
    """
    import onnxruntime as ort

    bundle = load_bundle(split_root)
    manifest = bundle.manifest
    graph = manifest.graph
    assert isinstance(graph, SplitGraph)
    parts = list(manifest.body_parts)
    options = ort.SessionOptions()
    if tuned:
        options.intra_op_num_threads = len(os.sched_getaffinity(0))
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]

    def open_session(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(bundle.path(name)), sess_options=options, providers=providers)

    router = open_session(graph.router)
    specialists = {p: open_session(graph.specialists[p]) for p in parts}
    zeros = np.zeros((1, 224, 224, 3), dtype=np.uint8)
    for session in [router, *specialists.values()]:  # first runs allocate; not what we measure
        session.run(None, {manifest.input.name: zeros})
    app = FastAPI(title="naive ONNX baseline")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        baseline = "naive-tuned" if tuned else "naive"
        return {"status": "ok", "baseline": baseline, "onnxruntime": ort.__version__, "bundle": str(split_root)}

    @app.post("/v1/predict")
    def predict(file: UploadFile) -> dict[str, Any]:
        images = _read_upload(file, manifest.input.resize)
        feed = {manifest.input.name: images}
        probs = router.run([graph.body_part_probs], feed)[0][0]
        part = parts[int(np.argmax(probs))]
        p_fractured = float(specialists[part].run([graph.p_fractured], feed)[0][0, 0])
        return _answer(file.filename, parts, probs, p_fractured, manifest.thresholds[part].decision)

    return app


def keras_app(parts: Sequence[str], thresholds: dict[str, float], resize: str) -> FastAPI:
    """The original style: Keras predict on the router, then on the specialist, one request at a time."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from export.sources import demo_models

    model_set = demo_models(parts, weights=None)
    ordered = model_set.parts
    zeros = np.zeros((1, 224, 224, 3), dtype=np.uint8)
    for model in model_set.models().values():  # trace each predict function once before serving
        model.predict(zeros, verbose=0)
    one_at_a_time = threading.Lock()
    app = FastAPI(title="original-style Keras baseline")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "baseline": "keras", "keras": keras.__version__}

    @app.post("/v1/predict")
    def predict(file: UploadFile) -> dict[str, Any]:
        with one_at_a_time:
            images = _read_upload(file, resize)
            probs = model_set.router.predict(images, verbose=0)[0]
            part = ordered[int(np.argmax(probs))]
            p_fractured = float(model_set.specialists[part].predict(images, verbose=0)[0, 0])
        return _answer(file.filename, ordered, probs, p_fractured, thresholds.get(part, 0.5))

    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    naive = commands.add_parser("naive", help="router ONNX session then specialist session, per request")
    naive.add_argument("--bundle", type=Path, default=Path("models/demo"))
    naive.add_argument("--split-bundle", type=Path, help="split bundle to run (default: loadtest/results/<name>-split)")
    naive.add_argument("--tuned", action="store_true", help="the service's onnxruntime thread settings (no spinning)")
    keras_cmd = commands.add_parser("keras", help="Keras predict on router then specialist, one request at a time")
    keras_cmd.add_argument("--bundle", type=Path, help="take body parts, thresholds and resize from this bundle")
    split = commands.add_parser("split-bundle", help="export the split twin of a demo bundle (TensorFlow)")
    split.add_argument("--bundle", type=Path, default=Path("models/demo"))
    split.add_argument("--out", type=Path, help="default: loadtest/results/<name>-split")
    for sub in (naive, keras_cmd):
        sub.add_argument("--host", default="127.0.0.1")
        sub.add_argument("--port", type=int, default=8100)
        sub.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "split-bundle":
            found = resolve_split_bundle(args.bundle, args.out)
            out = found or export_split_bundle(args.bundle, args.out or default_split_dir(read_manifest(args.bundle)))
            print(out)
            return 0
        if args.command == "naive":
            split_root = resolve_split_bundle(args.bundle, args.split_bundle)
            if split_root is None:
                target = args.split_bundle or default_split_dir(read_manifest(args.bundle))
                split_root = export_split_bundle(args.bundle, target)
            app = naive_app(split_root, tuned=args.tuned)
        else:
            parts: Sequence[str] = ("elbow", "hand", "shoulder")
            thresholds: dict[str, float] = {}
            resize = "bilinear"
            if args.bundle is not None:
                manifest = read_manifest(args.bundle)
                parts = manifest.body_parts
                thresholds = {p: t.decision for p, t in manifest.thresholds.items()}
                resize = manifest.input.resize
            app = keras_app(parts, thresholds, resize)
    except BundleError as error:
        log.error("%s", error)
        return 2
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
