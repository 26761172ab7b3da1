"""`sorna schema`: create, migrate and inspect the database schema."""
from __future__ import annotations

from typing import Any

import click

from .context import CliContext, operator_errors, pass_cli, run_async
from .output import json_option, print_json, print_table


def _revision(revisions: list[str]) -> str:
    return ", ".join(revisions) if revisions else "none"


@click.group()
@click.option("-f", "--config-file", "alembic_ini", type=click.Path(dir_okay=False),
              help="An alembic.ini to use (its script_location only; the database always "
                   "comes from Sorna's config).")
@click.pass_context
def schema(ctx: click.Context, alembic_ini: str | None) -> None:
    """Create, migrate and inspect the database schema."""
    ctx.meta["sorna.alembic_ini"] = alembic_ini


def _alembic_ini() -> str | None:
    return click.get_current_context().meta.get("sorna.alembic_ini")


@schema.command()
@click.argument("rev", default="head")
@json_option
@pass_cli
def oneshot(cli: CliContext, rev: str, as_json: bool) -> None:
    """Create the newest schema on an EMPTY database and stamp it (REV: head)."""
    from sorna_server import schema as core

    with operator_errors(core.SchemaError):
        status = run_async(core.oneshot(cli.config, rev, ini_file=_alembic_ini()))
    if as_json:
        print_json(status.as_dict())
    else:
        click.echo(f"Created the schema on {status.url} at revision {_revision(status.revisions)}"
                   f" ({', '.join(status.tables)}).")


@schema.command()
@click.argument("rev", default="head")
@json_option
@pass_cli
def upgrade(cli: CliContext, rev: str, as_json: bool) -> None:
    """Run the migrations up to REV (default: head)."""
    from sorna_server import schema as core

    with operator_errors(core.SchemaError):
        before, after = run_async(core.upgrade(cli.config, rev, ini_file=_alembic_ini()))
    if as_json:
        print_json({"before": before.as_dict(), "after": after.as_dict()})
    elif before.revisions == after.revisions:
        click.echo(f"{after.url} is already at revision {_revision(after.revisions)}; "
                   "nothing to do.")
    else:
        click.echo(f"Upgraded {after.url} from revision {_revision(before.revisions)} "
                   f"to {_revision(after.revisions)}.")


@schema.command()
@json_option
@pass_cli
def current(cli: CliContext, as_json: bool) -> None:
    """Show the revision the database is at."""
    from sorna_server import schema as core

    with operator_errors(core.SchemaError):
        status = run_async(core.current(cli.config, ini_file=_alembic_ini()))
    if as_json:
        print_json(status.as_dict())
        return
    if status.up_to_date:
        state = "head, up to date"
    elif not status.revisions:
        state = ("no schema; run `sorna schema oneshot head`" if not status.tables
                 else "tables without an alembic version")
    else:
        state = f"behind head {status.head}; run `sorna schema upgrade`"
    click.echo(f"{status.url}: revision {_revision(status.revisions)} ({state})")


@schema.command()
@json_option
@pass_cli
def history(cli: CliContext, as_json: bool) -> None:
    """List the migration scripts, newest first."""
    from sorna_server import schema as core

    with operator_errors(core.SchemaError):
        revisions: list[dict[str, Any]] = core.history(cli.config, ini_file=_alembic_ini())
    if as_json:
        print_json(revisions)
        return
    print_table(("revision", "revises", "head", "description"),
                ((r["revision"], r["down_revision"] or "-", "yes" if r["is_head"] else "",
                  r["description"]) for r in revisions))
