"""`bfd dicom-echo` (`dicom_node.echo`): the real command line against a real Orthanc (C-ECHO and, for a
DICOMweb destination, QIDO-RS), a port where nothing listens, and a peer that rejects the node's AE title.
Over TLS: tests/test_dicom_tls.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from loadtest.orthanc import OrthancServer
from loadtest.servers import free_port


def dicom_echo(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BFD_")} | env
    command = [sys.executable, "-m", "bfd.cli", "dicom-echo", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)


def test_the_destination_from_the_environment_answers_a_c_echo(orthanc: OrthancServer) -> None:
    done = dicom_echo(BFD_DICOM_DESTINATION=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("OK: BFD -> ORTHANC@127.0.0.1:")
    assert "0x0000 (Success)" in done.stdout


def test_a_dicomweb_destination_answers_a_search(orthanc: OrthancServer) -> None:
    done = dicom_echo(orthanc.dicomweb_url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "QIDO-RS search answered" in done.stdout


def test_nothing_listening_and_no_target_say_so() -> None:
    done = dicom_echo(f"PACS@127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert "FAILED" in done.stdout
    assert "cannot connect" in done.stdout
    missing = dicom_echo()
    assert missing.returncode == 2
    assert "BFD_DICOM_DESTINATION" in missing.stdout


@pytest.fixture
def picky_peer() -> Iterator[int]:
    """A storage SCP that lets in the calling AE 'ONLYTHIS' alone."""
    ae = AE(ae_title="PICKY")
    ae.add_supported_context(Verification)
    ae.require_calling_aet = ["ONLYTHIS"]
    server = ae.start_server(("127.0.0.1", 0), block=False)
    assert server is not None
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def test_a_peer_that_does_not_know_the_nodes_ae_title_is_reported_as_rejecting_it(picky_peer: int) -> None:
    rejected = dicom_echo(f"PICKY@127.0.0.1:{picky_peer}", BFD_DICOM_AE_TITLE="BFDNODE")
    assert rejected.returncode == 1
    assert "association rejected" in rejected.stdout
    assert "'BFDNODE'" in rejected.stdout
    accepted = dicom_echo(f"PICKY@127.0.0.1:{picky_peer}", BFD_DICOM_AE_TITLE="ONLYTHIS")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
