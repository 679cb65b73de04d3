"""`bfd predict IMAGE...`: in-process on a bundle, or against a running server; one JSON line per image."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--bundle", type=Path, default=Path("models/demo"), help="run in-process on this bundle")
    target.add_argument("--url", help="post to this server instead, e.g. http://127.0.0.1:8000")
    parser.add_argument("--body-part", help="skip the router: the body part is known")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--api-key", help="with --url, for a server that requires one (default: $BFD_API_KEY)")


def run(args: argparse.Namespace) -> int:
    return _remote(args) if args.url else _local(args)


def _print_error(name: str, status: int, detail: str) -> None:
    print(json.dumps({"image_name": name, "error": {"status": status, "detail": detail}}))


def _remote(args: argparse.Namespace) -> int:
    import httpx

    from clients.http import reason_of

    failures = 0
    key = args.api_key or os.environ.get("BFD_API_KEY")
    headers = {"X-API-Key": key} if key else {}
    with httpx.Client(base_url=args.url, timeout=args.timeout_s, headers=headers) as client:
        for path in args.images:
            params = {"body_part": args.body_part} if args.body_part else {}
            try:
                response = client.post("/v1/predict", files={"file": (path.name, path.read_bytes())}, params=params)
            except (OSError, httpx.HTTPError) as error:
                _print_error(path.name, 0, str(error))
                failures += 1
                continue
            if response.status_code != 200:
                _print_error(path.name, response.status_code, reason_of(response))
                failures += 1
                continue
            for prediction in response.json()["predictions"]:
                print(json.dumps(prediction))
    return 1 if failures else 0


def _local(args: argparse.Namespace) -> int:
    """The core's Predictor in this process (no server): an image it refuses is reported with status 0 (no HTTP
    answer) and the core's reason."""
    from inference.batching import BatcherClosedError, QueueFullError
    from inference.bundle import BundleError
    from inference.errors import InferenceError
    from inference.runner import LocalPredictor

    try:
        predictor = LocalPredictor(args.bundle)
    except BundleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failures = 0
    with predictor:
        for path in args.images:
            try:
                data = path.read_bytes()
                prediction = predictor.predict(
                    data, path.name, body_part=args.body_part, dicom=path.suffix.lower() == ".dcm"
                )
            except OSError as error:
                _print_error(path.name, 0, str(error))
                failures += 1
                continue
            except (InferenceError, QueueFullError, BatcherClosedError) as error:
                _print_error(path.name, 0, getattr(error, "reason", str(error)))
                failures += 1
                continue
            print(prediction.model_dump_json())
    return 1 if failures else 0
