"""The node's study grouping and its STOW-RS body parsing, without a network: quiet time (kept open while an
instance waits for room), the longest wait (which duplicates cannot extend), the instance count, duplicates,
the held-bytes budget, flush on shutdown; multipart/related parts and the store response."""

from __future__ import annotations

import asyncio

import pytest

from dicom_node.stow import (
    FailedInstance,
    StoredInstance,
    StowRequestError,
    dicom_parts,
    store_response,
    warning_text,
)
from dicom_node.studies import ReceivedInstance, ReceivedStudy, StudyCollector

pytestmark = pytest.mark.anyio


def _instance(study: str, sop: str, size: int = 10) -> ReceivedInstance:
    return ReceivedInstance(study, "1.2.840.10008.5.1.4.1.1.1", sop, b"x" * size, "dimse", "ORTHANC", "127.0.0.1")


class Recorder:
    def __init__(self) -> None:
        self.studies: list[ReceivedStudy] = []
        self.arrived = asyncio.Event()

    async def __call__(self, study: ReceivedStudy) -> None:
        self.studies.append(study)
        self.arrived.set()


async def test_a_study_is_answered_once_quiet_with_every_instance_once() -> None:
    seen = Recorder()
    collector = StudyCollector(seen, quiet_s=0.2, max_instances=100, held_bytes_budget=10_000)
    for sop in ("1", "2", "2", "3"):  # "2" twice: kept once
        collector.add(_instance("S1", sop))
        await asyncio.sleep(0.05)  # arrivals closer than the quiet time keep the study open
    assert seen.studies == []
    assert collector.held_bytes == 30
    await asyncio.wait_for(seen.arrived.wait(), 5)
    (study,) = seen.studies
    assert sorted(study.instances) == ["1", "2", "3"]
    await collector.drain()
    assert collector.held_bytes == 0  # released once answered


async def test_an_instance_waiting_for_room_keeps_its_study_open() -> None:
    """A sender held back by the budget (the node touches the study while it waits) must not see its study
    answered in two parts: the quiet time runs from the last touch, not from the last instance taken."""
    seen = Recorder()
    collector = StudyCollector(seen, quiet_s=0.2, max_instances=100, held_bytes_budget=10_000)
    collector.add(_instance("S1", "1"))
    for _ in range(8):  # 0.4 s of waiting: twice the quiet time
        await asyncio.sleep(0.05)
        collector.touch("S1")
    collector.touch("S2")  # a study with nothing taken yet: nothing to keep open
    assert seen.studies == []
    collector.add(_instance("S1", "2"))
    await asyncio.wait_for(seen.arrived.wait(), 5)
    assert [sorted(s.instances) for s in seen.studies] == [["1", "2"]]
    assert collector.waiting_studies == 0


async def test_a_sender_re_sending_one_instance_cannot_keep_its_study_open_past_the_longest_wait() -> None:
    """38 re-sends in 20 s kept a study open for ever, never answered: each arrival restarted the quiet time.
    It is answered `max_wait_s` after its first instance, while the re-sends go on; a touch (an instance waiting
    for room) cannot extend it either."""
    seen = Recorder()
    collector = StudyCollector(seen, quiet_s=0.2, max_instances=100, held_bytes_budget=10_000, max_wait_s=0.6)
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not seen.studies and loop.time() - started < 3.0:
        collector.add(_instance("S1", "1"))  # the same instance again and again, closer than the quiet time
        collector.touch("S1")
        await asyncio.sleep(0.05)
    waited = loop.time() - started
    assert [sorted(s.instances) for s in seen.studies] == [["1"]]
    assert 0.55 <= waited < 1.0, f"answered after {waited:.2f} s"
    await collector.flush()


def test_the_longest_wait_defaults_to_four_quiet_times_and_is_never_shorter_than_one() -> None:
    assert StudyCollector(Recorder(), quiet_s=5, max_instances=1, held_bytes_budget=1).max_wait_s == 60.0
    assert StudyCollector(Recorder(), quiet_s=600, max_instances=1, held_bytes_budget=1).max_wait_s == 2400.0
    with pytest.raises(ValueError, match="at least its quiet time"):
        StudyCollector(Recorder(), quiet_s=5, max_instances=1, held_bytes_budget=1, max_wait_s=4)


async def test_bytes_are_counted_off_once_however_they_are_let_go() -> None:
    """Analysed (its received bytes give way to what the analysis keeps), replaced by a re-send, or answered
    with the study: what each instance counts for leaves the budget once, so the held count never drifts."""
    seen = Recorder()
    collector = StudyCollector(seen, quiet_s=60, max_instances=100, held_bytes_budget=10_000)
    first, second = _instance("S1", "1", 100), _instance("S1", "2", 50)
    collector.add(first)
    collector.add(second)
    collector.analysed(first, 30)
    assert first.data == b""
    assert collector.held_bytes == 30 + 50  # the analysis's 30 until the study is answered
    collector.release(first)
    collector.release(first)  # twice: nothing more
    assert collector.held_bytes == 50
    collector.analysed(first, 30)  # an analysis that ends after its instance was let go: nothing counted
    assert collector.held_bytes == 50
    assert collector.add(_instance("S1", "1", 70)) is first  # a re-send of an analysed instance
    assert collector.held_bytes == 120
    await collector.flush()
    assert collector.held_bytes == 0
    assert sorted(seen.studies[0].instances) == ["1", "2"]


