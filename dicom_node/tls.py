"""DICOM over TLS (PS3.15 Annex B, the BCP 195 profile): the node's storage SCP and its C-STORE deliveries.

Hospitals that follow IHE ATNA (Secure Node) let no DICOM association in or out without TLS and certificates
from their own PKI. The node then listens with TLS only (`BFD_DICOM_TLS`) and/or delivers over TLS
(`BFD_DICOM_DESTINATION_TLS`), with one certificate and private key of its own (PEM files) and the CA
certificates its peers' certificates must chain to (`BFD_DICOM_TLS_TRUSTED_CERTIFICATES`). By default a sender
must present a certificate (mutual TLS, as ATNA asks); `BFD_DICOM_TLS_REQUIRE_CLIENT_CERTIFICATE=false` lets in
any sender that completes the handshake (the calling AE check still applies). TLS 1.2 is the minimum.

Peer certificates are verified against the trusted CAs, not against the host name: DICOM peers are named by AE
title and often addressed by IP, and DICOM TLS (like DCMTK and Orthanc) does not ask for host-name checks, so
any certificate the trusted CAs issued is accepted. Trust a CA that issues certificates to DICOM nodes only.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsConfig:
    """The node's TLS material; `listen` and `deliver` say where it is used."""

    certificate: Path | None = None  # PEM: this node's certificate (and its chain)
    private_key: Path | None = None  # PEM, unencrypted (a file only the service's user reads, e.g. a k8s Secret)
    trusted_certificates: Path | None = None  # PEM: the CAs peers' certificates must chain to
    require_client_certificate: bool = True
    listen: bool = False  # the storage SCP accepts TLS only
    deliver: bool = False  # C-STORE deliveries go over TLS

    def check(self) -> None:
        """Raise ValueError, naming the setting, when what `listen` or `deliver` needs is missing."""
        if self.listen and (self.certificate is None or self.private_key is None):
            raise ValueError("BFD_DICOM_TLS needs BFD_DICOM_TLS_CERTIFICATE and BFD_DICOM_TLS_PRIVATE_KEY (PEM files)")
        if self.listen and self.require_client_certificate and self.trusted_certificates is None:
            raise ValueError(
                "BFD_DICOM_TLS with client certificates required needs BFD_DICOM_TLS_TRUSTED_CERTIFICATES (the CAs "
                "senders' certificates chain to), or BFD_DICOM_TLS_REQUIRE_CLIENT_CERTIFICATE=false"
            )
        if self.deliver and self.trusted_certificates is None:
            raise ValueError(
                "BFD_DICOM_DESTINATION_TLS needs BFD_DICOM_TLS_TRUSTED_CERTIFICATES (the CAs the destination's "
                "certificate chains to)"
            )
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("BFD_DICOM_TLS_CERTIFICATE and BFD_DICOM_TLS_PRIVATE_KEY go together")


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The SCP's context: its certificate, TLS 1.2 or later, and the senders' certificates checked."""
    tls.check()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_own(context, tls)
    if tls.trusted_certificates is not None:
        _load_trusted(context, tls.trusted_certificates)
    if tls.require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.trusted_certificates is not None:
        context.verify_mode = ssl.CERT_OPTIONAL  # one presented is still checked
    return context


def client_context(tls: TlsConfig) -> ssl.SSLContext:
    """The deliveries' context: the destination's certificate checked, this node's presented when it has one."""
    tls.check()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # see the module docstring; the chain is still verified
    context.verify_mode = ssl.CERT_REQUIRED
    assert tls.trusted_certificates is not None  # check() made sure
    _load_trusted(context, tls.trusted_certificates)
    if tls.certificate is not None:
        _load_own(context, tls)
    return context


def _load_own(context: ssl.SSLContext, tls: TlsConfig) -> None:
    assert tls.certificate is not None
    assert tls.private_key is not None
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(
            f"BFD_DICOM_TLS_CERTIFICATE / BFD_DICOM_TLS_PRIVATE_KEY: cannot load {tls.certificate} with "
            f"{tls.private_key} ({_why(error)})"
        ) from error


def _load_trusted(context: ssl.SSLContext, path: Path) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"BFD_DICOM_TLS_TRUSTED_CERTIFICATES: cannot load {path} ({_why(error)})") from error


def _why(error: OSError | ssl.SSLError) -> str:
    return str(getattr(error, "reason", None) or error.strerror or type(error).__name__)
