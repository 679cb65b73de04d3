"""DICOM TLS (`dicom_node.tls`): the node's storage SCP and its deliveries over TLS, with a throw-away CA.

Pinned with real pynetdicom associations: a sender with a certificate from the trusted CA stores over TLS;
a plain-TCP sender, a sender with another CA's certificate and (by default) one without a certificate are
turned away at the handshake while the port keeps serving; a client that connects and says nothing does not
hold up the next sender (pynetdicom's own handshake runs in its accept loop, without a time limit);
deliveries go over TLS and refuse a destination whose certificate the trusted CAs did not issue;
misconfigurations stop the start-up naming the setting. And end to end with a real Orthanc speaking TLS
(its `DicomTlsEnabled`): Orthanc C-STOREs a study to `bfd serve` over TLS and gets the SR, GSPS and SC back
over TLS, and `bfd dicom-echo` reaches it over TLS with the node's settings (and not without TLS).
"""

from __future__ import annotations

import asyncio
import io
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import trustme
from factories import build_tiny_bundle
from orthanc_fixtures import started_orthanc
from pydantic import ValidationError
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from test_dicom_echo import dicom_echo

from dicom_node.config import NodeConfig
from dicom_node.delivery import DeliveryError, deliver
from dicom_node.destination import Destination
from dicom_node.receiving import ReceiveGate, Withheld
from dicom_node.scope import SUCCESS
from dicom_node.scp import StorageSCP
from dicom_node.tls import TlsConfig, client_context, server_context
from loadtest.dicom_studies import make_study, part10_bytes
from loadtest.servers import bfd_serve, free_port
from service.settings import Settings

pytestmark = pytest.mark.anyio
SCU_AE = "BFDTESTSCU"


@dataclass(frozen=True)
class Pki:
    """PEM files of a throw-away CA: the CA itself, and certificates with their keys it issued."""

    ca: Path
    node_certificate: Path
    node_key: Path
    peer_certificate: Path  # a sender's or a destination's
    peer_key: Path


def _pki(folder: Path, name: str) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(key_type=trustme.KeyType.RSA)  # RSA: what every DICOM TLS stack (DCMTK too) takes
    paths = {}
    for who in ("node", "peer"):
        issued = ca.issue_cert(f"{who}.{name}.test", "127.0.0.1", "localhost")
        paths[f"{who}_certificate"] = folder / f"{who}.crt"
        paths[f"{who}_key"] = folder / f"{who}.key"
        issued.cert_chain_pems[0].write_to_path(str(paths[f"{who}_certificate"]))
        issued.private_key_pem.write_to_path(str(paths[f"{who}_key"]))
    ca.cert_pem.write_to_path(str(folder / "ca.crt"))
    return Pki(ca=folder / "ca.crt", **paths)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _pki(tmp_path_factory.mktemp("pki"), "trusted")


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _pki(tmp_path_factory.mktemp("other-pki"), "untrusted")


def _node_tls(pki: Pki, **options: bool) -> TlsConfig:
    return TlsConfig(pki.node_certificate, pki.node_key, pki.ca, **options)


def _sender_context(trusted: Path, certificate: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=trusted)
    if certificate is not None:
        context.load_cert_chain(certificate, key)
    return context


class Recorder:
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.tls_refused = 0

    def count_tls_refused(self) -> None:
        self.tls_refused += 1

    async def __call__(self, data: bytes | Withheld, calling_ae: str | None, peer: str | None) -> tuple[int, None]:
        assert isinstance(data, bytes)
        self.received.append(data)
        return SUCCESS, None


@pytest.fixture
async def tls_scp(pki: Pki) -> Iterator[tuple[StorageSCP, Recorder]]:
    """The node's SCP on a loopback port with TLS (client certificates required)."""
    recorder = Recorder()
    gate = ReceiveGate(max_instance_bytes=100_000_000, budget=500_000_000, held=lambda: 0, wait_s=1.0)
    config = NodeConfig(destination="PACS@127.0.0.1:104", port=0)
    context = server_context(_node_tls(pki, listen=True))
    scp = StorageSCP(config, asyncio.get_running_loop(), recorder, gate, context, recorder.count_tls_refused)
    scp.start()
    try:
        yield scp, recorder
    finally:
        scp.stop()


def _echo(port: int, tls: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="BFD", tls_args=(tls, "127.0.0.1") if tls else None)
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_echo().Status) == SUCCESS
    finally:
        assoc.release()