async def test_analysed_instances_waiting_for_their_study_fill_the_budget() -> None:
    """Studies kept open by a long quiet time cannot hold more than the budget: what their analysed
    instances keep counts, so the door refuses before memory grows past it."""
    collector = StudyCollector(Recorder(), quiet_s=3600, max_instances=100, held_bytes_budget=1_000)
    for n in range(4):
        instance = _instance(f"S{n}", "1", 400)
        collector.add(instance)
        collector.analysed(instance, 250)
    assert collector.held_bytes == 1_000
    assert not collector.can_hold(1)


async def test_a_full_study_is_answered_at_once_and_the_rest_starts_a_new_group() -> None:
    seen = Recorder()
    collector = StudyCollector(seen, quiet_s=60, max_instances=2, held_bytes_budget=10_000)
    for sop in ("1", "2", "3"):
        collector.add(_instance("S1", sop))
    await collector.drain()
    assert [sorted(s.instances) for s in seen.studies] == [["1", "2"]]
    assert collector.waiting_studies == 1
    await collector.flush()  # shutdown answers what still waits
    assert [sorted(s.instances) for s in seen.studies] == [["1", "2"], ["3"]]
    assert seen.studies[0].ref != seen.studies[1].ref


async def test_studies_are_kept_apart_and_the_budget_is_the_doors_to_check() -> None:
    seen = Recorder()
    collector = StudyCollector(seen, quiet_s=60, max_instances=100, held_bytes_budget=25)
    collector.add(_instance("A", "1"))
    collector.add(_instance("B", "1"))
    assert collector.can_hold(5)
    assert not collector.can_hold(6)
    await collector.flush()
    assert sorted(s.study_uid for s in seen.studies) == ["A", "B"]


async def test_a_failing_analysis_does_not_stop_the_collector() -> None:
    calls: list[str] = []

    async def flaky(study: ReceivedStudy) -> None:
        calls.append(study.study_uid)
        if study.study_uid == "bad":
            raise RuntimeError("boom")

    collector = StudyCollector(flaky, quiet_s=0, max_instances=1, held_bytes_budget=100)
    collector.add(_instance("bad", "1"))
    await collector.drain()
    collector.add(_instance("good", "1"))
    await collector.drain()
    assert calls == ["bad", "good"]
    assert collector.held_bytes == 0


def _multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> tuple[str, bytes]:
    body = b""
    for media_type, data in parts:
        body += f"--{boundary}\r\nContent-Type: {media_type}\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return f'multipart/related; type="application/dicom"; boundary={boundary}', body


def test_stow_parts_come_out_byte_exact() -> None:
    binary = bytes(range(256)) * 50 + b"\r\n--b0und"  # a near-boundary inside the data stays data
    content_type, body = _multipart([("application/dicom", binary), ("application/dicom", b"DICM2")])
    assert dicom_parts(content_type, body) == [binary, b"DICM2"]


@pytest.mark.parametrize(
    ("content_type", "body", "says"),
    [
        ("multipart/form-data; boundary=x", b"--x--\r\n", "multipart/related"),
        ('multipart/related; type="image/png"; boundary=x', b"--x--\r\n", "type must be"),
        ('multipart/related; type="application/dicom"', b"", "boundary"),
        ('multipart/related; type="application/dicom"; boundary=x', b"--x--\r\n", "no part"),
        (
            'multipart/related; type="application/dicom"; boundary=x',
            b"--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--",
            "every part",
        ),
        ('multipart/related; type="application/dicom"; boundary=x', b"--x\r\n\x00\x01garbage", "malformed"),
    ],
)
def test_stow_bodies_that_are_not_dicom_parts_are_refused_with_a_reason(
    content_type: str, body: bytes, says: str
) -> None:
    with pytest.raises(StowRequestError, match=says):
        dicom_parts(content_type, body)


def test_the_store_response_lists_what_was_taken_and_what_failed() -> None:
    response = store_response(
        [StoredInstance("1.2.840.10008.5.1.4.1.1.1", "1.2.3")],
        [FailedInstance("1.2.840.10008.5.1.4.1.1.1.2", "1.2.4", 0x0122, "SOP class not analysed")],
    )
    (referenced,) = response["00081199"]["Value"]
    assert referenced["00081155"]["Value"] == ["1.2.3"]
    (failed,) = response["00081198"]["Value"]
    assert failed["00081155"]["Value"] == ["1.2.4"]
    assert failed["00081197"]["Value"] == [0x0122]
    text = warning_text([FailedInstance("", "", 0xC000, "bad\r\nline ü")])
    assert "\n" not in text
    assert text.isascii()
