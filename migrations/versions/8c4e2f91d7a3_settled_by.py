"""kernels.settled_by and usage.settled_by: which path settled a kernel

Revision ID: 8c4e2f91d7a3
Revises: 5a0d1c7e2b31
Create Date: 2026-11-30 06:00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8c4e2f91d7a3"
down_revision: str | Sequence[str] | None = "5a0d1c7e2b31"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("kernels") as batch:
        batch.add_column(sa.Column("settled_by", sa.String(length=32), nullable=True))
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("settled_by", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("settled_by")
    with op.batch_alter_table("kernels") as batch:
        batch.drop_column("settled_by")
