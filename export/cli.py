"""`bfd export`: Keras models (a training run, the original H5 files, or a demo) -> verified ONNX bundle."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--keras-dir", type=Path, help="a `bfd train` run, or the original project's H5 files")
    source.add_argument("--demo", action="store_true", help="untrained heads (never a result: trained=false)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write, e.g. models/demo")
    parser.add_argument("--weights", default="none", help="demo backbone: 'none', 'imagenet' or a weights file")
    parser.add_argument("--parts", nargs="+", default=["elbow", "hand", "shoulder"], help="demo body parts")
    parser.add_argument("--name", help="bundle name (default: the folder's name)")
    parser.add_argument("--version", help="bundle version (default: date + graph hash)")
    parser.add_argument(
        "--graph",
        choices=["auto", "fused", "split"],
        default="auto",
        help="auto: fused when all backbones are identical, else split",
    )
    parser.add_argument("--verify-images", type=int, default=8, help="random images for the ONNX check (>= 8)")
    parser.add_argument("--int8", action="store_true", help="static INT8 quantization (needs --calibration)")
    parser.add_argument("--calibration", type=Path, help="folder of PNG/JPEG radiographs for INT8 calibration")
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=0.99,
        help="refuse an INT8 bundle whose label agreement with fp32 is under this",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    trained = parser.add_mutually_exclusive_group()
    trained.add_argument(
        "--trained",
        dest="trained",
        action="store_true",
        default=None,
        help="mark the heads as trained on real data",
    )
    trained.add_argument(
        "--untrained",
        dest="trained",
        action="store_false",
        help="mark the heads as untrained (e.g. test fixtures in the original file names)",
    )


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from export.build import ExportError, ExportOptions, export_bundle
    from export.graphs import VerificationError
    from export.sources import SourceError, demo_models, load_keras_dir
    from training.architecture import WeightsUnavailableError

    try:
        if args.demo:
            if args.trained:
                raise SourceError("--demo heads are untrained; --trained cannot apply")
            weights = None if args.weights == "none" else args.weights
            model_set = demo_models(args.parts, weights)
        else:
            model_set = load_keras_dir(args.keras_dir, trained=args.trained)
        options = ExportOptions(
            name=args.name or args.out.name,
            version=args.version,
            graph=args.graph,
            verify_images=args.verify_images,
            int8=args.int8,
            calibration_dir=args.calibration,
            min_agreement=args.min_agreement,
            force=args.force,
        )
        manifest = export_bundle(model_set, args.out, options)
    except (ExportError, SourceError, VerificationError, WeightsUnavailableError) as error:
        log.error("export failed: %s", error)
        return 2
    print(
        f"bundle written to {args.out} ({manifest.graph.form} graph, {manifest.precision}, "
        f"trained={str(manifest.trained).lower()}, "
        f"verified max abs diff {manifest.verification.max_abs_diff:.2e})"
    )
    if not manifest.trained:
        print("WARNING: untrained heads: this bundle's answers are meaningless and must never be presented as results.")
    return 0
