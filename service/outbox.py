"""The DICOM node's outbox in the results store's database (`dicom_node.outbox` is the contract).

A row per (destination, SOP Instance UID): putting the same object twice keeps one. Claims are leases
(`claimed_until`) taken with `FOR UPDATE SKIP LOCKED` on PostgreSQL, so replicas sharing a database never
send the same row at once; SQLite (one process) serialises writers anyway. The payload is the Part 10 result
object and so carries the source's patient data, as a DICOM result must; it is kept only until the
destination confirms it, then dropped (the row stays, without it, as the delivery record). Calls go through
the store's gate (`ResultsStore.call`): during a database outage they raise StoreUnavailableError at once and
the delivery loop tries again later; nothing is lost that was put. Entries for a destination no longer
configured are moved to the current one (`readdress`; the delivery loop's decision, `dicom_node.sender`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import DateTime, Integer, LargeBinary, String, UniqueConstraint, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from dicom_node.outbox import Claimed, ResultObject
from service.store import Base, ResultsStore

FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)  # next attempt of an entry given up on: never


class OutboxEntry(Base):
    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("destination", "sop_instance_uid", name="uq_outbox_destination_instance"),
        {"sqlite_autoincrement": True},  # ids never reused on SQLite (migration 0003)
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    destination: Mapped[str] = mapped_column(String(512))
    study_ref: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    payload: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_status: Mapped[str | None] = mapped_column(String(200), nullable=True)


class StoreOutbox:
    """`dicom_node.outbox.Outbox` on a ResultsStore."""

    def __init__(self, store: ResultsStore) -> None:
        self.store = store

    async def put(self, study_ref: str, destination: str, objects: Sequence[ResultObject]) -> None:
        now = datetime.now(UTC)

        async def insert(session: AsyncSession) -> None:
            async with session.begin():
                uids = [o.sop_instance_uid for o in objects]
                held = set(
                    (
                        await session.scalars(
                            select(OutboxEntry.sop_instance_uid).where(
                                OutboxEntry.destination == destination, OutboxEntry.sop_instance_uid.in_(uids)
                            )
                        )
                    ).all()
                )
                for item in objects:
                    if item.sop_instance_uid in held:
                        continue
                    session.add(
                        OutboxEntry(
                            created_at=now,
                            destination=destination,
                            study_ref=study_ref,
                            sop_class_uid=item.sop_class_uid,
                            sop_instance_uid=item.sop_instance_uid,
                            payload=item.payload,
                            attempts=0,
                            next_attempt_at=now,
                        )
                    )
                    held.add(item.sop_instance_uid)

        await self.store.call("putting results in the outbox", insert)

    async def claim(self, limit: int, now: datetime, lease_s: float) -> list[Claimed]:
        due = (
            OutboxEntry.delivered_at.is_(None),
            OutboxEntry.payload.is_not(None),
            OutboxEntry.next_attempt_at <= now,
            or_(OutboxEntry.claimed_until.is_(None), OutboxEntry.claimed_until < now),
        )
        candidates = (
            select(OutboxEntry.id).where(*due).order_by(OutboxEntry.id).limit(limit).with_for_update(skip_locked=True)
        )

        async def take(session: AsyncSession) -> list[Claimed]:
            async with session.begin():
                ids = list((await session.scalars(candidates)).all())
                if not ids:
                    return []
                # The conditions again in the UPDATE: SQLite has no row locks, so two sessions may have read
                # the same candidates; only the one whose UPDATE still finds a row due gets it.
                leased = (
                    update(OutboxEntry)
                    .where(OutboxEntry.id.in_(ids), *due)
                    .values(claimed_until=now + timedelta(seconds=lease_s))
                    .returning(OutboxEntry.id)
                )
                won = set((await session.scalars(leased)).all())
                rows = (await session.scalars(select(OutboxEntry).where(OutboxEntry.id.in_(won)))).all()
                return sorted(
                    (
                        Claimed(r.id, r.destination, r.study_ref, r.sop_instance_uid, r.payload or b"", r.attempts)
                        for r in rows
                    ),
                    key=lambda c: c.id,
                )

        return await self.store.call("claiming outbox entries", take)

    async def delivered(self, ids: Sequence[int], status: str, now: datetime) -> None:
        """The payloads go, and on SQLite leave no copy on disk: the pages they held are zeroed as they are freed
        (`secure_delete`; else a freed page keeps its old bytes in the file), and the write-ahead log, which
        still holds the pages as they were put, is checkpointed and truncated (`ResultsStore.checkpoint`)."""
        change = (
            update(OutboxEntry)
            .where(OutboxEntry.id.in_(list(ids)))
            .values(
                delivered_at=now,
                payload=None,
                claimed_until=None,
                last_status=status[:200],
                attempts=OutboxEntry.attempts + 1,
            )
        )

        async def drop(session: AsyncSession) -> None:
            async with session.begin():
                if self.store.sqlite:  # the connection's setting: the store's one connection, from now on
                    await session.execute(text("PRAGMA secure_delete=ON"))
                await session.execute(change)
            await self.store.checkpoint(session)

        await self.store.call("marking outbox entries delivered", drop)

    async def readdress(self, ids: Sequence[int], destination: str) -> list[int]:
        async def move(session: AsyncSession) -> list[int]:
            async with session.begin():
                rows = (await session.scalars(select(OutboxEntry).where(OutboxEntry.id.in_(list(ids))))).all()
                held = set(
                    (
                        await session.scalars(
                            select(OutboxEntry.sop_instance_uid).where(
                                OutboxEntry.destination == destination,
                                OutboxEntry.sop_instance_uid.in_([r.sop_instance_uid for r in rows]),
                            )
                        )
                    ).all()
                )
                moved: list[int] = []
                for row in sorted(rows, key=lambda r: r.id):
                    if row.sop_instance_uid in held:  # (destination, SOP Instance UID) is unique: one copy goes
                        row.payload = None
                        row.claimed_until = None
                        row.next_attempt_at = FAR_FUTURE
                        row.last_status = f"not sent: {row.destination} no longer configured; held for {destination}"
                    else:
                        row.last_status = f"re-addressed from {row.destination}"
                        row.destination = destination
                        row.attempts = 0
                        held.add(row.sop_instance_uid)
                        moved.append(row.id)
                    row.last_status = row.last_status[:200]
                return moved

        return await self.store.call("re-addressing outbox entries", move)

    async def failed(self, ids: Sequence[int], status: str, retry_at: datetime | None) -> None:
        values: dict[str, object] = {
            "claimed_until": None,
            "last_status": status[:200],
            "attempts": OutboxEntry.attempts + 1,
            "next_attempt_at": retry_at or FAR_FUTURE,
        }
        change = update(OutboxEntry).where(OutboxEntry.id.in_(list(ids))).values(**values)
        await self._execute("marking outbox entries failed", change)

    async def pending(self) -> int:
        count = (
            select(func.count())
            .select_from(OutboxEntry)
            .where(OutboxEntry.delivered_at.is_(None), OutboxEntry.next_attempt_at < FAR_FUTURE)
        )

        async def one(session: AsyncSession) -> int:
            return int((await session.scalar(count)) or 0)

        return await self.store.call("counting the outbox", one)

    async def entries(self, study_ref: str | None = None) -> list[OutboxEntry]:
        """Every entry (of one study), oldest first: for the audit and for tests."""
        query = select(OutboxEntry).order_by(OutboxEntry.id)
        if study_ref is not None:
            query = query.where(OutboxEntry.study_ref == study_ref)

        async def rows(session: AsyncSession) -> list[OutboxEntry]:
            return list((await session.scalars(query)).all())

        return await self.store.call("reading the outbox", rows)

    async def _execute(self, doing: str, statement: object) -> None:
        async def run(session: AsyncSession) -> None:
            async with session.begin():
                await session.execute(statement)  # type: ignore[call-overload]

        await self.store.call(doing, run)
