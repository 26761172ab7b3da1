"""initial schema: keypairs, kernels, usage

Revision ID: 5a0d1c7e2b31
Revises:
Create Date: 2026-11-28 18:24:37
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5a0d1c7e2b31"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "keypairs",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("access_key", sa.String(length=20), nullable=False),
        sa.Column("secret_key", sa.String(length=40), nullable=False),
        sa.Column("is_active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("billing_plan", sa.String(length=32), server_default="free", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
        sa.Column("last_used", sa.DateTime(timezone=True), nullable=True),
        sa.Column("concurrency_limit", sa.Integer(), server_default="1", nullable=False),
        sa.Column("concurrency_used", sa.Integer(), server_default="0", nullable=False),
        sa.Column("rate_limit", sa.Integer(), server_default="5000", nullable=False),
        sa.Column("num_queries", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("access_key", name=op.f("pk_keypairs")),
    )
    op.create_index(op.f("ix_keypairs_user_id"), "keypairs", ["user_id"])

    op.create_table(
        "kernels",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("lang", sa.String(length=64), nullable=False),
        sa.Column("access_key", sa.String(length=20), nullable=False),
        sa.Column("agent", sa.String(length=128), nullable=True),
        sa.Column("status", sa.String(length=16), server_default="PREPARING", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
        sa.Column("terminated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("termination_reason", sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(["access_key"], ["keypairs.access_key"],
                                name=op.f("fk_kernels_access_key_keypairs"), ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kernels")),
    )
    op.create_index(op.f("ix_kernels_access_key"), "kernels", ["access_key"])
    op.create_index(op.f("ix_kernels_agent"), "kernels", ["agent"])
    op.create_index(op.f("ix_kernels_status"), "kernels", ["status"])

    op.create_table(
        "usage",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("access_key", sa.String(length=20), nullable=False),
        sa.Column("kernel_type", sa.String(length=64), nullable=False),
        sa.Column("kernel_id", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("terminated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cpu_used", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("mem_used", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("io_used", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("net_used", sa.BigInteger(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(["access_key"], ["keypairs.access_key"],
                                name=op.f("fk_usage_access_key_keypairs"), ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage")),
        sa.UniqueConstraint("kernel_id", name=op.f("uq_usage_kernel_id")),
    )
    op.create_index(op.f("ix_usage_access_key"), "usage", ["access_key"])


def downgrade() -> None:
    op.drop_index(op.f("ix_usage_access_key"), table_name="usage")
    op.drop_table("usage")
    op.drop_index(op.f("ix_kernels_status"), table_name="kernels")
    op.drop_index(op.f("ix_kernels_agent"), table_name="kernels")
    op.drop_index(op.f("ix_kernels_access_key"), table_name="kernels")
    op.drop_table("kernels")
    op.drop_index(op.f("ix_keypairs_user_id"), table_name="keypairs")
    op.drop_table("keypairs")
