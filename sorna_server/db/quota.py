"""Per-keypair concurrency slots (DESIGN section 4).

Taking a slot is one conditional UPDATE; releasing is done by the kernel's
settlement (see the registry), inside the same transaction that moves the kernel
row to its final status, so it happens once per kernel.
"""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .models import keypairs


async def take_slot(conn: AsyncConnection, access_key: str) -> bool:
    """Reserve one concurrency slot; False when the keypair is at its limit."""
    result = await conn.execute(
        sa.update(keypairs)
        .where(keypairs.c.access_key == access_key,
               keypairs.c.concurrency_used < keypairs.c.concurrency_limit)
        .values(concurrency_used=keypairs.c.concurrency_used + 1)
    )
    return result.rowcount == 1


async def release_slot(conn: AsyncConnection, access_key: str) -> None:
    """Give one slot back (never below zero)."""
    await conn.execute(
        sa.update(keypairs)
        .where(keypairs.c.access_key == access_key, keypairs.c.concurrency_used > 0)
        .values(concurrency_used=keypairs.c.concurrency_used - 1)
    )
