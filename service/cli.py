"""`bfd serve`: the FastAPI app under uvicorn, one process (one batcher gets the biggest batches), with the DICOM
node in the same process when a DICOM destination is set (it shares the batcher).

Settings are checked before the bundle loads: a bad one stops it with exit 2 and a line per problem naming the
setting's environment variable, never with a traceback after a long start.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from pydantic import ValidationError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, help="bundle folder (env BFD_BUNDLE; default models/demo)")
    parser.add_argument("--host", help="bind address (env BFD_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (env BFD_PORT; default 8000)")
    parser.add_argument("--providers", help="comma-separated: auto, cuda, tensorrt, cpu (env BFD_PROVIDERS)")
    parser.add_argument("--max-batch-size", type=int)
    parser.add_argument("--max-queue-size", type=int)
    parser.add_argument("--max-wait-ms", type=float)
    parser.add_argument("--intra-op-threads", type=int)
    parser.add_argument("--decode-threads", type=int)
    parser.add_argument("--dicom-port", type=int, help="DICOM storage SCP port (env BFD_DICOM_PORT; default off)")
    parser.add_argument(
        "--dicom-destination",
        help="where DICOM results go: AETITLE@host:port or a DICOMweb URL (BFD_DICOM_DESTINATION)",
    )


def run(args: argparse.Namespace) -> int:
    from inference.bundle import BundleError, load_bundle
    from service.http_server import serve
    from service.main import create_app
    from service.settings import Settings
    from service.startup_checks import check_environment, problem_lines, unknown_variables

    overrides = {
        key: value
        for key in (
            "bundle",
            "host",
            "port",
            "providers",
            "max_batch_size",
            "max_queue_size",
            "max_wait_ms",
            "intra_op_threads",
            "decode_threads",
            "dicom_port",
            "dicom_destination",
        )
        if (value := getattr(args, key)) is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        # mistyped names too: a value meant for a setting often went to a name nobody reads
        return _refuse(problem_lines(error, flags=overrides) + unknown_variables(os.environ))
    if problems := check_environment(settings):
        return _refuse(problems)
    try:
        bundle = load_bundle(settings.bundle)  # refuse to start on a missing, corrupt or tampered bundle, clearly
    except BundleError as error:
        log.error("cannot serve: %s", error)
        return 2
    serve(create_app(settings, bundle), settings, args.log_level)
    return 0


def _refuse(problems: list[str]) -> int:
    """Log each problem on a line of its own; the exit status for bad settings."""
    for problem in problems:
        log.error("invalid setting: %s", problem)
    log.error("not started: %d setting problem(s) above", len(problems))
    return 2
