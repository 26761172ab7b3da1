"""Request signatures and the authentication middleware (third middleware).

`Authorization: Sorna signMethod=HMAC-SHA256, credential=<ACCESS_KEY>:<SIGNATURE>`
with a `Date` (or `X-Sorna-Date`) header within 15 minutes of the server's clock,
as ISO 8601 (what `sorna-client` sends) or RFC 1123.

    key = HMAC(HMAC(secret_key, date as YYYYMMDD), host)
    signature = hex HMAC(key, "\\n".join([method, path with query, raw date,
                    "host:<host>", "content-type:<content type>",
                    "x-sorna-version:<version>", hex digest of the body]))

What the check guarantees (docs/security.md has the whole threat model):

- The method is the effective method, after `X-Method-Override`: the
  signature is checked over that method only, so an override the signer did
  not sign fails like any other change.
- The signature must be hex of the hash's length (ASCII only) before anything
  is compared; an unknown access key is checked against a dummy key and both
  get the same answer.
- Non-multipart bodies are read (hashed while streaming, in bounded memory,
  see `bodies`) and their hash checked before any handler sees them; the
  handler gets the checked bytes as `SIGNED_BODY`.
- Multipart uploads are signed by the historic client with the digest of an
  empty body (it cannot know the encoded body in advance), so their body is
  not covered.  New clients may send `X-Sorna-Upload-SHA256` (the digest of
  the uploaded files, see `upload_digest`) and sign it in the body-hash
  position; the upload handler then refuses files that do not match it.
- Each checked signature is handed to the rate-limit script (`REPLAY_GUARD`),
  which accepts it only once while its date is within the window.

Keypairs are cached for `config.keypair_cache_ttl` seconds, so a deactivated
key stops working within that time while the database is not asked on every
request.
"""
from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from ..db.models import keypairs
from . import keys
from .bodies import pending_body
from .errors import AuthorizationFailed, InvalidAuthParameters
from .keys import ACCESS_KEY, KEYPAIR, REPLAY_GUARD, SIGNED_BODY, UPLOAD_DIGEST
from .ratelimit import ReplayGuard
from .versioning import VERSION_HEADER, effective_method

MAX_CLOCK_SKEW = timedelta(minutes=15)
REPLAY_MARGIN = 60.0
"""Seconds a used signature is remembered beyond its date's window (clock
differences between gateways)."""
SIGN_METHODS = {"HMAC-SHA1": "sha1", "HMAC-SHA224": "sha224", "HMAC-SHA256": "sha256",
                "HMAC-SHA384": "sha384", "HMAC-SHA512": "sha512"}
SIGNATURE_LENGTHS = {name: hashlib.new(name).digest_size * 2 for name in SIGN_METHODS.values()}
ACCESS_KEY_FORMAT = re.compile(r"[A-Za-z0-9]{1,20}", re.ASCII)
HEX_FORMAT = re.compile(r"[0-9a-fA-F]+", re.ASCII)
UPLOAD_DIGEST_HEADER = "X-Sorna-Upload-SHA256"
BAD_CREDENTIAL = "The access key or the signature is not valid."
"""The one answer for an unknown key and a wrong signature."""
OVERRIDE_HINT = " With X-Method-Override, the signature must be made over the overriding method."


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
            key = hmac.new(key, host.encode("utf-8", "surrogateescape"), hash_name).digest()
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
    # surrogateescape: header bytes that were not UTF-8 come back as they were sent
    return "\n".join((method.upper(), path_qs, raw_date, f"host:{host}",
                      f"content-type:{content_type.lower()}", f"x-sorna-version:{version}",
                      body_hash)).encode("utf-8", "surrogateescape")


def normalized_signature(signature: str, hash_name: str) -> str:
    """The signature in lower-case hex, or 401 when it cannot be one (checked
    before any comparison: `hmac.compare_digest` refuses non-ASCII text)."""
    length = SIGNATURE_LENGTHS[hash_name]
    if len(signature) != length or not HEX_FORMAT.fullmatch(signature):
        raise AuthorizationFailed(f"The signature must be {length} hexadecimal digits.")
    return signature.lower()


def upload_digest(files: list[tuple[str, bytes]]) -> str:
    """The value of `X-Sorna-Upload-SHA256` for files uploaded in this order:
    SHA-256 over one line per file, `sha256(name as UTF-8) sha256(content)`, both
    in hex.  Names are those of the multipart parts after percent-decoding."""
    lines = b"".join(
        f"{hashlib.sha256(name.encode()).hexdigest()} {hashlib.sha256(data).hexdigest()}\n"
        .encode() for name, data in files)
    return hashlib.sha256(lines).hexdigest()


def compute_signature(signing_key: bytes, hash_name: str, message: bytes) -> str:
    return hmac.new(signing_key, message, hash_name).hexdigest()