async def test_a_sender_with_a_trusted_certificate_stores_over_tls(
    pki: Pki, tls_scp: tuple[StorageSCP, Recorder]
) -> None:
    scp, recorder = tls_scp
    (ds,) = make_study(1, modality="DX", bits_stored=12, size=(1000, 800))
    ds = pydicom.dcmread(io.BytesIO(part10_bytes(ds)))
    sender = _sender_context(pki.ca, pki.peer_certificate, pki.peer_key)

    def store() -> int:
        ae = AE(ae_title=SCU_AE)
        ae.add_requested_context(ds.SOPClassUID, str(ds.file_meta.TransferSyntaxUID))
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="BFD", tls_args=(sender, "127.0.0.1"))
        assert assoc.is_established
        try:
            assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)  # type: ignore[union-attr]
            return int(assoc.send_c_store(ds).Status)
        finally:
            assoc.release()

    assert await asyncio.to_thread(store) == SUCCESS
    (data,) = recorder.received
    assert pydicom.dcmread(io.BytesIO(data)).PixelData == ds.PixelData


async def test_senders_without_a_trusted_certificate_are_turned_away_and_the_port_keeps_serving(
    pki: Pki, other_pki: Pki, tls_scp: tuple[StorageSCP, Recorder]
) -> None:
    scp, recorder = tls_scp
    trusted = _sender_context(pki.ca, pki.peer_certificate, pki.peer_key)
    untrusted = _sender_context(pki.ca, other_pki.peer_certificate, other_pki.peer_key)
    anonymous = _sender_context(pki.ca)
    assert not await asyncio.to_thread(_echo, scp.port, None)  # plain TCP on a TLS port
    assert not await asyncio.to_thread(_echo, scp.port, untrusted)  # another CA's certificate
    assert not await asyncio.to_thread(_echo, scp.port, anonymous)  # no certificate: mutual TLS by default
    assert await asyncio.to_thread(_echo, scp.port, trusted)
    await asyncio.sleep(0.1)  # the SCP's threads report on the event loop
    assert recorder.tls_refused == 3  # what bfd_dicom_tls_handshakes_refused_total counts


async def test_client_certificates_can_be_made_optional(pki: Pki) -> None:
    config = NodeConfig(destination="PACS@127.0.0.1:104", port=0)
    gate = ReceiveGate(max_instance_bytes=1000, budget=1000, held=lambda: 0, wait_s=1.0)
    context = server_context(_node_tls(pki, listen=True, require_client_certificate=False))
    scp = StorageSCP(config, asyncio.get_running_loop(), Recorder(), gate, context)
    scp.start()
    try:
        assert await asyncio.to_thread(_echo, scp.port, _sender_context(pki.ca))
    finally:
        scp.stop()


async def test_a_client_that_connects_and_says_nothing_does_not_hold_up_the_next(
    pki: Pki, tls_scp: tuple[StorageSCP, Recorder]
) -> None:
    scp, _ = tls_scp
    silent = socket.create_connection(("127.0.0.1", scp.port))
    try:
        time.sleep(0.2)  # the server has accepted it and waits for its ClientHello
        started = time.monotonic()
        trusted = _sender_context(pki.ca, pki.peer_certificate, pki.peer_key)
        assert await asyncio.to_thread(_echo, scp.port, trusted)
        assert time.monotonic() - started < 5.0  # not after the silent client's 10 s handshake limit
    finally:
        silent.close()


