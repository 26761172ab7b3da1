"""`sorna schema` on SQLite and PostgreSQL; the models and the migrations agree."""
from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from sorna_server import schema
from sorna_server.config import load_config
from sorna_server.db.engine import open_database
from sorna_server.db.models import metadata

# The newest revision, read from the shipped scripts alone (no settings are loaded at
# import time, so a developer's sorna.toml or SORNA_* variables cannot break collection).
HEAD = ScriptDirectory(str(schema.migrations_dir())).get_current_head()
TABLES = ["kernels", "keypairs", "usage"]


def _differences(conn: Connection) -> list:
    context = MigrationContext.configure(
        conn, opts={"compare_type": True, "compare_server_default": True})
    return compare_metadata(context, metadata)


async def _diff_against_models(db_url: str) -> list:
    async with open_database(load_config(None, db_url=db_url)) as engine:
        async with engine.connect() as conn:
            return await conn.run_sync(_differences)


async def test_migrations_match_models(db_url: str) -> None:
    """Running the migration scripts gives exactly the tables of models.py."""
    before, after = await schema.upgrade(load_config(None, db_url=db_url))
    assert before.revisions == [] and after.revisions == [HEAD]
    assert await _diff_against_models(db_url) == []


async def test_oneshot_matches_models(db_url: str) -> None:
    status = await schema.oneshot(load_config(None, db_url=db_url))
    assert status.up_to_date and status.tables == TABLES
    assert await _diff_against_models(db_url) == []


def test_single_head_and_history(sorna) -> None:
    revisions = sorna.json("schema", "history")
    assert HEAD is not None
    assert [r["revision"] for r in revisions if r["is_head"]] == [HEAD]
    assert revisions[0]["revision"] == schema.history(load_config())[0]["revision"] == HEAD
    assert revisions[-1]["down_revision"] is None
    assert all(r["description"] for r in revisions)


def test_oneshot_then_refuse(sorna) -> None:
    status = sorna.json("schema", "current")
    assert status["revisions"] == [] and status["tables"] == [] and not status["up_to_date"]

    created = sorna.json("schema", "oneshot", "head")
    assert created["revisions"] == [HEAD] and created["tables"] == TABLES

    again = sorna("schema", "oneshot", "head")
    assert again.exit_code == 1
    assert again.stderr.count("\n") == 1
    assert "already has tables" in again.stderr and "sorna schema upgrade" in again.stderr

    status = sorna.json("schema", "current")
    assert status["revisions"] == [HEAD] and status["up_to_date"]


def test_upgrade_on_empty_then_noop(sorna) -> None:
    result = sorna("schema", "upgrade")
    assert result.exit_code == 0, result.output
    assert f"to {HEAD}" in result.stdout
    result = sorna("schema", "upgrade", "head")
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.stdout
    assert sorna.json("schema", "current")["up_to_date"]


def test_upgrade_to_explicit_revision(sorna) -> None:
    moved = sorna.json("schema", "upgrade", HEAD)
    assert moved["before"]["revisions"] == [] and moved["after"]["revisions"] == [HEAD]


def test_upgrade_unknown_revision_is_one_line(sorna) -> None:
    result = sorna("schema", "upgrade", "deadbeef0000")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: upgrade failed:") and "deadbeef0000" in result.stderr
    assert result.stderr.count("\n") == 1


def test_oneshot_only_builds_head(sorna) -> None:
    result = sorna("schema", "oneshot", "base")
    assert result.exit_code == 1
    assert "sorna schema upgrade base" in result.stderr


def test_alembic_ini_may_point_elsewhere(sorna, tmp_path: Path) -> None:
    """`-f alembic.ini`: its script_location is used; the database still comes from Sorna."""
    ini = tmp_path / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {schema.migrations_dir()}\n"
                   "sqlalchemy.url = sqlite:////nonexistent/ignored.db\n")
    created = sorna.json("schema", "-f", str(ini), "oneshot")
    assert created["revisions"] == [HEAD]
    assert sorna.json("schema", "--config-file", str(ini), "current")["up_to_date"]

    missing = sorna("schema", "-f", str(tmp_path / "missing.ini"), "current")
    assert missing.exit_code == 1 and "missing.ini does not exist" in missing.stderr


async def test_ensure_schema_creates_then_keeps(db_url: str) -> None:
    config = load_config(None, db_url=db_url)
    assert await schema.ensure_schema(config) == "created"
    assert await schema.ensure_schema(config) == "current"
    assert (await schema.current(config)).up_to_date


async def test_ensure_schema_refuses_foreign_tables(db_url: str) -> None:
    config = load_config(None, db_url=db_url)
    async with open_database(config) as engine:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("CREATE TABLE something_else (id INTEGER)")
    with pytest.raises(schema.SchemaMissing, match="no alembic version"):
        await schema.ensure_schema(config)
    with pytest.raises(schema.SchemaError, match="already has tables"):
        await schema.oneshot(config)


def test_commands_need_a_schema(sorna) -> None:
    result = sorna("keypair", "list")
    assert result.exit_code == 1
    assert "has no Sorna schema" in result.stderr and "sorna schema oneshot head" in result.stderr


def test_plain_alembic_command_uses_sorna_settings(sorna, db_url: str, tmp_path: Path) -> None:
    """`alembic -c alembic.ini upgrade head` reads the database from SORNA_DB_URL too."""
    import os
    import subprocess
    import sys

    ini = tmp_path / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {schema.migrations_dir()}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SORNA_")}
    result = subprocess.run([sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "head"],
                            env={**env, "SORNA_DB_URL": db_url}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorna.json("schema", "current")["revisions"] == [HEAD]
