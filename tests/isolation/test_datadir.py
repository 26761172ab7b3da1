"""The data directory is 0700 and the server's files in it are created 0600."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sorna_server.datadir import prepare_data_dir
from sorna_server.redis_conn import EmbeddedRedis


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def usual_umask():
    """Start from the usual 022 (and restore the test process's umask after)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_data_dir_is_created_private_and_files_in_it_too(tmp_path, usual_umask):
    parent = tmp_path / "srv"
    parent.mkdir(mode=0o755)
    data_dir = prepare_data_dir(parent / "sorna-data")
    assert _mode(data_dir) == 0o700
    (data_dir / "sorna.db").write_text("keys")
    assert _mode(data_dir / "sorna.db") == 0o600


def test_an_open_data_dir_is_tightened(tmp_path, usual_umask):
    data_dir = tmp_path / "open"
    data_dir.mkdir(mode=0o755)
    prepare_data_dir(data_dir)
    assert _mode(data_dir) == 0o700


async def test_embedded_redis_files_are_private(tmp_path, usual_umask):
    server = EmbeddedRedis(tmp_path / "data")
    await server.start()
    try:
        assert _mode(tmp_path / "data") == 0o700
        assert _mode(server.socket_path) & 0o077 == 0
        assert _mode(tmp_path / "data" / "redis.log") == 0o600
    finally:
        await server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the kernel sandbox needs root")
def test_standalone_banner_says_which_protections_are_off(serve, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SORNA_AGENT_CGROUPS", "none")  # as on a host without cgroups
    server, _ = serve("--standalone")
    server.wait_ready()
    banner = server.log()
    assert "kernel sandbox OFF on this host: cgroup limits" in banner
    assert "private filesystem view" not in banner  # that one is on
    data_dir = server.cwd / "sorna-data"
    assert _mode(data_dir) == 0o700
    for name in ("sorna.db", "agent.log", "redis.log"):
        assert _mode(data_dir / name) == 0o600, name
    assert server.stop() == 0
