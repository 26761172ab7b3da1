"""The reference Sorna agent: runs sandboxed kernels on one host.

`run(config)` blocks until SIGTERM/SIGINT, then destroys every kernel (each
reported with kernel_terminated), sends instance_terminated and returns.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sorna_server.config import SornaConfig


class AgentStartError(Exception):
    """The agent cannot start: bad address, port in use, no usable language."""


def run(config: SornaConfig) -> None:
    import asyncio

    from .agent import serve
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
