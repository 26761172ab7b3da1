"""`sorna keys`: CurveZMQ keypairs for gateways and agents (docs/security.md)."""
from __future__ import annotations

from pathlib import Path

import click

from .context import EXIT_USAGE, operator_errors
from .output import json_option, print_json


@click.group()
def keys() -> None:
    """Make CurveZMQ keys for the agent protocol."""


@keys.command()
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing keypair of that name.")
@click.option("--if-missing", is_flag=True,
              help="Keep a keypair that exists already (for provisioning scripts).")
@json_option
def generate(paths: tuple[Path, ...], force: bool, if_missing: bool, as_json: bool) -> None:
    """Write a keypair per PATH: PATH.key_secret (mode 0600, for this host only)
    and PATH.key (the public key, for the peers that must accept it)."""
    from sorna_server import curve

    if force and if_missing:
        raise click.UsageError("--force and --if-missing exclude each other")
    made = []
    with operator_errors(curve.CurveKeyError, OSError, exit_code=EXIT_USAGE):
        for path in paths:
            base = curve.key_base(path)
            secret_file = base.with_name(base.name + curve.SECRET_SUFFIX)
            public_file = base.with_name(base.name + curve.PUBLIC_SUFFIX)
            existed = if_missing and secret_file.is_file() and public_file.is_file()
            if not existed:
                public_file, secret_file = curve.generate(path, overwrite=force)
            key = next(iter(curve.load_public_keys(public_file, "key"))).decode()
            made.append({"public_key": key, "public_file": str(public_file),
                         "secret_file": str(secret_file), "made": not existed})
    if as_json:
        print_json(made if len(made) > 1 else made[0])
        return
    for entry in made:
        kept = "" if entry["made"] else " (kept: it exists already)"
        click.echo(f"secret key: {entry['secret_file']} (mode 0600; keep it on this host){kept}")
        click.echo(f"public key: {entry['public_file']} ({entry['public_key']})")
