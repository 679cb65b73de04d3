"""`bfd`: one command line for the whole system; each subcommand's module is imported only when used.

So `bfd serve` never imports TensorFlow, and `bfd export` works without the service's web stack loaded.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
SUBCOMMANDS = {
    "export": ("export.cli", "convert Keras models into a verified ONNX bundle"),
    "serve": ("service.cli", "run the HTTP service on a bundle"),
    "predict": ("clients.predict_cli", "predict images in-process on a bundle, or against a server"),
    "train": ("training.train_cli", "train the router and the fracture specialists on MURA"),
    "evaluate": ("training.evaluate_cli", "evaluate a bundle on the test split with clinical metrics"),
    "make-synthetic": ("training.synthetic_cli", "write a small synthetic dataset in MURA's layout (tests, demos)"),
    "desktop": ("desktop.cli", "open the desktop window over a bundle in-process or a running server"),
    "dicom-echo": ("service.dicom_echo_cli", "check that the DICOM node reaches its destination PACS (C-ECHO)"),
}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bfd",
        description="Bone-fracture detection on radiographs. Research use only: not a diagnosis.",
    )
    parser.add_argument("--log-level", default=os.environ.get("BFD_LOG_LEVEL", "INFO"))
    chosen = next((arg for arg in argv if arg in SUBCOMMANDS), None)
    help_asked = "-h" in argv or "--help" in argv
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        # Only the chosen subcommand's module is imported (so its heavy imports stay out of the others).
        if name == chosen or (chosen is None and help_asked):
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
