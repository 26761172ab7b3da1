"""Fixtures for gateway tests: the real app (factory) on a real port, real Redis,
a real database with the schema and keypairs, and real reference agents.

`gateway_factory(**config_overrides)` starts the app through `aiohttp_client`
and returns a `Gateway` whose `request()` signs requests exactly as the
historic client does.  `gateway_factory(agents=1)` also starts a reference
agent reporting to the gateway's event port and waits until it is registered.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import pytest
import redis as sync_redis
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestClient

from sorna_server import keypairs as keypair_api
from sorna_server.config import SornaConfig
from sorna_server.db.engine import create_engine
from sorna_server.db.models import keypairs
from sorna_server.fixture_loader import populate
from sorna_server.gateway import keys
from sorna_server.gateway.app import create_app
from sorna_server.schema import ensure_schema

EXAMPLE_ACCESS = "AKIAIOSFODNN7EXAMPLE"
EXAMPLE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
OTHER_ACCESS = "AKIAOTHERKEY00000001"
OTHER_SECRET = "otherSecretKey0123456789abcdefghijklmnop"
VERSION = "v2.20170315"
PROBLEM = "https://api.sorna.io/probs/"
PG_URL_ENV = os.environ.get("SORNA_TEST_DB_URL")


from ..conftest import wait_for  # noqa: E402,F401  (re-exported for the gateway tests)


def client_signature(method: str, path: str, date: str, host: str, content_type: str,
                     body: bytes, secret: str, version: str = VERSION,
                     hash_name: str = "sha256", day: str | None = None) -> str:
    """An independent copy of the historic client's signing (sorna/auth.py)."""
    if content_type.startswith("multipart/"):
        body = b""
    body_hash = hashlib.new(hash_name, body).hexdigest()
    text = f"{method}\n{path}\n{date}\nhost:{host}\ncontent-type:{content_type}\n" \
           f"x-sorna-version:{version}\n{body_hash}"
    day = day or datetime.fromisoformat(date).strftime("%Y%m%d")
    key = hmac.new(secret.encode(), day.encode(), hash_name).digest()
    key = hmac.new(key, host.encode(), hash_name).digest()
    return hmac.new(key, text.encode(), hash_name).hexdigest()


@dataclass
class Gateway:
    config: SornaConfig
    client: TestClient
    agents: list = field(default_factory=list)

    @property
    def app(self) -> web.Application:
        return self.client.server.app

    @property
    def host(self) -> str:
        return f"{self.client.server.host}:{self.client.server.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def sign_headers(self, method: str, path: str, body: bytes = b"", *,
                     access_key: str = EXAMPLE_ACCESS, secret: str = EXAMPLE_SECRET,
                     content_type: str = "application/json", version: str = VERSION,
                     date: datetime | None = None) -> dict[str, str]:
        date_text = (date or datetime.now(timezone.utc)).isoformat()
        signature = client_signature(method, path, date_text, self.host, content_type, body,
                                     secret, version)
        return {"Date": date_text, "X-Sorna-Version": version, "Content-Type": content_type,
                "Authorization": f"Sorna signMethod=HMAC-SHA256, "
                                 f"credential={access_key}:{signature}"}

    async def request(self, method: str, path: str, body: Any = None, *,
                      access_key: str = EXAMPLE_ACCESS, secret: str = EXAMPLE_SECRET,
                      raw: bytes | None = None, headers: dict[str, str] | None = None,
                      **sign_args: Any) -> tuple[int, dict[str, str], Any]:
        """Send a signed request; returns (status, headers, decoded JSON or text)."""
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        all_headers = self.sign_headers(method, path, data, access_key=access_key,
                                        secret=secret, **sign_args)
        all_headers.update(headers or {})
        async with self.client.request(method, path, data=data, headers=all_headers) as resp:
            text = await resp.text()
            try:
                payload = json.loads(text) if text else None
            except ValueError:
                payload = text
            return resp.status, dict(resp.headers), payload

    async def create_kernel(self, lang: str = "python3", token: str | None = None,
                            **kwargs: Any) -> str:
        status, _, body = await self.request("POST", "/v2/kernel/create", {
            "lang": lang, "clientSessionToken": token or uuid.uuid4().hex}, **kwargs)
        assert status == 201, body
        return body["kernelId"]

    async def execute(self, kernel_id: str, code: str, mode: str = "query",
                      **kwargs: Any) -> tuple[int, Any]:
        status, _, body = await self.request("POST", f"/v2/kernel/{kernel_id}",
                                             {"mode": mode, "code": code, **kwargs})
        return status, body

    async def scalar(self, statement: Any) -> Any:
        async with self.app[keys.DB].connect() as conn:
            return (await conn.execute(statement)).scalar()

    async def slots_used(self, access_key: str = EXAMPLE_ACCESS) -> int:
        return await self.scalar(sa.select(keypairs.c.concurrency_used)
                                 .where(keypairs.c.access_key == access_key))


def flush_redis(url: str, config: SornaConfig) -> None:
    for db in (config.redis_db_kernels, config.redis_db_instances, config.redis_db_sessions,
               config.redis_db_ratelimit):
        client = sync_redis.Redis.from_url(url, db=db)
        try:
            client.flushdb()
        finally:
            client.close()


async def prepare_database(config: SornaConfig, *, other_concurrency: int = 2) -> None:
    await ensure_schema(config)
    engine = create_engine(config)
    try:
        await populate(engine, "example_keypair")
        await keypair_api.create_keypair(engine, 3, concurrency_limit=other_concurrency,
                                         rate_limit=1000, access_key=OTHER_ACCESS,
                                         secret_key=OTHER_SECRET)
    finally:
        await engine.dispose()


@pytest.fixture
def gateway_redis_url(embedded_redis_url) -> str:
    """The Redis of gateway tests: the embedded one (test modules may override this
    fixture with `redis_url` to also run against the real server)."""
    return embedded_redis_url


@pytest.fixture
def gateway_config(make_config, db_url, gateway_redis_url) -> Callable[..., SornaConfig]:
    """Config on a fresh database (sqlite, and postgresql when configured) and a
    flushed Redis."""
    def build(**overrides: Any) -> SornaConfig:
        values: dict[str, Any] = {"db_url": db_url, "redis_url": gateway_redis_url,
                                  "heartbeat_interval": 0.5, "keypair_cache_ttl": 0.5,
                                  "agent_rpc_timeout": 5.0, "log_level": "INFO"}
        values.update(overrides)
        config = make_config(**values)
        flush_redis(config.explicit_redis_url, config)
        return config
    return build


@pytest.fixture
async def gateway_factory(gateway_config, aiohttp_client, agent_factory):
    async def start(*, agents: int = 0, agent_flags: dict[str, Any] | None = None,
                    prepare: bool = True, **overrides: Any) -> Gateway:
        config = gateway_config(**overrides)
        if prepare:
            await prepare_database(config)
        client = await aiohttp_client(create_app(config))
        gateway = Gateway(config, client)
        for _ in range(agents):
            gateway.agents.append(await asyncio.to_thread(
                agent_factory, config.events_port, heartbeat_interval=0.5,
                **(agent_flags or {})))
        if agents:
            registry = gateway.app[keys.REGISTRY]

            async def all_registered() -> bool:
                addrs = {i.addr for i in await registry.list_instances() if i.status == "running"}
                return all(agent.addr in addrs for agent in gateway.agents)
            await wait_for(all_registered)
        return gateway
    return start