async def test_a_client_trickling_its_handshake_is_cut_off_at_the_time_limit(
    tls_scp: tuple[StorageSCP, Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte every 0.2 s would keep a per-read time-out from ever expiring: the limit is on the whole handshake."""
    import dicom_node.scp

    monkeypatch.setattr(dicom_node.scp, "TLS_HANDSHAKE_TIMEOUT_S", 1.0)
    scp, recorder = tls_scp
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64)  # the start of a ClientHello

    def trickle() -> float:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", scp.port)) as client:
            client.settimeout(0.2)
            for byte in hello:
                try:
                    client.sendall(bytes([byte]))
                    if client.recv(1) == b"":  # the server shut the connection
                        break
                except TimeoutError:
                    continue  # nothing to read yet: the server is still waiting for the rest
                except OSError:
                    break
        return time.monotonic() - started

    took = await asyncio.to_thread(trickle)
    assert took < 5.0  # cut off after about 1 s; trickling the whole prefix would take about 15 s
    await asyncio.sleep(0.1)
    assert recorder.tls_refused == 1


def _tls_store_scp(pki: Pki) -> tuple[AE, object, list[str]]:
    """A plain pynetdicom storage SCP with TLS (its certificate from `pki`), recording the SOP Instance UIDs."""
    from pynetdicom import AllStoragePresentationContexts, evt

    stored: list[str] = []

    def on_store(event: object) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))  # type: ignore[attr-defined]
        return SUCCESS

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.peer_certificate, pki.peer_key)
    context.load_verify_locations(cafile=pki.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    ae = AE(ae_title="TLSPACS")
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)], ssl_context=context
    )
    return ae, server, stored


def test_deliveries_go_over_tls_to_a_destination_the_trusted_cas_vouch_for(pki: Pki, other_pki: Pki) -> None:
    ae, server, stored = _tls_store_scp(pki)
    try:
        port = int(server.server_address[1])  # type: ignore[attr-defined]
        destination = Destination.parse(f"TLSPACS@127.0.0.1:{port}")
        images = make_study(2)
        ours = client_context(_node_tls(pki, deliver=True))
        delivered = deliver(destination, [part10_bytes(ds) for ds in images], timeout_s=10, tls=ours)
        assert [d.sop_instance_uid for d in delivered] == [ds.SOPInstanceUID for ds in images]
        assert stored == [ds.SOPInstanceUID for ds in images]
        with pytest.raises(DeliveryError) as plain:
            deliver(destination, [part10_bytes(images[0])], timeout_s=5)  # no TLS to a TLS port
        assert plain.value.retriable
        distrusting = client_context(_node_tls(other_pki, deliver=True))  # trusts another CA only
        with pytest.raises(DeliveryError) as refused:
            deliver(destination, [part10_bytes(images[0])], timeout_s=5, tls=distrusting)
        assert refused.value.retriable  # a certificate may be rotated: tried again, with back-off
        assert len(stored) == 2
    finally:
        server.shutdown()  # type: ignore[attr-defined]


def test_what_tls_needs_is_named_at_start_up(pki: Pki, tmp_path: Path) -> None:
    base = {"dicom_destination": "PACS@127.0.0.1:104", "dicom_port": 11112}
    with pytest.raises(ValidationError, match="BFD_DICOM_TLS_CERTIFICATE"):
        Settings(**base, dicom_tls=True)
    with pytest.raises(ValidationError, match="BFD_DICOM_TLS_TRUSTED_CERTIFICATES"):
        Settings(**base, dicom_tls=True, dicom_tls_certificate=pki.node_certificate, dicom_tls_private_key=pki.node_key)
    with pytest.raises(ValidationError, match="BFD_DICOM_TLS_TRUSTED_CERTIFICATES"):
        Settings(**base, dicom_destination_tls=True)
    settings = Settings(
        **base,
        dicom_tls=True,
        dicom_tls_certificate=pki.node_certificate,
        dicom_tls_private_key=tmp_path / "missing.key",
        dicom_tls_trusted_certificates=pki.ca,
    )
    node_config = settings.node_config()
    assert node_config is not None
    with pytest.raises(ValueError, match="cannot load"):
        server_context(node_config.tls)
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate")
    with pytest.raises(ValueError, match="BFD_DICOM_TLS_TRUSTED_CERTIFICATES: cannot load"):
        client_context(TlsConfig(trusted_certificates=garbage, deliver=True))


def test_orthanc_and_the_node_exchange_a_study_and_its_results_over_tls(pki: Pki, tmp_path: Path) -> None:
    """Orthanc with DICOM TLS on (its SCP TLS only, the node as a TLS modality) C-STOREs a study to `bfd serve`
    listening with TLS; the node sends the SR, GSPS and SC back to Orthanc over TLS."""
    orthanc_tls = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki.peer_certificate),
        "DicomTlsPrivateKey": str(pki.peer_key),
        "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
    }
    orthanc = started_orthanc(extra_config=orthanc_tls)
    try:
        port = free_port()
        env = {
            "BFD_DICOM_PORT": str(port),
            "BFD_DICOM_DESTINATION": f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
            "BFD_DICOM_QUIET_S": "1",
            "BFD_DICOM_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
            "BFD_DICOM_TLS": "true",
            "BFD_DICOM_DESTINATION_TLS": "true",
            "BFD_DICOM_TLS_CERTIFICATE": str(pki.node_certificate),
            "BFD_DICOM_TLS_PRIVATE_KEY": str(pki.node_key),
            "BFD_DICOM_TLS_TRUSTED_CERTIFICATES": str(pki.ca),
        }
        bundle = build_tiny_bundle(tmp_path / "tiny")
        with bfd_serve(bundle, tmp_path, env=env) as server:
            orthanc.set_modality("bfd", "BFD", "127.0.0.1", port, UseDicomTls=True)
            study = make_study(2)
            ids = [orthanc.upload(part10_bytes(ds)) for ds in study]
            job = orthanc.store_to_modality("bfd", ids)
            assert job.get("FailedInstancesCount", 0) == 0, job
            study_uid = str(study[0].StudyInstanceUID)
            deadline = time.monotonic() + 120
            while len(orthanc.instance_ids(study_uid)) < 2 + 1 + 2 + 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            classes = sorted(str(ds.SOPClassUID) for ds in orthanc.study_instances(study_uid))
            assert len(classes) == 7, server.log_text()[-3000:]
            assert "(TLS)" in server.log_text()
        over_tls = dicom_echo(**env)  # `bfd dicom-echo` with the node's settings: TLS as it delivers
        assert over_tls.returncode == 0, over_tls.stdout + over_tls.stderr
        assert "over TLS" in over_tls.stdout
        plain = dicom_echo("--no-tls", **env)  # Orthanc's port speaks TLS only
        assert plain.returncode == 1
    finally:
        orthanc.__exit__(None, None, None)
