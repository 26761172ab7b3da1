"""`sorna fixture`: load JSON fixtures (such as the example keypair) into the database."""
from __future__ import annotations

from typing import TYPE_CHECKING

import click

from .context import EXIT_USAGE, CliContext, operator_errors, pass_cli, run_async
from .output import json_option, print_json, print_table

if TYPE_CHECKING:
    from sorna_server import fixture_loader as core


@click.group()
def fixture() -> None:
    """Load JSON fixtures into the database."""


async def _populate(cli: CliContext, name_or_path: str) -> core.PopulateReport:
    from sorna_server import fixture_loader as core
    from sorna_server.schema import open_ready_database

    core.load_fixture(name_or_path)      # bad input fails before touching the database
    async with open_ready_database(cli.config) as engine:
        return await core.populate(engine, name_or_path)


@fixture.command()
@click.argument("name_or_path")
@json_option
@pass_cli
def populate(cli: CliContext, name_or_path: str, as_json: bool) -> None:
    """Insert a fixture's rows (NAME of a shipped fixture, or PATH to a .json file).

    Idempotent: rows already present (same key) are skipped and reported.
    """
    from sorna_server import fixture_loader as core
    from sorna_server.schema import SchemaMissing

    # the innermost (last) handler sees the error first: specific ones go last.
    with operator_errors(core.FixtureError, SchemaMissing), \
            operator_errors(core.FixtureNotFound, core.FixtureInvalid, exit_code=EXIT_USAGE):
        report = run_async(_populate(cli, name_or_path))
    if as_json:
        print_json(report.as_dict())
        return
    for table in report.tables:
        click.echo(f"{report.fixture}: {table.table}: inserted {table.inserted} row(s), "
                   f"skipped {len(table.skipped)} already present"
                   + (f" ({'; '.join(table.skipped)})" if table.skipped else ""))


@fixture.command(name="list")
@json_option
def list_(as_json: bool) -> None:
    """List the shipped fixtures with their tables and row counts."""
    from sorna_server import fixture_loader as core

    described = core.describe_fixtures()
    if as_json:
        print_json(described)
        return
    rows = []
    for entry in described:
        if "error" in entry:
            rows.append((entry["name"], "-", "-", entry["error"]))
        for table, count in entry["tables"].items():
            rows.append((entry["name"], table, count, ""))
    print_table(("fixture", "table", "rows", "problem"), rows)
