"""The DICOM node's outbox on SQLite and a real PostgreSQL: kept until confirmed, each object once, leases
that replicas cannot share, payloads dropped once delivered (on SQLite, from the file and its write-ahead log
too), entries moved to another destination, and nothing lost across a store restart."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from dicom_node.outbox import ResultObject
from service.outbox import StoreOutbox
from service.store import ResultsStore

pytestmark = pytest.mark.anyio
DEST = "PACS@127.0.0.1:4242"


def _objects(n: int, prefix: str = "1.2.3") -> list[ResultObject]:
    return [ResultObject("1.2.840.10008.5.1.4.1.1.88.34", f"{prefix}.{i}", b"DICM" + bytes([i])) for i in range(n)]


async def _outbox(url: str) -> tuple[ResultsStore, StoreOutbox]:
    store = ResultsStore(url)
    await store.ensure_ready()
    return store, StoreOutbox(store)


async def test_put_is_idempotent_per_destination(database_url: str) -> None:
    store, outbox = await _outbox(database_url)
    try:
        await outbox.put("study-a", DEST, _objects(3))
        await outbox.put("study-a", DEST, _objects(3))  # a re-put (a retried study) keeps one of each
        await outbox.put("study-a", "OTHER@127.0.0.1:104", _objects(1))  # another destination is another entry
        assert await outbox.pending() == 4
        assert len(await outbox.entries("study-a")) == 4
    finally:
        await store.close()


async def test_claims_are_leases_and_delivery_drops_the_payload(database_url: str) -> None:
    store, outbox = await _outbox(database_url)
    try:
        await outbox.put("s", DEST, _objects(5))
        now = datetime.now(UTC)
        first = await outbox.claim(3, now, lease_s=60)
        second = await outbox.claim(10, now, lease_s=60)
        assert [c.sop_instance_uid for c in first] == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
        assert {c.sop_instance_uid for c in second} == {"1.2.3.3", "1.2.3.4"}  # never the leased ones
        assert await outbox.claim(10, now, lease_s=60) == []
        # a lease that ran out (its replica died) is claimable again, with the same bytes
        later = await outbox.claim(10, now + timedelta(seconds=61), lease_s=60)
        assert sorted(c.payload for c in later) == sorted(o.payload for o in _objects(5))

        await outbox.delivered([c.id for c in first], "delivered (0x0000)", now)
        entries = {e.sop_instance_uid: e for e in await outbox.entries()}
        assert entries["1.2.3.0"].payload is None
        assert entries["1.2.3.0"].delivered_at is not None
        assert entries["1.2.3.3"].payload is not None
        assert await outbox.pending() == 2
    finally:
        await store.close()


async def test_failures_wait_for_their_retry_time_or_are_given_up(database_url: str) -> None:
    store, outbox = await _outbox(database_url)
    try:
        await outbox.put("s", DEST, _objects(2))
        now = datetime.now(UTC)
        a, b = await outbox.claim(10, now, lease_s=60)
        await outbox.failed([a.id], "association rejected", now + timedelta(seconds=30))
        await outbox.failed([b.id], "0xa900: refused by the destination", None)
        assert await outbox.claim(10, now + timedelta(seconds=29), lease_s=60) == []
        (again,) = await outbox.claim(10, now + timedelta(seconds=31), lease_s=60)
        assert again.sop_instance_uid == a.sop_instance_uid
        assert again.attempts == 1
        assert await outbox.pending() == 1  # the given-up one is kept (for the audit) but no longer pending
        given_up = next(e for e in await outbox.entries() if e.sop_instance_uid == b.sop_instance_uid)
        assert given_up.last_status is not None
        assert "refused" in given_up.last_status
    finally:
        await store.close()


async def test_concurrent_claimers_never_share_an_entry(database_url: str) -> None:
    """Three claimers, each claiming three times at once. On PostgreSQL each has a store of its own (replicas
    sharing a database); a SQLite file is one store's alone, so there they are three outboxes on one store,
    whose claims still run concurrently (queued for its one connection)."""
    if make_url(database_url).get_backend_name() == "sqlite":
        store, outbox = await _outbox(database_url)
        stores = [(store, outbox), *((store, StoreOutbox(store)) for _ in range(2))]
    else:
        stores = [await _outbox(database_url) for _ in range(3)]
    try:
        await stores[0][1].put("s", DEST, _objects(40))
        now = datetime.now(UTC)
        uids: list[str] = []
        for _ in range(40):  # rounds of nine concurrent claims until nothing is left
            claims = await asyncio.gather(*(o.claim(8, now, lease_s=60) for _, o in stores for _ in range(3)))
            got = [c.sop_instance_uid for claim in claims for c in claim]
            if not got:
                break
            uids.extend(got)
        assert len(uids) == len(set(uids))  # no entry leased twice
        assert len(uids) == 40  # and every one leased
    finally:
        for closing in {s for s, _ in stores}:  # one store, on SQLite
            await closing.close()


async def test_what_was_put_survives_a_restart_of_the_store(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite+aiosqlite:///{tmp_path}/results.sqlite3"
    store, outbox = await _outbox(url)
    await outbox.put("s", DEST, _objects(2))
    await store.close()
    store, outbox = await _outbox(url)
    try:
        claimed = await outbox.claim(10, datetime.now(UTC), lease_s=60)
        assert [c.sop_instance_uid for c in claimed] == ["1.2.3.0", "1.2.3.1"]
    finally:
        await store.close()


async def test_delivered_payloads_leave_no_copy_in_the_sqlite_file_or_its_wal(tmp_path: Path) -> None:
    """The payload carries the patient's name. Dropped from its row once delivered, it stayed in SQLite's
    write-ahead log (checkpointed only after 1000 pages) and, once checkpointed, in the freed pages of the file.
    Now the freed pages are zeroed and the log is checkpointed and truncated: the bytes are nowhere on disk."""
    url = f"sqlite+aiosqlite:///{tmp_path}/results.sqlite3"
    marker = "Müller^Jürgen BFD-TEST-0001".encode()
    large = ResultObject("1.2.840.10008.5.1.4.1.1.7", "1.2.3.1", b"DICM" + marker * 400)  # overflow pages
    small = ResultObject("1.2.840.10008.5.1.4.1.1.88.33", "1.2.3.2", b"DICM" + marker)  # inside its row
    files = [tmp_path / "results.sqlite3", tmp_path / "results.sqlite3-wal"]

    def on_disk() -> bool:
        return any(marker in path.read_bytes() for path in files if path.exists())

    store, outbox = await _outbox(url)
    try:
        await outbox.put("s", DEST, [large, small])
        assert on_disk()  # the test can see them where they are
        claimed = await outbox.claim(10, datetime.now(UTC), lease_s=60)
        await outbox.delivered([c.id for c in claimed], "delivered (0x0000)", datetime.now(UTC))
        assert not on_disk()
        assert not files[1].exists() or files[1].stat().st_size == 0  # truncated
        assert await outbox.pending() == 0
    finally:
        await store.close()
    assert not on_disk()


async def test_entries_move_to_another_destination_once_each(database_url: str) -> None:
    """Re-addressed entries keep their bytes and lease, and start their attempts again; an object already held
    for the new destination is not moved (one copy goes there) but given up, its payload dropped."""
    store, outbox = await _outbox(database_url)
    new = "NEW@127.0.0.1:104"
    try:
        await outbox.put("s", DEST, _objects(3))
        await outbox.put("t", new, _objects(1))  # 1.2.3.0 is held for the new destination already
        now = datetime.now(UTC)
        old = [c for c in await outbox.claim(10, now, lease_s=60) if c.destination == DEST]
        await outbox.failed([old[1].id], "association rejected", now)  # an attempt made at the old address
        moved = await outbox.readdress([c.id for c in old], new)
        assert moved == [old[1].id, old[2].id]
        entries = {(e.destination, e.sop_instance_uid): e for e in await outbox.entries()}
        assert set(entries) == {(DEST, "1.2.3.0"), (new, "1.2.3.0"), (new, "1.2.3.1"), (new, "1.2.3.2")}
        given_up = entries[(DEST, "1.2.3.0")]
        assert given_up.payload is None
        assert given_up.delivered_at is None
        assert given_up.last_status is not None
        assert "no longer configured" in given_up.last_status
        assert entries[(new, "1.2.3.1")].attempts == 0
        assert entries[(new, "1.2.3.1")].payload == _objects(3)[1].payload
        assert await outbox.pending() == 3
    finally:
        await store.close()
