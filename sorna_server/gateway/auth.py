"""Request signatures and the authentication middleware (third middleware).

`Authorization: Sorna signMethod=HMAC-SHA256, credential=<ACCESS_KEY>:<SIGNATURE>`
with a `Date` (or `X-Sorna-Date`) header within 15 minutes of the server's clock,
as ISO 8601 (what `sorna-client` sends) or RFC 1123.

    key = HMAC(HMAC(secret_key, date as YYYYMMDD), host)
    signature = hex HMAC(key, "\\n".join([method, path with query, raw date,
                    "host:<host>", "content-type:<content type>",
                    "x-sorna-version:<version>", hex digest of the body]))

Multipart uploads are signed with the digest of an empty body (the client
cannot know the encoded body in advance).  Keypairs are cached for
`config.keypair_cache_ttl` seconds, so a deactivated key stops working within
that time while the database is not asked on every request.
"""
from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from ..db.models import keypairs
from . import keys
from .errors import AuthorizationFailed, InvalidAuthParameters
from .keys import ACCESS_KEY, KEYPAIR
from .versioning import VERSION_HEADER, effective_method

MAX_CLOCK_SKEW = timedelta(minutes=15)
SIGN_METHODS = {"HMAC-SHA1": "sha1", "HMAC-SHA224": "sha224", "HMAC-SHA256": "sha256",
                "HMAC-SHA384": "sha384", "HMAC-SHA512": "sha512"}
MAX_ACCESS_KEY_LENGTH = 20



@dataclass(slots=True)
class Keypair:
    access_key: str
    secret_key: str
    user_id: int
    is_active: bool
    rate_limit: int
    concurrency_limit: int
    _signing_keys: dict[tuple[str, str, str], bytes] = field(default_factory=dict, repr=False)

    def signing_key(self, hash_name: str, day: str, host: str) -> bytes:
        """HMAC(HMAC(secret, day), host), memoised per (hash, day, host)."""
        cache_key = (hash_name, day, host)
        key = self._signing_keys.get(cache_key)
        if key is None:
            if len(self._signing_keys) > 32:
                self._signing_keys.clear()
            key = hmac.new(self.secret_key.encode(), day.encode(), hash_name).digest()
            key = hmac.new(key, host.encode(), hash_name).digest()
            self._signing_keys[cache_key] = key
        return key


# --- signature ----------------------------------------------------------------

def parse_authorization(value: str) -> tuple[str, str, str]:
    """Return (hash name, access key, signature) from an Authorization header."""
    scheme, _, params = value.strip().partition(" ")
    if scheme != "Sorna":
        raise InvalidAuthParameters("The Authorization scheme must be 'Sorna'.")
    fields: dict[str, str] = {}
    for part in params.split(","):
        name, sep, item = part.strip().partition("=")
        if sep:
            fields[name.strip()] = item.strip()
    sign_method = fields.get("signMethod", "").upper()
    hash_name = SIGN_METHODS.get(sign_method)
    if hash_name is None:
        raise InvalidAuthParameters(
            f"Unsupported signMethod; use one of {', '.join(SIGN_METHODS)}.")
    access_key, sep, signature = fields.get("credential", "").partition(":")
    if not sep or not access_key or not signature:
        raise InvalidAuthParameters("credential must be <ACCESS_KEY>:<SIGNATURE>.")
    return hash_name, access_key, signature


def parse_date(raw: str) -> datetime:
    """Parse an ISO 8601 or RFC 1123 date; naive dates are taken as UTC."""
    try:
        parsed = datetime.fromisoformat(raw.strip())
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            raise InvalidAuthParameters("The Date header is not an ISO 8601 or RFC 1123 date.") \
                from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def check_date(date: datetime, now: datetime | None = None) -> None:
    now = now or datetime.now(UTC)
    if abs(now - date) > MAX_CLOCK_SKEW:
        raise InvalidAuthParameters(
            "The request date is more than 15 minutes away from the server's clock.")


def string_to_sign(method: str, path_qs: str, raw_date: str, host: str, content_type: str,
                   version: str, body_hash: str) -> bytes:
    return "\n".join((method.upper(), path_qs, raw_date, f"host:{host}",
                      f"content-type:{content_type.lower()}", f"x-sorna-version:{version}",
                      body_hash)).encode()


def compute_signature(signing_key: bytes, hash_name: str, message: bytes) -> str:
    return hmac.new(signing_key, message, hash_name).hexdigest()


