"""The lazy shared CLI context stored in `ctx.obj`.

The config is loaded on first use, so `sorna --help` and `sorna keypair
generate` work without any config (and without importing the settings
loader); cleanups are registered on the click context with
`ctx.with_resource` / `ctx.call_on_close`.  Loading the config also applies
its `log_format` to the process's logging.
"""
from __future__ import annotations

from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import click

from sorna_server.logs import setup_logging

if TYPE_CHECKING:
    from sorna_server.config import SornaConfig

T = TypeVar("T")

# Exit codes shared by every command.
EXIT_FAILURE = 1     # the operation failed or was refused (database unreachable, ...)
EXIT_USAGE = 2       # bad input: flags, config values, unknown names, malformed files

REDIS_PING_TIMEOUT = 1.0


class OperatorError(click.ClickException):
    """An error with a one-line message (how to fix it) and a chosen exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it a ClassVar


@contextmanager
def operator_errors(*types: type[BaseException], exit_code: int = EXIT_FAILURE) -> Iterator[None]:
    """Turn the given core exceptions into one-line CLI errors."""
    try:
        yield
    except types as exc:
        raise OperatorError(str(exc), exit_code) from exc


class CliContext:
    def __init__(self, config_file: str | None, overrides: dict[str, Any], debug: bool):
        self.config_file = config_file
        self.overrides = overrides
        self.debug = debug
        self.service = False  # serve/agent: log at the configured level, not warnings only
        self._config: SornaConfig | None = None

    @property
    def config(self) -> SornaConfig:
        if self._config is None:
            from sorna_server.config import load_config

            self._config = load_config(self.config_file, **self.overrides)
            self._apply_logging(self._config)
        return self._config

    def reload(self, **more: Any) -> SornaConfig:
        """Rebuild the config with extra flag values from a subcommand."""
        self.overrides = {**self.overrides, **{k: v for k, v in more.items() if v is not None}}
        self._config = None
        return self.config

    def serve_logging(self) -> SornaConfig:
        """For long-running services: log at the configured level (DEBUG with --debug)."""
        self.service = True
        config = self.config
        self._apply_logging(config)
        return config

    def _apply_logging(self, config: SornaConfig) -> None:
        if self.debug:
            level = "DEBUG"
        else:
            level = config.log_level if self.service else "WARNING"
        setup_logging(level, config.log_format)

    def with_running_redis(self) -> SornaConfig:
        """The config, pointed at a Redis that runs now; never starts the embedded one.

        Operator commands act on the Redis the servers use: the configured one,
        or the embedded one of a `sorna serve` running on the same data
        directory.  When neither exists, say so (exit 1) instead of starting a
        throwaway Redis that would answer "nothing here".
        """
        config = self.config
        if config.explicit_redis_url is not None:
            return config
        url = running_embedded_redis(config)
        if url is None:
            raise OperatorError(
                f"no Redis: none is configured (redis_url / SORNA_REDIS_URL) and no embedded "
                f"Redis runs in {config.data_dir.resolve()} (start `sorna serve` there, or "
                f"pass --data-dir or --redis-url)", EXIT_FAILURE)
        from pydantic import SecretStr

        return config.model_copy(update={"redis_url": SecretStr(url)})


def running_embedded_redis(config: SornaConfig) -> str | None:
    """The URL of the embedded Redis of `config.data_dir` when it answers, else None."""
    socket_path = config.embedded_redis_socket
    if not socket_path.exists():
        return None
    import redis
    from redis.exceptions import RedisError

    client = redis.Redis(unix_socket_path=str(socket_path),
                         socket_connect_timeout=REDIS_PING_TIMEOUT,
                         socket_timeout=REDIS_PING_TIMEOUT)
    try:
        client.ping()
    except (RedisError, OSError):
        return None
    finally:
        client.close()
    return f"unix://{socket_path}"


pass_cli = click.make_pass_decorator(CliContext)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine for a CLI command (uvloop when available)."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
