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

    from sorna_server.datadir import prepare_data_dir

    from .agent import serve
    from .sandbox.workdirs import enter_private_mount_namespace

    prepare_data_dir(config.data_dir)
    # before any thread exists: until then a mount namespace is the whole process's
    private = config.agent_isolation != "none" and enter_private_mount_namespace()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config, private_mounts=private))
    else:
        uvloop.run(serve(config, private_mounts=private))
