"""Fixtures for the foundation tests: run `sorna` in-process through its real error boundary."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from sorna_server import schema
from sorna_server.config import load_config
from tests.helpers import Sorna


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads a developer's ./sorna.toml or writes ./sorna-data in the tree."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def sorna_no_db() -> Sorna:
    """`sorna` with no database flag (commands that need none, or the embedded default)."""
    return Sorna()


@pytest.fixture
def sorna(db_url: str) -> Sorna:
    """`sorna` against an empty database of each backend."""
    return Sorna(db_url)


@pytest.fixture
def ready_db_url(db_url: str) -> str:
    """A database of each backend with the schema created."""
    asyncio.run(schema.oneshot(load_config(None, db_url=db_url)))
    return db_url


@pytest.fixture
def ready_sorna(ready_db_url: str) -> Sorna:
    """`sorna` against a database that has the schema."""
    return Sorna(ready_db_url)


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, str], Path]:
    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return write
