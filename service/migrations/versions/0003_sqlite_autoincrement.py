"""SQLite: AUTOINCREMENT on the tables with integer ids, so that an id is never handed out twice.

Without it SQLite gives a new row max(id) + 1: deleting the newest analysis gave its id to the next one, and
an id a user saved then named another record. SQLite cannot ALTER this, so each table is recreated (batch
mode: copied to a new table and renamed; rows, indexes and constraints kept). The counter starts at the
highest id still present: ids of rows deleted before this migration are beyond its reach. PostgreSQL's
sequences never hand out an id twice already: nothing to do there.

Revision ID: 0003
Revises: 0002
Create Date: 2027-01-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _analyses() -> sa.Table:
    """The table as 0001 made it: batch mode copies this shape (also offline, where it cannot reflect)."""
    table = sa.Table(
        "analyses",
        sa.MetaData(),
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("image_name", sa.String(512), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(200), nullable=False),
        sa.Column("trained", sa.Boolean(), nullable=False),
        sa.Column("body_part", sa.String(64), nullable=False),
        sa.Column("fracture_label", sa.String(16), nullable=False),
        sa.Column("p_fractured", sa.Float(), nullable=False),
        sa.Column("abstained", sa.Boolean(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("image_media_type", sa.String(100), nullable=True),
        sa.Column("image_bytes", sa.LargeBinary(), nullable=True),
    )
    sa.Index("ix_analyses_created_at", table.c.created_at)
    sa.Index("ix_analyses_image_name", table.c.image_name)
    sa.Index("ix_analyses_image_sha256", table.c.image_sha256)
    return table


def _outbox() -> sa.Table:
    """The table as 0002 made it."""
    table = sa.Table(
        "outbox",
        sa.MetaData(),
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("destination", sa.String(512), nullable=False),
        sa.Column("study_ref", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.String(200), nullable=True),
        sa.UniqueConstraint("destination", "sop_instance_uid", name="uq_outbox_destination_instance"),
    )
    sa.Index("ix_outbox_pending", table.c.delivered_at, table.c.next_attempt_at)
    sa.Index("ix_outbox_study_ref", table.c.study_ref)
    return table


def _recreate(autoincrement: bool) -> None:
    if op.get_context().dialect.name != "sqlite":
        return
    for table in (_analyses(), _outbox()):
        with op.batch_alter_table(
            table.name, copy_from=table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
        ):
            pass


def upgrade() -> None:
    _recreate(autoincrement=True)


def downgrade() -> None:
    _recreate(autoincrement=False)