def sign_request(secret_key: str, *, method: str, path_qs: str, raw_date: str, host: str,
                 content_type: str, version: str, body: bytes = b"",
                 hash_name: str = "sha256") -> str:
    """The signature a client computes (used by tests, the benchmark and docs)."""
    date = parse_date(raw_date)
    key = hmac.new(secret_key.encode(), date.strftime("%Y%m%d").encode(), hash_name).digest()
    key = hmac.new(key, host.encode(), hash_name).digest()
    if content_type.lower().startswith("multipart/"):
        body = b""
    body_hash = hashlib.new(hash_name, body).hexdigest()
    message = string_to_sign(method, path_qs, raw_date, host, content_type, version, body_hash)
    return compute_signature(key, hash_name, message)


# --- keypair cache ------------------------------------------------------------

class KeypairCache:
    """Keypairs by access key, each kept for `ttl` seconds (misses too).

    Concurrent lookups of the same key share one database query.
    """

    def __init__(self, engine: AsyncEngine, ttl: float, max_entries: int = 10000):
        self.engine = engine
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Keypair | None]] = {}
        self._loading: dict[str, asyncio.Future[Keypair | None]] = {}

    async def get(self, access_key: str) -> Keypair | None:
        entry = self._entries.get(access_key)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        loading = self._loading.get(access_key)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[Keypair | None] = asyncio.get_running_loop().create_future()
        self._loading[access_key] = future
        try:
            keypair = await self._load(access_key)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters (if any) re-raise it
            raise
        else:
            future.set_result(keypair)
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[access_key] = (time.monotonic() + self.ttl, keypair)
            return keypair
        finally:
            del self._loading[access_key]

    def invalidate(self, access_key: str | None = None) -> None:
        if access_key is None:
            self._entries.clear()
        else:
            self._entries.pop(access_key, None)

    async def _load(self, access_key: str) -> Keypair | None:
        query = sa.select(keypairs.c.access_key, keypairs.c.secret_key, keypairs.c.user_id,
                          keypairs.c.is_active, keypairs.c.rate_limit,
                          keypairs.c.concurrency_limit).where(
            keypairs.c.access_key == access_key)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        return Keypair(row.access_key, row.secret_key, row.user_id, bool(row.is_active),
                       int(row.rate_limit), int(row.concurrency_limit))


# --- middleware ------------------------------------------------------------------

def is_public(request: web.Request) -> bool:
    """Public routes, and unknown paths (so they answer 404, not 401)."""
    match_info = request.match_info
    if match_info.http_exception is not None:
        return True
    return bool(getattr(match_info.route.handler, "public", False))


async def authenticate(request: web.Request) -> Keypair:
    header = request.headers.get("Authorization")
    if not header:
        raise AuthorizationFailed("This API needs a signed Authorization header.")
    hash_name, access_key, signature = parse_authorization(header)
    raw_date = request.headers.get("X-Sorna-Date") or request.headers.get("Date")
    if not raw_date:
        raise InvalidAuthParameters("A Date or X-Sorna-Date header is required.")
    date = parse_date(raw_date)
    check_date(date)
    if len(access_key) > MAX_ACCESS_KEY_LENGTH or not access_key.isalnum():
        raise AuthorizationFailed("Unknown access key.")
    keypair = await request.app[keys.KEYPAIRS].get(access_key)
    if keypair is None:
        raise AuthorizationFailed("Unknown access key.")

    content_type = request.content_type
    multipart = content_type.startswith("multipart/")
    body = b"" if multipart else await request.read()
    body_hash = hashlib.new(hash_name, body).hexdigest()
    signing_key = keypair.signing_key(hash_name, date.strftime("%Y%m%d"), request.host)
    version = request.headers.get(VERSION_HEADER, "")
    methods = [effective_method(request)]
    if request.method not in methods:
        methods.append(request.method)
    content_types = [content_type] + (["multipart/form-data"] if multipart else [])
    for method in methods:
        for ctype in content_types:
            message = string_to_sign(method, request.raw_path, raw_date, request.host, ctype,
                                     version, body_hash)
            expected = compute_signature(signing_key, hash_name, message)
            if hmac.compare_digest(expected, signature):
                if not keypair.is_active:
                    raise AuthorizationFailed("This access key is not active.")
                return keypair
    raise AuthorizationFailed("The signature does not match.")


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    if is_public(request):
        return await handler(request)
    keypair = await authenticate(request)
    request[KEYPAIR] = keypair
    request[ACCESS_KEY] = keypair.access_key
    request.app[keys.ACTIVITY].note(keypair.access_key)
    return await handler(request)
