"""One patient per answer: instances of one Study Instance UID that name another patient are refused.

A mis-merged or spoofed study (one Study Instance UID, several Patient IDs) was answered as one study: result
objects were made for the mixture. Now the first patient seen for a Study Instance UID is the study's, and an
instance of any other (another Patient ID, or the same ID from another issuer) is refused with 0xC000 and an
audit record, during the study and after it was answered; the SR names only that patient's instances. The
patient is compared by a keyed hash kept in memory: no Patient ID or issuer reaches the log or the audit.

Why refuse rather than answer each patient apart: results for a second patient filed under a study the PACS
holds for the first would spread the mix-up into more objects, and a spoofed instance would get an answer;
refused, the sender's log shows the conflict where it can be fixed, and no result is made for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from factories import build_tiny_bundle
from pydicom.uid import generate_uid
from test_dicom_loops import c_store, events, roundtrip, running_node, until

from dicom_node.scope import CANNOT_UNDERSTAND, SUCCESS
from loadtest.dicom_studies import make_study, part10_bytes

pytestmark = pytest.mark.anyio
PATIENT_A, PATIENT_B, ISSUER = "PAT-A-90210", "PAT-B-31337", "ISSUER-XYZ-77"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


async def test_instances_of_a_second_patient_in_one_study_are_refused_and_never_answered_with_the_first(
    bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study_uid = generate_uid()
    first = roundtrip(make_study(2, body_parts=["hand"], patient_id=PATIENT_A, study_uid=study_uid))
    other = roundtrip(make_study(1, body_parts=["hand"], patient_id=PATIENT_B, study_uid=study_uid))
    issued = roundtrip(make_study(1, body_parts=["hand"], patient_id=PATIENT_A, study_uid=study_uid))
    issued[0].IssuerOfPatientID = ISSUER  # the same ID from another issuer: another patient
    later = roundtrip(make_study(1, body_parts=["hand"], patient_id=PATIENT_B, study_uid=study_uid))
    caplog.set_level(logging.INFO)
    async with running_node(tmp_path, bundle, destination="PACS@127.0.0.1:9") as (node, outbox):
        port = node.config.port or 0
        sent = [first[0], other[0], first[1], issued[0]]
        assert await asyncio.to_thread(c_store, port, sent) == [SUCCESS, CANNOT_UNDERSTAND, SUCCESS, CANNOT_UNDERSTAND]
        await until("the study answered", lambda: bool(events(node, "answered")))
        # after the study was answered, the other patient is still not this study's: refused, by either door
        assert await asyncio.to_thread(c_store, port, later) == [CANNOT_UNDERSTAND]
        receipt = await node.receive(part10_bytes(later[0]), "stow-rs")
        assert receipt.status == CANNOT_UNDERSTAND
        assert receipt.reason is not None
        assert "another patient" in receipt.reason
        await asyncio.sleep(3 * 0.3)
        await node.collector.drain()

        (answered,) = events(node, "answered")
        ours = {str(ds.SOPInstanceUID) for ds in first}
        assert {i["sop_instance_uid"] for i in answered["images"]} == ours
        refused = events(node, "refused")
        assert [e["sop_instance_uid"] for e in refused] == [
            str(other[0].SOPInstanceUID),
            str(issued[0].SOPInstanceUID),
            str(later[0].SOPInstanceUID),
            str(later[0].SOPInstanceUID),
        ]
        assert {e["status"] for e in refused} == {"0xc000"}
        assert {e["study_instance_uid"] for e in refused} == {study_uid}
        payloads = [e.payload for e in await outbox.entries() if e.payload is not None]
        assert len(payloads) == 1 + 2 + 2  # results of the first patient's two images, nothing else
        for payload in payloads:
            result = pydicom.dcmread(io.BytesIO(payload))
            assert result.PatientID == PATIENT_A
            assert "IssuerOfPatientID" not in result
            if result.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33":
                sr = hd.sr.srread(io.BytesIO(payload))
                assert {uid for _, _, uid, _ in sr.get_evidence()} == ours  # the SR names one patient's only
        audit = node.audit.path.read_text(encoding="ascii")
    for identifier in (PATIENT_A, PATIENT_B, ISSUER):
        assert identifier not in audit
        assert identifier not in caplog.text


def test_patients_are_compared_by_a_keyed_hash_of_their_id_and_issuer() -> None:
    from dicom_node.studies import patient_key

    key = patient_key(PATIENT_A, "")
    assert key == patient_key(PATIENT_A, "")
    assert key != patient_key(PATIENT_A, ISSUER)
    assert key != patient_key(PATIENT_B, "")
    assert patient_key("A", "B") != patient_key("AB", "")  # the two values cannot run into each other
    assert PATIENT_A not in key
    assert key != hashlib.sha256(PATIENT_A.encode()).hexdigest()  # keyed: no dictionary reverses it
