"""No loops: the node recognises the result objects it made and answers them 'stored' without analysing them.

Before, a destination routed back to the node (a PACS auto-route, or the destination set to the node itself)
made results of results for ever: one C-STORE gave 16 studies answered and 33 result objects in 42 s. Here the
node's destination IS the node (its own AE@host:port): one study in, one analysis, each result object received
back once and not analysed. Objects of another maker stay what they were: a foreign SR refused (0x0122), a
foreign Secondary Capture analysed. A real node in this process (tiny bundle, onnxruntime, a SQLite outbox)
and real pynetdicom associations; `running_node` serves tests/test_dicom_patients.py too.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from factories import build_tiny_bundle
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage as SR_CLASS
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage as GSPS_CLASS
from pydicom.uid import SecondaryCaptureImageStorage as SC_CLASS
from pynetdicom import AE

from dicom_node.config import NodeConfig
from dicom_node.node import DicomNode
from dicom_node.scope import SOP_CLASS_NOT_SUPPORTED, SUCCESS
from inference.bundle import load_bundle
from inference.config import PredictorConfig
from inference.dicom_objects.series import MANUFACTURER
from inference.predictor import Predictor
from loadtest.dicom_studies import make_study, part10_bytes
from loadtest.servers import free_port
from service.outbox import StoreOutbox
from service.store import ResultsStore

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@asynccontextmanager
async def running_node(
    folder: Path, bundle: Path, *, destination: str | None = None, **config: Any
) -> AsyncIterator[tuple[DicomNode, StoreOutbox]]:
    """A started node on a free port, its outbox in a SQLite file in `folder`, its audit log in
    `folder / 'audit.jsonl'`; `destination` None: the node itself."""
    port = free_port()
    predictor = Predictor(load_bundle(bundle), PredictorConfig())
    await predictor.start()
    store = ResultsStore(f"sqlite+aiosqlite:///{folder}/results.sqlite3")
    try:
        await store.ensure_ready()
        outbox = StoreOutbox(store)
        settings: dict[str, Any] = {
            "quiet_s": 0.3,
            "build_processes": 0,
            "retry_initial_s": 0.2,
            "retry_max_s": 1.0,
            **config,
        }
        node_config = NodeConfig(
            destination=destination or f"BFD@127.0.0.1:{port}",
            port=port,
            audit_log=folder / "audit.jsonl",
            **settings,
        )
        node = DicomNode(predictor, outbox, node_config)
        await node.start()
        try:
            yield node, outbox
        finally:
            await node.stop()
    finally:
        await predictor.stop()
        await store.close()


def c_store(port: int, datasets: Sequence[Dataset], calling_ae: str = "PACS") -> list[int]:
    """C-STORE each data set over one association from a plain pynetdicom SCU; the statuses (blocking)."""
    ae = AE(ae_title=calling_ae)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="BFD")
    assert assoc.is_established, "association with the node not established"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def roundtrip(datasets: Sequence[Dataset]) -> list[Dataset]:
    """As a PACS sends them: read back from Part 10 bytes, with their file meta."""
    return [pydicom.dcmread(io.BytesIO(part10_bytes(ds))) for ds in datasets]


async def until(what: str, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def events(node: DicomNode, name: str) -> list[dict[str, Any]]:
    return [e for e in node.audit.read() if e["event"] == name]


async def test_a_node_whose_destination_is_itself_analyses_one_study_once(bundle: Path, tmp_path: Path) -> None:
    async with running_node(tmp_path, bundle) as (node, outbox):
        study = roundtrip(make_study(2, body_parts=["hand"]))
        assert await asyncio.to_thread(c_store, node.config.port or 0, study) == [SUCCESS, SUCCESS]
        await until("the study answered", lambda: bool(events(node, "answered")))
        produced = {o["sop_instance_uid"] for o in events(node, "answered")[0]["produced"]}
        assert len(produced) == 1 + 2 + 2  # the SR, a GSPS and a Secondary Capture per image

        def all_came_back() -> bool:
            return {e["sop_instance_uid"] for e in events(node, "own_result")} >= produced

        await until("the results received back", all_came_back)
        await node.sender.idle.wait()
        await asyncio.sleep(5 * 0.3)  # five quiet times: a study of its results would be answered by now
        await node.collector.drain()

        assert len(events(node, "answered")) == 1  # exactly one analysis
        assert len(events(node, "received")) == 1
        came_back = events(node, "own_result")
        assert sorted(e["sop_instance_uid"] for e in came_back) == sorted(produced)  # each once
        assert {e["kind"] for e in came_back} == {"sr", "gsps", "sc"}
        assert {e["calling_ae"] for e in came_back} == {"BFD"}
        entries = await outbox.entries()
        assert {e.sop_instance_uid for e in entries} == produced  # nothing more was made
        assert all(e.delivered_at is not None for e in entries)  # and the node answered each 'stored'
        assert node.collector.waiting_studies == 0


async def test_objects_of_another_maker_are_treated_as_before(bundle: Path, tmp_path: Path) -> None:
    """A Secondary Capture of another vendor filed as series 9901 is analysed, a foreign SR refused (0x0122,
    as before: only the node's own SRs are taken); one of ours is taken by either door without analysis."""
    async with running_node(tmp_path, bundle, destination="PACS@127.0.0.1:9") as (node, _):
        (foreign_sc,) = roundtrip(make_study(1, body_parts=["hand"]))
        foreign_sc.SOPClassUID = foreign_sc.file_meta.MediaStorageSOPClassUID = SC_CLASS
        foreign_sc.SeriesNumber = 9901
        foreign_sc.Manufacturer = "Another vendor"
        foreign_sr = roundtrip(make_study(1, body_parts=["hand"]))[0]
        foreign_sr.SOPClassUID = foreign_sr.file_meta.MediaStorageSOPClassUID = SR_CLASS
        foreign_sr.SeriesNumber = 9902
        ours = roundtrip([foreign_sr])[0]
        ours.Manufacturer = MANUFACTURER
        ours.SOPInstanceUID = ours.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()

        assert (await node.receive(part10_bytes(foreign_sc), "stow-rs")).status == SUCCESS
        assert (await node.receive(part10_bytes(foreign_sr), "stow-rs")).status == SOP_CLASS_NOT_SUPPORTED
        assert (await node.receive(part10_bytes(ours), "stow-rs")).status == SUCCESS
        assert await asyncio.to_thread(c_store, node.config.port or 0, [foreign_sr, ours]) == [
            SOP_CLASS_NOT_SUPPORTED,
            SUCCESS,
        ]
        await until("the foreign capture analysed", lambda: bool(events(node, "answered")))
        (answered,) = events(node, "answered")
        assert [i["sop_instance_uid"] for i in answered["images"]] == [foreign_sc.SOPInstanceUID]
        assert [e["sop_instance_uid"] for e in events(node, "own_result")] == [ours.SOPInstanceUID] * 2


def test_own_results_are_known_by_their_form_and_their_maker() -> None:
    from dicom_node.scope import own_result

    uid = "1.2.999.42.7"
    assert own_result(SR_CLASS, uid, MANUFACTURER, 9902) == "sr"
    assert own_result(GSPS_CLASS, uid, MANUFACTURER, 9903) == "gsps"
    assert own_result(SC_CLASS, uid, f"{MANUFACTURER} ", 9901) == "sc"
    assert own_result(SC_CLASS, uid, MANUFACTURER, 9902) is None  # a capture in the SR's series: not ours
    assert own_result("1.2.840.10008.5.1.4.1.1.1", uid, MANUFACTURER, 9901) is None  # a CR: never ours
    assert own_result(SC_CLASS, uid, "Another vendor", 9901) is None
    assert own_result(SC_CLASS, uid, "Another vendor", 9901, uid_root="1.2.999") == "sc"  # the site's root
    assert own_result(SC_CLASS, uid, "Another vendor", 9901, uid_root="1.2.99") is None
    example = pydicom.uid.generate_uid()  # pydicom's example root: every pydicom user's, so no sign
    assert own_result(SC_CLASS, example, "Another vendor", 9901, uid_root=pydicom.uid.PYDICOM_ROOT_UID[:-1]) is None
