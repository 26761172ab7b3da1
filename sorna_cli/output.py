"""All terminal output of the CLI: rich tables for people, JSON for scripts.

rich is imported when something is printed, not when a command module loads.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.console import Console

json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print JSON for scripts instead of a table.")


def _default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_default, sort_keys=False))


PIPE_WIDTH = 200   # width for tables written to a pipe or file (no terminal to fit)


def console(stderr: bool = False) -> Console:
    from rich.console import Console

    out = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out.width = PIPE_WIDTH
    return out


def print_table(columns: Sequence[str], rows: Iterable[Sequence[Any]],
                title: str | None = None) -> None:
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for index, column in enumerate(columns):
        # the first column is the identifier: never wrapped, so it can be copied
        table.add_column(column, overflow="fold", no_wrap=index == 0)
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    console().print(table)


def print_fields(fields: dict[str, Any], title: str | None = None) -> None:
    print_table(("field", "value"), fields.items(), title=title)


def note(message: str) -> None:
    """A status line for people (stderr, so stdout stays clean for pipes)."""
    console(stderr=True).print(message)
