"""README.md's configuration table and command reference are generated: keep them true.

If this test fails, regenerate both sections with

    python tests/foundation/test_readme.py
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import click

from sorna_cli.main import cli
from sorna_server.config import SornaConfig

README = Path(__file__).resolve().parents[2] / "README.md"
REGENERATE = "python tests/foundation/test_readme.py"

# Meanings for settings whose Field has no description.
MEANINGS = {
    "debug": "debug logs and tracebacks",
    "log_level": "DEBUG, INFO, WARNING, ERROR or CRITICAL",
    "db_url": "any SQLAlchemy URL (postgresql://... or sqlite:///...); wins over the db_* parts",
    "db_addr": "historic: PostgreSQL host:port (used when db_url is unset)",
    "db_name": "historic: database name (with db_addr)",
    "db_user": "historic: database user (with db_addr)",
    "db_password": "historic: database password (with db_addr)",
    "redis_url": "Redis URL; unset (and no redis_addr) = embedded redis-server in data_dir",
    "redis_addr": "historic: Redis host:port (used when redis_url is unset)",
    "redis_db_kernels": "Redis database number for kernels",
    "redis_db_instances": "Redis database number for agents (instances)",
    "redis_db_sessions": "Redis database number for client sessions",
    "redis_db_ratelimit": "Redis database number for rate limits",
    "service_ip": "HTTP(S) bind address",
    "ssl_cert": "TLS certificate (PEM); with ssl_key, serve HTTPS",
    "ssl_key": "TLS private key (PEM)",
    "workers": "gateway worker processes sharing the port",
    "shutdown_timeout": "seconds to wait for requests to finish on shutdown",
    "legacy_access_key": "keypair billed for legacy ZMQ requests",
    "events_ip": "agent events (PULL) bind address",
    "events_port": "agent events (PULL) port",
    "heartbeat_interval": "seconds between agent heartbeats",
    "agent_rpc_timeout": "seconds the gateway waits for an agent RPC",
    "keypair_cache_ttl": "seconds a looked-up keypair is cached by the gateway",
    "agent_port": "agent RPC port (historic SORNA_AGENT_PORT)",
    "agent_advertise_host": "host managers use to reach the agent",
    "agent_instance_id": "stable agent instance id (default i-<hostname>)",
    "agent_max_kernels": "kernels one agent runs at most",
    "agent_pool_size": "warm runner processes kept per language",
    "agent_idle_timeout": "seconds without use before a kernel is destroyed",
    "agent_exec_timeout": "maximum seconds per execute",
    "agent_max_procs": "processes per kernel",
    "agent_max_file_size": "largest file a kernel may write",
    "agent_scratch_dir": "folder for kernel working directories",
    "agent_stats_interval": "seconds between instance_stats events",
}


def _size_fields() -> set[str]:
    fields: set[str] = set()
    for decorator in SornaConfig.__pydantic_decorators__.field_validators.values():
        if decorator.func.__name__ == "_sizes":
            fields.update(decorator.info.fields)
    return fields


def _human_size(value: int) -> str:
    for unit, factor in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if value and value % factor == 0:
            return f"{value // factor}{unit}"
    return str(value)


def _default(name: str) -> str:
    field = SornaConfig.model_fields[name]
    value: Any = field.get_default(call_default_factory=True)
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(item) for item in value) or "(none)"
    if name in _size_fields() and isinstance(value, int):
        return _human_size(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _commands(group: click.Group, ctx: click.Context) -> list[tuple[str, click.Command]]:
    found = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is not None:
            found.append((name, command))
    return found


def _flags() -> dict[str, list[str]]:
    """Setting name -> the flags that set it (an option whose name is the setting)."""
    flags: dict[str, list[str]] = {}
    fields = set(SornaConfig.model_fields)
    root_ctx = click.Context(cli, info_name="sorna")

    def visit(command: click.Command, prefix: str) -> None:
        for param in command.params:
            if isinstance(param, click.Option) and param.name in fields:
                flag = max(param.opts, key=len)
                flags.setdefault(param.name, []).append(f"{prefix}{flag}".strip())
        if isinstance(command, click.Group):
            for name, sub in _commands(command, root_ctx):
                visit(sub, f"{prefix}{name} ")

    visit(cli, "")
    return flags


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_table() -> str:
    flags = _flags()
    lines = ["| setting (`sorna.toml`) | flag | environment | default | meaning |",
             "| --- | --- | --- | --- | --- |"]
    for name, field in SornaConfig.model_fields.items():
        flag = ", ".join(f"`{f}`" for f in flags.get(name, [])) or "-"
        meaning = field.description or MEANINGS.get(name, "")
        lines.append(f"| `{name}` | {flag} | `SORNA_{name.upper()}` | `{_default(name)}` | "
                     f"{_cell(meaning)} |")
    return "\n".join(lines)


def _usage(command: click.Command, ctx: click.Context) -> str:
    return " ".join(command.collect_usage_pieces(ctx))


def command_reference() -> str:
    root_ctx = click.Context(cli, info_name="sorna")
    lines = ["| command | what it does |", "| --- | --- |"]
    for name, command in _commands(cli, root_ctx):
        ctx = click.Context(command, info_name=name, parent=root_ctx)
        if isinstance(command, click.Group):
            for sub_name, sub in _commands(command, ctx):
                sub_ctx = click.Context(sub, info_name=sub_name, parent=ctx)
                usage = f"sorna {name} {sub_name} {_usage(sub, sub_ctx)}"
                lines.append(f"| `{usage}` | {_cell(sub.get_short_help_str(200))} |")
        else:
            usage = f"sorna {name} {_usage(command, ctx)}"
            lines.append(f"| `{usage}` | {_cell(command.get_short_help_str(200))} |")
    return "\n".join(lines)


SECTIONS = {"config-table": config_table, "command-reference": command_reference}


def _block(name: str) -> re.Pattern[str]:
    begin, end = rf"<!-- BEGIN GENERATED {name}[^\n]*-->\n", rf"<!-- END GENERATED {name} -->"
    return re.compile(rf"({begin})(.*?)({end})", re.DOTALL)


def render(text: str) -> str:
    for name, generate in SECTIONS.items():
        body = generate()
        text, count = _block(name).subn(
            lambda match, body=body: f"{match.group(1)}{body}\n{match.group(3)}", text)
        assert count == 1, f"README.md needs exactly one generated {name} block"
    return text


def test_readme_generated_sections_are_current() -> None:
    current = README.read_text()
    assert render(current) == current, f"README.md is out of date: run `{REGENERATE}`"


def test_every_setting_is_in_the_table() -> None:
    table = _block("config-table").search(README.read_text()).group(2)
    for name in SornaConfig.model_fields:
        assert f"`SORNA_{name.upper()}`" in table


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
    sys.stdout.write("README.md regenerated\n")
