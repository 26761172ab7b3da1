"""JSON fixtures: validated rows loaded into the database, idempotently.

A fixture file is one JSON object mapping table names to lists of row objects:

    {"keypairs": [{"user_id": 2, "access_key": "AKIA...", ...}]}

Every table and column is checked against `sorna_server.db.models`; an unknown
table or column is an error, never skipped.  `populate` inserts each row with
"on conflict do nothing" in one transaction, so a second run inserts nothing and
reports the rows it skipped.  The CLI (`sorna fixture`) and the tests share this
module.
"""
from __future__ import annotations

import importlib.resources
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

import sorna_server

from .db.models import metadata


class FixtureError(Exception):
    """Base class; the message is one line for the operator."""


class FixtureNotFound(FixtureError):
    pass


class FixtureInvalid(FixtureError):
    pass


@dataclass
class TableReport:
    table: str
    inserted: int = 0
    skipped: list[str] = field(default_factory=list)   # identities of rows already present

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.table, "inserted": self.inserted,
                "skipped": len(self.skipped), "skipped_rows": self.skipped}


@dataclass
class PopulateReport:
    fixture: str
    path: str
    tables: list[TableReport]

    @property
    def inserted(self) -> int:
        return sum(table.inserted for table in self.tables)

    @property
    def skipped(self) -> int:
        return sum(len(table.skipped) for table in self.tables)

    def as_dict(self) -> dict[str, Any]:
        return {"fixture": self.fixture, "path": self.path, "inserted": self.inserted,
                "skipped": self.skipped, "tables": [t.as_dict() for t in self.tables]}


# --- finding fixtures --------------------------------------------------------

def fixtures_dir() -> Path:
    """The shipped fixtures: inside the installed package, else the source tree."""
    try:
        path = Path(str(importlib.resources.files("sorna_server.fixtures")))
        if path.is_dir():
            return path
    except ModuleNotFoundError:
        pass
    return Path(sorna_server.__file__).resolve().parent.parent / "fixtures"


def available_fixtures() -> list[str]:
    """Names of the shipped fixtures (file names without `.json`)."""
    folder = fixtures_dir()
    if not folder.is_dir():
        return []
    return sorted(path.stem for path in folder.glob("*.json"))


def _looks_like_path(name_or_path: str) -> bool:
    return (os.sep in name_or_path or "/" in name_or_path
            or name_or_path.endswith(".json") or Path(name_or_path).is_file())


def resolve_fixture(name_or_path: str | os.PathLike) -> Path:
    """The file for a shipped fixture name, or the given path; FixtureNotFound otherwise."""
    text = os.fspath(name_or_path)
    if _looks_like_path(text):
        path = Path(text)
        if not path.exists():
            raise FixtureNotFound(f"fixture file {path} does not exist")
        if not path.is_file():
            raise FixtureNotFound(f"fixture {path} is not a file")
        return path
    path = fixtures_dir() / f"{text}.json"
    if not path.is_file():
        names = ", ".join(available_fixtures()) or "none"
        raise FixtureNotFound(f"unknown fixture {text!r}; available: {names} (or give a path "
                              "to a .json file)")
    return path


# --- validating ---------------------------------------------------------------

def _convert(column: sa.Column, value: Any) -> Any:  # noqa: C901  (one branch per column type)
    """Check one value against its column type; return the value to insert."""
    if value is None:
        if not column.nullable:
            raise ValueError("must not be null")
        return None
    kind = column.type
    if isinstance(kind, sa.Boolean):
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if isinstance(kind, sa.Integer):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value
    if isinstance(kind, sa.DateTime):
        if not isinstance(value, str):
            raise ValueError(f"expected an ISO 8601 date-time string, got {value!r}")
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"expected an ISO 8601 date-time, got {value!r}") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if isinstance(kind, sa.String):
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        if kind.length is not None and len(value) > kind.length:
            raise ValueError(f"longer than {kind.length} characters")
        return value
    return value


def _required(column: sa.Column) -> bool:
    if column.nullable or column.server_default is not None or column.default is not None:
        return False
    return not (column.primary_key and column.autoincrement is True)


