"""The node's spool: what it keeps survives the process, comes back as it arrived, goes once answered, and a
crash while writing leaves nothing that counts. The node end to end (killed, restarted, answered from the
spool) is in test_dicom_node.py. Files are sized before they are read back: one over the node's instance limit
(or a sidecar over its own) is left and logged, not read."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dicom_node.spool import Spool
from dicom_node.studies import ReceivedInstance
from service.settings import Settings


def _instance(n: int, study: str = "1.2.3", data: bytes | None = None) -> ReceivedInstance:
    sop_class = "1.2.840.10008.5.1.4.1.1.1"
    return ReceivedInstance(study, sop_class, f"1.2.3.{n}", data or bytes([n]) * 1000, "dimse", "PACS")


def test_kept_instances_come_back_in_a_new_spool_as_they_arrived_oldest_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    kept = [_instance(1), _instance(2, study="4.5.6"), _instance(3)]
    kept[1].door, kept[1].calling_ae, kept[1].peer = "stow-rs", None, "10.0.0.7"
    for instance in kept:
        spool.keep(instance)
        assert instance.spool_key is not None
    back = [entry.load() for entry in Spool(tmp_path / "spool").left()]  # as after a restart
    assert [(i.study_uid, i.sop_class_uid, i.sop_instance_uid, i.data, i.door, i.calling_ae, i.peer) for i in back] == [
        (i.study_uid, i.sop_class_uid, i.sop_instance_uid, i.data, i.door, i.calling_ae, i.peer) for i in kept
    ]
    assert [i.spool_key for i in back] == [i.spool_key for i in kept]


def test_forgotten_instances_leave_no_file_and_others_stay(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first, second = _instance(1), _instance(2)
    spool.keep(first)
    spool.keep(second)
    spool.forget([first])
    assert first.spool_key is None
    assert [entry.sop_instance_uid for entry in spool.left()] == ["1.2.3.2"]
    spool.forget([second, second])  # twice is harmless
    assert list(tmp_path.iterdir()) == []


def test_only_the_services_user_can_read_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.keep(_instance(1))
    assert (tmp_path / "spool").stat().st_mode & 0o077 == 0
    for path in (tmp_path / "spool").iterdir():
        assert path.stat().st_mode & 0o077 == 0, path.name


def test_bytes_kept_count_what_is_on_disk_across_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first, second = _instance(1, data=b"a" * 300), _instance(2, data=b"b" * 500)
    spool.keep(first)
    spool.keep(second)
    assert spool.bytes_kept == 800
    again = Spool(tmp_path)
    assert again.bytes_kept == 0  # nothing known before it looks
    assert len(again.left()) == 2
    assert again.bytes_kept == 800
    again.forget([first])
    assert again.bytes_kept == 500


def test_files_are_named_by_a_random_key_never_by_what_the_sender_chose(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    hostile = _instance(1, study="../../etc")
    hostile.sop_instance_uid = "../../../passwd"
    spool.keep(hostile)
    assert {p.parent for p in tmp_path.rglob("*") if p.is_file()} == {tmp_path / "spool"}
    names = sorted(p.name for p in (tmp_path / "spool").iterdir())
    assert names == [f"{hostile.spool_key}.dcm", f"{hostile.spool_key}.json"]
    (back,) = spool.left()
    assert back.sop_instance_uid == "../../../passwd"  # kept as data, never as a path


def test_a_crash_while_writing_leaves_nothing_that_counts(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    whole = _instance(1)
    spool.keep(whole)
    (tmp_path / "aaaa.dcm.partial").write_bytes(b"half an instance")  # died while writing the data...
    (tmp_path / "bbbb.dcm").write_bytes(b"data whose facts never came")  # ...or before its facts
    (tmp_path / "cccc.json.partial").write_bytes(b"{")
    assert [entry.key for entry in spool.left()] == [whole.spool_key]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{whole.spool_key}.dcm", f"{whole.spool_key}.json"])


def test_unreadable_facts_are_left_for_an_operator_and_the_rest_comes_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    good = _instance(1)
    spool.keep(good)
    (tmp_path / "dddd.dcm").write_bytes(b"x")
    (tmp_path / "dddd.json").write_text("not json")
    (tmp_path / "eeee.json").write_text(json.dumps({"study_uid": "1"}))  # fields missing
    assert [entry.key for entry in spool.left()] == [good.spool_key]
    assert (tmp_path / "dddd.json").exists()
    assert (tmp_path / "eeee.json").exists()


def test_a_file_over_the_instance_limit_is_left_and_logged_not_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Recovery read every file whole, whatever its size: one over the limit (the limit lowered since, or a file
    put there by something else) is now left in place for an operator and named in the log; a file that grows
    past the limit after it was listed is refused by `load` without reading on."""
    spool = Spool(tmp_path, max_instance_bytes=2000)
    small, large = _instance(1, data=b"s" * 1000), _instance(2, data=b"L" * 5000)
    spool.keep(small)
    spool.keep(large)
    (tmp_path / "ffff.json").write_bytes(b" " * 100_000)  # a sidecar far larger than any the spool writes
    (tmp_path / "ffff.dcm").write_bytes(b"x")
    again = Spool(tmp_path, max_instance_bytes=2000)  # as after a restart
    with caplog.at_level(logging.ERROR, logger="dicom_node.spool"):
        (entry,) = again.left()
    assert entry.key == small.spool_key
    assert f"{large.spool_key}.dcm holds 5000 bytes" in caplog.text
    assert "ffff.json is unreadable" in caplog.text
    assert (tmp_path / f"{large.spool_key}.dcm").exists()  # left for an operator
    assert (tmp_path / "ffff.json").exists()
    assert again.bytes_kept == 1000
    assert entry.load().data == small.data
    entry.path.write_bytes(b"g" * 3000)  # grew since it was listed
    with pytest.raises(OSError, match="over the limit of 2000"):
        entry.load()


def test_a_write_that_fails_raises_and_leaves_no_partial_file(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    spool = Spool(folder)
    folder.rmdir()
    folder.write_bytes(b"")  # the folder is gone: every write fails
    instance = _instance(1)
    with pytest.raises(NotADirectoryError):
        spool.keep(instance)
    assert instance.spool_key is None
    assert [p.name for p in tmp_path.iterdir()] == ["spool"]


@pytest.mark.parametrize(("value", "expected"), [("", None), ("  ", None), ("data/spool", Path("data/spool"))])
def test_the_spool_setting_is_off_when_blank(
    value: str, expected: Path | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BFD_DICOM_SPOOL_DIR", value)
    assert Settings().dicom_spool_dir == expected