def sign_request(secret_key: str, *, method: str, path_qs: str, raw_date: str, host: str,
                 content_type: str, version: str, body: bytes = b"",
                 hash_name: str = "sha256", body_digest: str | None = None) -> str:
    """The signature a client computes (used by tests, the benchmark and docs);
    `body_digest` replaces the body's digest (an upload's `X-Sorna-Upload-SHA256`)."""
    date = parse_date(raw_date)
    key = hmac.new(secret_key.encode(), date.strftime("%Y%m%d").encode(), hash_name).digest()
    key = hmac.new(key, host.encode(), hash_name).digest()
    if content_type.lower().startswith("multipart/"):
        body = b""
    body_hash = body_digest or hashlib.new(hash_name, body).hexdigest()
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
        # what an unknown access key is checked against, so that it costs the same
        self.dummy = Keypair("", secrets.token_urlsafe(30), 0, False, 0, 0)

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


@dataclass(frozen=True, slots=True)
class _Claim:
    """What a request says about itself in its headers."""
    hash_name: str
    access_key: str
    signature: str
    raw_date: str
    date: datetime


def _claim(request: web.Request) -> _Claim:
    header = request.headers.get("Authorization")
    if not header:
        raise AuthorizationFailed("This API needs a signed Authorization header.")
    hash_name, access_key, signature = parse_authorization(header)
    signature = normalized_signature(signature, hash_name)
    raw_date = request.headers.get("X-Sorna-Date") or request.headers.get("Date")
    if not raw_date:
        raise InvalidAuthParameters("A Date or X-Sorna-Date header is required.")
    date = parse_date(raw_date)
    check_date(date)
    if not ACCESS_KEY_FORMAT.fullmatch(access_key):
        raise AuthorizationFailed(BAD_CREDENTIAL)  # no such key can exist
    return _Claim(hash_name, access_key, signature, raw_date, date)


def _signed_upload_digest(request: web.Request, multipart: bool) -> str | None:
    value = request.headers.get(UPLOAD_DIGEST_HEADER)
    if value is None:
        return None
    if not multipart:
        raise InvalidAuthParameters(f"{UPLOAD_DIGEST_HEADER} is for multipart uploads only.")
    if len(value) != 64 or not HEX_FORMAT.fullmatch(value):
        raise InvalidAuthParameters(f"{UPLOAD_DIGEST_HEADER} must be 64 hexadecimal digits.")
    return value.lower()


def _matches(request: web.Request, keypair: Keypair, claim: _Claim, body_hash: str) -> bool:
    """Is `claim.signature` the signature of this request, made over the
    effective method, with `keypair`?  Same work whatever the answer."""
    signing_key = keypair.signing_key(claim.hash_name, claim.date.strftime("%Y%m%d"),
                                      request.host)
    version = request.headers.get(VERSION_HEADER, "")
    content_type = request.content_type
    # the async historic client sends multipart/mixed but signs multipart/form-data
    content_types = [content_type] + (["multipart/form-data"]
                                      if content_type.startswith("multipart/") else [])
    matched = False
    for ctype in content_types:
        message = string_to_sign(effective_method(request), request.raw_path, claim.raw_date,
                                 request.host, ctype, version, body_hash)
        expected = compute_signature(signing_key, claim.hash_name, message)
        matched |= hmac.compare_digest(expected, claim.signature)
    return matched


async def authenticate(request: web.Request) -> Keypair:
    """The keypair that signed `request`, or a 401/400 problem.  On success the
    request also carries its `REPLAY_GUARD` and, unless multipart, `SIGNED_BODY`."""
    claim = _claim(request)
    cache = request.app[keys.KEYPAIRS]
    keypair = await cache.get(claim.access_key)
    signer = keypair or cache.dummy
    multipart = request.content_type.startswith("multipart/")
    if multipart:  # the body is read by the handler, after this check
        digest = _signed_upload_digest(request, multipart)
        body_hash = digest or hashlib.new(claim.hash_name, b"").hexdigest()
        matched = _matches(request, signer, claim, body_hash)
        if digest is not None and matched:
            request[UPLOAD_DIGEST] = digest
    else:
        _signed_upload_digest(request, multipart)
        config = request.app[keys.CONFIG]
        async with pending_body(request, request.app[keys.PREAUTH_BUDGET], claim.hash_name,
                                max_size=config.max_request_body,
                                timeout=config.auth_body_timeout) as body:
            matched = _matches(request, signer, claim, body.hexdigest)
            if matched:
                request[SIGNED_BODY] = body.data()
    if keypair is None or not matched:
        hint = OVERRIDE_HINT if effective_method(request) != request.method else ""
        raise AuthorizationFailed(BAD_CREDENTIAL + hint)
    if not keypair.is_active:
        raise AuthorizationFailed("This access key is not active.")
    request[REPLAY_GUARD] = ReplayGuard(
        claim.signature,
        claim.date.timestamp() + MAX_CLOCK_SKEW.total_seconds() + REPLAY_MARGIN)
    return keypair


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    if is_public(request):
        return await handler(request)
    keypair = await authenticate(request)
    request[KEYPAIR] = keypair
    request[ACCESS_KEY] = keypair.access_key
    request.app[keys.ACTIVITY].note(keypair.access_key)
    return await handler(request)
