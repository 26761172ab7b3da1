"""SQLAlchemy Core tables (names and meaning follow the historic schema)."""
from __future__ import annotations

import enum

import sqlalchemy as sa

metadata = sa.MetaData(naming_convention={
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})


class KernelStatus(enum.StrEnum):
    PREPARING = "PREPARING"
    RUNNING = "RUNNING"
    TERMINATED = "TERMINATED"
    LOST = "LOST"
    ERROR = "ERROR"


LIVE_STATUSES = (KernelStatus.PREPARING.value, KernelStatus.RUNNING.value)
FINAL_STATUSES = (KernelStatus.TERMINATED.value, KernelStatus.LOST.value,
                  KernelStatus.ERROR.value)

keypairs = sa.Table(
    "keypairs", metadata,
    sa.Column("user_id", sa.Integer, nullable=False, index=True),
    sa.Column("access_key", sa.String(20), primary_key=True),
    sa.Column("secret_key", sa.String(40), nullable=False),
    sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("billing_plan", sa.String(32), nullable=False, server_default="free"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.Column("last_used", sa.DateTime(timezone=True), nullable=True),
    sa.Column("concurrency_limit", sa.Integer, nullable=False, server_default="1"),
    sa.Column("concurrency_used", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rate_limit", sa.Integer, nullable=False, server_default="5000"),
    sa.Column("num_queries", sa.BigInteger, nullable=False, server_default="0"),
)

kernels = sa.Table(
    "kernels", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("lang", sa.String(64), nullable=False),
    sa.Column("access_key", sa.String(20),
              sa.ForeignKey("keypairs.access_key", ondelete="RESTRICT"),
              nullable=False, index=True),
    sa.Column("agent", sa.String(128), nullable=True, index=True),
    sa.Column("status", sa.String(16), nullable=False,
              server_default=KernelStatus.PREPARING.value, index=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.Column("terminated_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("termination_reason", sa.String(128), nullable=True),
    # which path settled the kernel (registry.constants.SETTLED_BY_*)
    sa.Column("settled_by", sa.String(32), nullable=True),
)

usage = sa.Table(
    "usage", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("access_key", sa.String(20),
              sa.ForeignKey("keypairs.access_key", ondelete="RESTRICT"),
              nullable=False, index=True),
    sa.Column("kernel_type", sa.String(64), nullable=False),
    sa.Column("kernel_id", sa.String(64), nullable=False, unique=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("terminated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("cpu_used", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("mem_used", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("io_used", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("net_used", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("settled_by", sa.String(32), nullable=True),
)
