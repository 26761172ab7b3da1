"""Fixtures for the foundation tests: run `sorna` in-process through its real error boundary."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner, Result

from sorna_cli.main import cli
from sorna_server import schema
from sorna_server.config import load_config


class Sorna:
    """Call `sorna ARGS...` with CliRunner; results keep stdout and stderr apart."""

    def __init__(self, db_url: str | None = None):
        self.db_url = db_url
        self.runner = CliRunner()

    def __call__(self, *args: str, env: dict[str, str] | None = None,
                 db: bool = True) -> Result:
        argv = (["--db-url", self.db_url] if db and self.db_url else []) + list(args)
        result = self.runner.invoke(cli, argv, env=env, catch_exceptions=True)
        # The boundary never lets a traceback through (no --debug here).
        assert "Traceback" not in result.output, result.output
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result

    def json(self, *args: str, **kwargs: Any) -> Any:
        result = self(*args, "--json", **kwargs)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)


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
