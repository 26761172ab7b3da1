"""API keypairs: generate, create, list, look up and deactivate.

An access key is `AKIA` followed by 16 base32 characters (20 in all); a secret
key is 40 URL-safe characters.  Both come from `secrets`.
"""
from __future__ import annotations

import base64
import re
import secrets
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from .db.models import keypairs

ACCESS_KEY_PREFIX = "AKIA"
DEFAULT_CONCURRENCY_LIMIT = 30
DEFAULT_RATE_LIMIT = 1000          # requests per 15-minute window
DEFAULT_BILLING_PLAN = "free"

_ACCESS_KEY = re.compile(r"^AKIA[A-Z0-9]{16}$")
_SECRET_KEY = re.compile(r"^[A-Za-z0-9_\-/+=]{40}$")


class KeypairError(Exception):
    """Bad input for a keypair operation; the message is one line."""


class KeypairExists(KeypairError):
    pass


class KeypairNotFound(KeypairError):
    pass


def generate_keypair() -> tuple[str, str]:
    """A fresh (access_key, secret_key) pair; nothing is stored."""
    access_key = ACCESS_KEY_PREFIX + base64.b32encode(secrets.token_bytes(10)).decode("ascii")
    secret_key = secrets.token_urlsafe(30)
    return access_key, secret_key


def _check(access_key: str, secret_key: str, user_id: int, concurrency_limit: int,
           rate_limit: int) -> None:
    if not _ACCESS_KEY.match(access_key):
        raise KeypairError("invalid access key: expected AKIA followed by 16 upper-case letters "
                           "or digits (20 characters)")
    if not _SECRET_KEY.match(secret_key):
        raise KeypairError("invalid secret key: expected 40 characters from A-Z a-z 0-9 _ - / + =")
    if user_id < 0:
        raise KeypairError("invalid user id: must not be negative")
    if concurrency_limit < 0:
        raise KeypairError("invalid concurrency limit: must not be negative")
    if rate_limit < 1:
        raise KeypairError("invalid rate limit: must be at least 1")


def _as_dict(row: sa.Row) -> dict[str, Any]:
    values = dict(row._mapping)
    for name, value in values.items():
        # SQLite hands back naive date-times; they were stored in UTC.
        if isinstance(value, datetime) and value.tzinfo is None:
            values[name] = value.replace(tzinfo=UTC)
    return values


async def create_keypair(
    engine: AsyncEngine,
    user_id: int,
    *,
    concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT,
    rate_limit: int = DEFAULT_RATE_LIMIT,
    access_key: str | None = None,
    secret_key: str | None = None,
    billing_plan: str = DEFAULT_BILLING_PLAN,
    is_active: bool = True,
) -> dict[str, Any]:
    """Store a keypair (generated unless both keys are given); returns the stored row."""
    if (access_key is None) != (secret_key is None):
        raise KeypairError("give both the access key and the secret key, or neither")
    if access_key is None or secret_key is None:
        access_key, secret_key = generate_keypair()
    _check(access_key, secret_key, user_id, concurrency_limit, rate_limit)
    async with engine.begin() as conn:
        exists = await conn.scalar(
            sa.select(sa.func.count()).select_from(keypairs)
            .where(keypairs.c.access_key == access_key))
        if exists:
            raise KeypairExists(f"keypair {access_key} already exists")
        try:
            await conn.execute(sa.insert(keypairs).values(
                user_id=user_id, access_key=access_key, secret_key=secret_key,
                is_active=is_active, billing_plan=billing_plan,
                concurrency_limit=concurrency_limit, rate_limit=rate_limit,
            ))
        except sa.exc.IntegrityError:   # lost a race with another creator
            raise KeypairExists(f"keypair {access_key} already exists") from None
        row = (await conn.execute(
            sa.select(keypairs).where(keypairs.c.access_key == access_key))).one()
    return _as_dict(row)


async def get_keypair(engine: AsyncEngine, access_key: str) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (await conn.execute(
            sa.select(keypairs).where(keypairs.c.access_key == access_key))).one_or_none()
    return _as_dict(row) if row is not None else None


async def list_keypairs(engine: AsyncEngine, *, user_id: int | None = None,
                        active_only: bool = False) -> list[dict[str, Any]]:
    """Every keypair (with its secret: callers decide what to show), oldest user first."""
    query = sa.select(keypairs).order_by(keypairs.c.user_id, keypairs.c.access_key)
    if user_id is not None:
        query = query.where(keypairs.c.user_id == user_id)
    if active_only:
        query = query.where(keypairs.c.is_active == sa.true())
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [_as_dict(row) for row in rows]


async def set_keypair_active(engine: AsyncEngine, access_key: str, active: bool) -> bool:
    """Set `is_active`; True if it changed. KeypairNotFound for an unknown key."""
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.update(keypairs)
            .where(keypairs.c.access_key == access_key, keypairs.c.is_active != active)
            .values(is_active=active))
        if result.rowcount:
            return True
        exists = await conn.scalar(
            sa.select(sa.func.count()).select_from(keypairs)
            .where(keypairs.c.access_key == access_key))
    if not exists:
        raise KeypairNotFound(f"no keypair {access_key}")
    return False


async def deactivate_keypair(engine: AsyncEngine, access_key: str) -> bool:
    """Refuse the keypair from now on; True if it was active."""
    return await set_keypair_active(engine, access_key, False)


async def activate_keypair(engine: AsyncEngine, access_key: str) -> bool:
    return await set_keypair_active(engine, access_key, True)