def validate_fixture(  # noqa: C901  (one flat check per fixture rule)
        data: Any, source: str) -> dict[str, list[dict[str, Any]]]:
    """Check parsed JSON against the tables; FixtureInvalid names the file and the problem."""
    def fail(problem: str) -> FixtureInvalid:
        return FixtureInvalid(f"fixture {source}: {problem}")

    if not isinstance(data, dict):
        raise fail("expected a JSON object mapping table names to lists of rows")
    if not data:
        raise fail("it has no tables")
    result: dict[str, list[dict[str, Any]]] = {}
    for table_name, rows in data.items():
        table = metadata.tables.get(table_name)
        if table is None:
            known = ", ".join(sorted(metadata.tables))
            raise fail(f"unknown table {table_name!r} (tables: {known})")
        if not isinstance(rows, list):
            raise fail(f"{table_name}: expected a list of rows")
        checked_rows = []
        for index, row in enumerate(rows):
            where = f"{table_name}[{index}]"
            if not isinstance(row, dict):
                raise fail(f"{where}: expected an object")
            unknown = sorted(set(row) - set(table.columns.keys()))
            if unknown:
                raise fail(f"{where}: unknown column {unknown[0]!r} of table {table_name}")
            missing = [c.name for c in table.columns if _required(c) and c.name not in row]
            if missing:
                raise fail(f"{where}: missing required column {missing[0]!r}")
            checked = {}
            for name, value in row.items():
                try:
                    checked[name] = _convert(table.columns[name], value)
                except ValueError as exc:
                    raise fail(f"{where}.{name}: {exc}") from None
            checked_rows.append(checked)
        result[table_name] = checked_rows
    return result


def load_fixture(name_or_path: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """Read and validate a fixture by shipped name or by path."""
    path = resolve_fixture(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FixtureInvalid(f"fixture {path}: cannot read it: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FixtureInvalid(f"fixture {path}: invalid JSON at line {exc.lineno} "
                             f"column {exc.colno}: {exc.msg}") from None
    return validate_fixture(data, str(path))


def describe_fixtures() -> list[dict[str, Any]]:
    """Each shipped fixture with its tables and row counts (or the problem with it)."""
    described = []
    for name in available_fixtures():
        path = fixtures_dir() / f"{name}.json"
        entry: dict[str, Any] = {"name": name, "path": str(path)}
        try:
            entry["tables"] = {table: len(rows) for table, rows in load_fixture(path).items()}
        except FixtureError as exc:
            entry["tables"] = {}
            entry["error"] = str(exc)
        described.append(entry)
    return described


# --- populating ---------------------------------------------------------------

def _insert_ignoring_duplicates(dialect_name: str, table: sa.Table) -> Any:
    if dialect_name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if dialect_name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    raise FixtureError(f"fixtures support postgresql and sqlite, not {dialect_name}")


def _identity(table: sa.Table, row: dict[str, Any], index: int) -> str:
    keys = [c.name for c in table.primary_key.columns if c.name in row]
    if not keys:
        keys = [c.name for c in table.columns if c.unique and c.name in row]
    if not keys:
        return f"row {index}"
    return ", ".join(f"{key}={row[key]}" for key in keys)


def _first_line(exc: BaseException) -> str:
    reason = getattr(exc, "orig", None) or exc
    text = str(reason).strip()
    if text.startswith("<class '") and "'>: " in text:
        text = text.split("'>: ", 1)[1]
    return text.splitlines()[0] if text else reason.__class__.__name__


async def populate(engine: AsyncEngine, name_or_path: str | os.PathLike) -> PopulateReport:
    """Insert the fixture's rows that are not there yet (all in one transaction)."""
    path = resolve_fixture(name_or_path)
    data = load_fixture(path)
    name = path.stem
    reports: list[TableReport] = []
    async with engine.begin() as conn:
        present = set(await conn.run_sync(
            lambda sync_conn: sa.inspect(sync_conn).get_table_names()))
        missing = sorted(set(data) - present)
        if missing:
            raise FixtureError(f"the database has no table {missing[0]!r}; "
                               "run `sorna schema oneshot head` first")
        for table in metadata.sorted_tables:       # parents before children
            rows = data.get(table.name)
            if rows is None:
                continue
            report = TableReport(table.name)
            statement = _insert_ignoring_duplicates(conn.dialect.name, table)
            for index, row in enumerate(rows):
                try:
                    result = await conn.execute(statement, row)
                except sa.exc.IntegrityError as exc:
                    raise FixtureInvalid(f"fixture {path}: {table.name}[{index}] was refused by "
                                         f"the database: {_first_line(exc)}") from None
                if result.rowcount:
                    report.inserted += 1
                else:
                    report.skipped.append(_identity(table, row, index))
            reports.append(report)
    return PopulateReport(fixture=name, path=str(path), tables=reports)
