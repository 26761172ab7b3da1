"""The lazy shared CLI context stored in `ctx.obj`.

The config is loaded on first use, so `sorna --help` and `sorna keypair
generate` work without any config; cleanups are registered on the click
context with `ctx.with_resource` / `ctx.call_on_close`.
"""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from sorna_server.config import SornaConfig, load_config

T = TypeVar("T")

# Exit codes shared by every command.
EXIT_FAILURE = 1     # the operation failed or was refused (database unreachable, ...)
EXIT_USAGE = 2       # bad input: flags, config values, unknown names, malformed files


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
        self._config: SornaConfig | None = None

    @property
    def config(self) -> SornaConfig:
        if self._config is None:
            self._config = load_config(self.config_file, **self.overrides)
        return self._config

    def reload(self, **more: Any) -> SornaConfig:
        """Rebuild the config with extra flag values from a subcommand."""
        self.overrides = {**self.overrides, **{k: v for k, v in more.items() if v is not None}}
        self._config = None
        return self.config


pass_cli = click.make_pass_decorator(CliContext)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine for a CLI command (uvloop when available)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
