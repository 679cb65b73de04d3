"""Create the analyses table.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "analyses",
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
    op.create_index("ix_analyses_created_at", "analyses", ["created_at"])
    op.create_index("ix_analyses_image_name", "analyses", ["image_name"])
    op.create_index("ix_analyses_image_sha256", "analyses", ["image_sha256"])


def downgrade() -> None:
    op.drop_index("ix_analyses_image_sha256", table_name="analyses")
    op.drop_index("ix_analyses_image_name", table_name="analyses")
    op.drop_index("ix_analyses_created_at", table_name="analyses")
    op.drop_table("analyses")
