"""`bfd dicom-echo`: check that the DICOM node reaches its destination (or another AE), with its own AE title and
TLS settings (the `BFD_DICOM_*` environment, as `bfd serve` reads it). Exit status 0 when it answered. A door
onto `dicom_node.echo`, here because it reads the service's settings."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from dicom_node.destination import Destination
from dicom_node.echo import echo
from dicom_node.tls import client_context


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        nargs="?",
        help="AETITLE@host:port, or an http(s) DICOMweb base URL (default: BFD_DICOM_DESTINATION)",
    )
    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="C-ECHO over TLS with the BFD_DICOM_TLS_* files (default: as BFD_DICOM_DESTINATION_TLS)",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait at each step (default 10)")


def run(args: argparse.Namespace) -> int:
    from service.settings import Settings

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its errors say why; its progress is noise here
    settings = Settings()
    target = args.target or settings.dicom_destination
    if not target:
        print("bfd dicom-echo: give AETITLE@host:port (or a DICOMweb URL), or set BFD_DICOM_DESTINATION")
        return 2
    try:
        destination = Destination.parse(target)
        tls_config = settings.tls_config()
        over_tls = tls_config.deliver if args.tls is None else args.tls
        tls = None
        if over_tls and destination.kind == "dimse":
            tls = client_context(dataclasses.replace(tls_config, deliver=True))
    except ValueError as error:
        print(f"bfd dicom-echo: {error}")
        return 2
    result = echo(destination, calling_ae=settings.dicom_ae_title, timeout_s=args.timeout, tls=tls)
    verdict = "OK" if result.ok else "FAILED"
    print(f"{verdict}: {settings.dicom_ae_title} -> {destination.describe()}: {result.detail} ({result.seconds:.2f} s)")
    return 0 if result.ok else 1
