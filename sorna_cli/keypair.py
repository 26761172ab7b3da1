"""`sorna keypair`: generate, create, list and deactivate API keypairs."""
from __future__ import annotations

from typing import Any

import click

from .context import EXIT_USAGE, CliContext, operator_errors, pass_cli, run_async
from .output import json_option, note, print_json, print_table

# What `keypair create` stores when not told otherwise: the same values as
# sorna_server.keypairs.DEFAULT_* (kept here so `--help` needs no database code;
# a test checks that they agree).
DEFAULT_CONCURRENCY_LIMIT = 30
DEFAULT_RATE_LIMIT = 1000
DEFAULT_BILLING_PLAN = "free"

# (heading, row -> cell) for the people's table; --json gives every field.
LIST_COLUMNS: list[tuple[str, Any]] = [
    ("access key", lambda r: r["access_key"]),
    ("secret key", lambda r: r["secret_key"]),
    ("user", lambda r: r["user_id"]),
    ("active", lambda r: "yes" if r["is_active"] else "no"),
    ("plan", lambda r: r["billing_plan"]),
    ("kernels", lambda r: f"{r['concurrency_used']}/{r['concurrency_limit']}"),
    ("rate limit", lambda r: r["rate_limit"]),
    ("queries", lambda r: r["num_queries"]),
    ("created", lambda r: r["created_at"].strftime("%Y-%m-%d %H:%M") if r["created_at"] else ""),
]


@click.group()
def keypair() -> None:
    """Manage API keypairs."""


def _show_pair(access_key: str, secret_key: str) -> None:
    click.echo(f"access key: {access_key}")
    click.echo(f"secret key: {secret_key}")


@keypair.command()
@json_option
def generate(as_json: bool) -> None:
    """Print a new random keypair (nothing is stored)."""
    from sorna_server.keypairs import generate_keypair

    access_key, secret_key = generate_keypair()
    if as_json:
        print_json({"access_key": access_key, "secret_key": secret_key})
    else:
        _show_pair(access_key, secret_key)


async def _with_engine(cli: CliContext, action: Any, *args: Any, **kwargs: Any) -> Any:
    from sorna_server.schema import open_ready_database

    async with open_ready_database(cli.config) as engine:
        return await action(engine, *args, **kwargs)


@keypair.command()
@click.option("--user-id", type=int, required=True, help="Owner of the keypair.")
@click.option("--concurrency-limit", type=click.IntRange(min=0),
              default=DEFAULT_CONCURRENCY_LIMIT, show_default=True,
              help="Kernels the keypair may run at once.")
@click.option("--rate-limit", type=click.IntRange(min=1), default=DEFAULT_RATE_LIMIT,
              show_default=True, help="Requests per 15-minute window.")
@click.option("--billing-plan", default=DEFAULT_BILLING_PLAN, show_default=True)
@click.option("--access-key", help="Use this access key (with --secret-key) instead of a new one.")
@click.option("--secret-key", help="Use this secret key (with --access-key).")
@json_option
@pass_cli
def create(cli: CliContext, user_id: int, concurrency_limit: int, rate_limit: int,
           billing_plan: str, access_key: str | None, secret_key: str | None,
           as_json: bool) -> None:
    """Store a keypair for a user and print it."""
    from sorna_server import keypairs as core
    from sorna_server.schema import SchemaMissing

    # the innermost (last) handler sees the error first: specific ones go last.
    with operator_errors(core.KeypairError, exit_code=EXIT_USAGE), \
            operator_errors(core.KeypairExists, SchemaMissing):
        row = run_async(_with_engine(
            cli, core.create_keypair, user_id, concurrency_limit=concurrency_limit,
            rate_limit=rate_limit, billing_plan=billing_plan,
            access_key=access_key, secret_key=secret_key))
    if as_json:
        print_json(row)
    else:
        _show_pair(row["access_key"], row["secret_key"])


@keypair.command(name="list")
@click.option("--show-secret", is_flag=True, help="Include the secret keys.")
@click.option("--user-id", type=int, help="Only this user's keypairs.")
@click.option("--active-only", is_flag=True, help="Only active keypairs.")
@json_option
@pass_cli
def list_(cli: CliContext, show_secret: bool, user_id: int | None, active_only: bool,
          as_json: bool) -> None:
    """List keypairs (secret keys hidden unless --show-secret)."""
    from sorna_server import keypairs as core
    from sorna_server.schema import SchemaMissing

    with operator_errors(SchemaMissing):
        rows = run_async(_with_engine(cli, core.list_keypairs, user_id=user_id,
                                      active_only=active_only))
    if not show_secret:
        for row in rows:
            row.pop("secret_key", None)
    if as_json:
        print_json(rows)
        return
    if not rows:
        note("No keypairs yet: `sorna keypair create --user-id N` makes one.")
        return
    columns = [(head, cell) for head, cell in LIST_COLUMNS if show_secret or head != "secret key"]
    print_table([head for head, _ in columns], ([cell(row) for _, cell in columns] for row in rows))


def _set_active(cli: CliContext, access_key: str, active: bool, as_json: bool) -> None:
    from sorna_server import keypairs as core
    from sorna_server.schema import SchemaMissing

    with operator_errors(core.KeypairNotFound, SchemaMissing):
        changed = run_async(_with_engine(cli, core.set_keypair_active, access_key, active))
    state = "active" if active else "inactive"
    if as_json:
        print_json({"access_key": access_key, "is_active": active, "changed": changed})
    elif changed:
        click.echo(f"Keypair {access_key} is now {state}.")
    else:
        click.echo(f"Keypair {access_key} was already {state}.")


@keypair.command()
@click.argument("access_key")
@json_option
@pass_cli
def deactivate(cli: CliContext, access_key: str, as_json: bool) -> None:
    """Refuse requests signed with ACCESS_KEY from now on."""
    _set_active(cli, access_key, False, as_json)


@keypair.command()
@click.argument("access_key")
@json_option
@pass_cli
def activate(cli: CliContext, access_key: str, as_json: bool) -> None:
    """Accept requests signed with ACCESS_KEY again."""
    _set_active(cli, access_key, True, as_json)
