"""The node's analysis through the real core (a tiny bundle, onnxruntime): each instance is analysed as soon
as it is taken, while its study is still arriving, and lets its parsed pixel data go, what it keeps for its
study counting against the held-bytes budget; the study waits only for its answer and its objects; an
instance sent again replaces the first one's analysis."""

from __future__ import annotations

import asyncio
import gc
import inspect
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pydicom
import pytest
from factories import build_tiny_bundle

from dicom_node.analysis import ANSWER_ALLOWANCE_BYTES, Refused, StudyAnalyser, StudyOutcome
from dicom_node.object_builder import ObjectBuilder
from dicom_node.studies import ReceivedInstance, ReceivedStudy, StudyCollector
from inference.bundle import load_bundle
from inference.config import PredictorConfig
from inference.dicom_objects.patient_study import RESULTS_HEADER, header_bytes
from inference.predictor import Predictor
from loadtest.dicom_studies import make_study, part10_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture
async def analyser(tmp_path: Path) -> AsyncIterator[StudyAnalyser]:
    predictor = Predictor(load_bundle(build_tiny_bundle(tmp_path / "tiny")), PredictorConfig())
    await predictor.start()
    try:
        yield StudyAnalyser(predictor, ("sr", "gsps"), ObjectBuilder(0))
    finally:
        await predictor.stop()


def _instances(count: int) -> list[ReceivedInstance]:
    out = []
    for ds in make_study(count, modality="DX", bits_stored=12, size=(300, 240)):
        data = part10_bytes(ds)
        uid = str(ds.SOPInstanceUID)
        out.append(ReceivedInstance(str(ds.StudyInstanceUID), str(ds.SOPClassUID), uid, data, "dimse", "PACS"))
    return out


async def _until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def test_an_instance_is_analysed_while_its_study_is_still_arriving(analyser: StudyAnalyser) -> None:
    outcomes: list[StudyOutcome] = []

    async def answer(study: ReceivedStudy) -> None:
        outcomes.append(await analyser.analyse(study))

    collector = StudyCollector(answer, quiet_s=60, max_instances=3, held_bytes_budget=10**9)
    first, second, third = _instances(3)
    for instance in (first, second):
        assert collector.add(instance) is None
        analyser.begin(instance, collector.analysed)
    received = len(first.data) + len(second.data)
    assert collector.held_bytes == received
    early = dict(analyser._early)
    assert len(early) == 2
    await _until(lambda: all(task.done() for task in early.values()))
    await asyncio.sleep(0)  # the done callbacks
    assert collector.waiting_studies == 1  # analysed, and the study is still open: nothing answered yet
    assert outcomes == []
    assert first.data == second.data == b""  # their bytes let go once analysed, not when the study is answered
    kept = 0
    for task in early.values():
        result, explained, header_size = task.result()
        assert result.prepared.dicom is not None
        assert result.upload.data == b""  # the received bytes let go once analysed...
        header = result.prepared.dicom.dataset
        assert "PixelData" not in header  # ...and the parsed pixel data, and all but what the objects read...
        assert set(header.dir()) <= set(RESULTS_HEADER)
        assert header_size == header_bytes(header)
        assert result.prepared.dicom.pixels.size == 0  # ...and the full-size rendering
        assert result.prepared.display is None  # ...with the display image and the feature map
        assert result.prediction.feature_map is None
        assert explained.cam is not None
        assert explained.overlay_rgb is not None
        kept += explained.overlay_rgb.nbytes + explained.cam.nbytes + result.prepared.pixels.nbytes + header_size
    # what the analyses keep for the study's answer still counts against the budget, until it is answered
    # (these small test images are smaller than that; a 10 MB radiograph keeps about 1 MB)
    assert collector.held_bytes == kept + 2 * ANSWER_ALLOWANCE_BYTES

    collector.add(third)  # the third instance completes the study
    analyser.begin(third, collector.analysed)
    await collector.drain()
    (outcome,) = outcomes
    assert sorted(image["sop_instance_uid"] for image in outcome.images) == sorted(
        i.sop_instance_uid for i in (first, second, third)
    )
    assert outcome.refused == []
    objects = [pydicom.dcmread(io.BytesIO(o.payload)) for o in outcome.objects]
    assert [d.Modality for d in objects] == ["SR", "PR", "PR", "PR"]
    assert analyser.in_progress == 0
    assert collector.held_bytes == 0


async def test_an_instance_sent_again_replaces_the_first_ones_analysis(analyser: StudyAnalyser) -> None:
    outcomes: list[StudyOutcome] = []

    async def answer(study: ReceivedStudy) -> None:
        outcomes.append(await analyser.analyse(study))

    collector = StudyCollector(answer, quiet_s=60, max_instances=10, held_bytes_budget=10**9)
    (instance,) = _instances(1)
    again = ReceivedInstance(**{**instance.__dict__, "data": instance.data + b""})  # the same UIDs, new bytes
    analyser.begin(instance)
    collector.add(instance)
    analyser.begin(again)
    replaced = collector.add(again)
    assert replaced is instance
    analyser.drop(replaced)
    assert analyser.in_progress == 1
    await collector.flush()
    (outcome,) = outcomes
    assert [image["sop_instance_uid"] for image in outcome.images] == [instance.sop_instance_uid]
    assert analyser.in_progress == 0


async def test_an_instance_that_cannot_be_decoded_is_reported_and_the_rest_answered(
    analyser: StudyAnalyser,
) -> None:
    good, bad = _instances(2)
    broken = ReceivedInstance(**{**bad.__dict__, "data": bad.data[: len(bad.data) // 2]})  # pixel data cut short
    study = ReceivedStudy(good.study_uid)
    for instance in (good, broken):
        analyser.begin(instance)
        study.instances[instance.sop_instance_uid] = instance
    outcome = await analyser.analyse(study)
    assert [image["sop_instance_uid"] for image in outcome.images] == [good.sop_instance_uid]
    assert [r["sop_instance_uid"] for r in outcome.refused] == [broken.sop_instance_uid]
    assert outcome.refused[0]["reason"]


async def test_a_refused_instance_keeps_nothing_of_its_attempt(analyser: StudyAnalyser) -> None:
    """Before: a refused decode's error kept its traceback, whose frames held the upload's bytes and the parsed
    data set until the study was answered, while it counted 0 bytes against the budget."""
    (bad,) = _instances(1)
    broken = ReceivedInstance(**{**bad.__dict__, "data": bad.data[: len(bad.data) // 2]})
    gc.collect()
    gc.disable()  # freed by reference counting, at once: not left to a collection of the oldest generation
    try:
        analyser.begin(broken)
        task = analyser._early[id(broken)]
        await _until(task.done)
        refused = task.result()
        data = broken.data
        here = inspect.currentframe()
        referrers = [type(r).__name__ for r in gc.get_referrers(data) if r is not broken and r is not here]
        del here
    finally:
        gc.enable()
    assert isinstance(refused, Refused)
    assert refused.reason
    assert referrers == []  # nothing of the failed attempt holds the instance's bytes
