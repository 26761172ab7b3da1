"""A fast, honest CLI: lazy help, no throwaway Redis, `sorna health`, completion, logging."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
from pathlib import Path

import pytest

from sorna_cli import keypair as keypair_cli
from sorna_cli.main import COMMANDS, cli
from sorna_server import keypairs as keypair_core
from sorna_server.logs import REQUEST_ID, setup_logging
from sorna_server.registry.intake import EventIntake
from tests.helpers import TEST_REDIS_DBS, close_env, info, make_env, run_sorna

HEAVY = ("aiohttp", "sqlalchemy", "zmq", "alembic")


def imported_modules(*args: str, cwd: Path) -> set[str]:
    """Top-level names of every module `python -X importtime -m sorna_cli ARGS` imported."""
    result = run_sorna(*args, cwd=cwd, python_flags=("-X", "importtime"))
    assert result.returncode == 0, result.stderr[-2000:]
    names = set()
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", line)
        if match:
            names.add(match.group(1).split(".")[0])
    assert "click" in names  # the output really is the import log
    return names


def test_help_imports_no_server_code(tmp_path: Path) -> None:
    """`sorna --help` and `sorna COMMAND --help` load neither aiohttp, SQLAlchemy nor ZeroMQ."""
    runs = [("--help",)] + [(name, "--help") for name in COMMANDS] + [
        ("keypair", "create", "--help"), ("registry", "drain", "--help"),
        ("schema", "upgrade", "--help"), ("fixture", "populate", "--help")]
    for args in runs:
        heavy = imported_modules(*args, cwd=tmp_path) & set(HEAVY)
        assert not heavy, (args, heavy)
    # the log is read right: a command that runs loads what it needs
    assert "sqlalchemy" in imported_modules("keypair", "generate", "--json", cwd=tmp_path)


def test_command_list_shows_each_commands_own_help(sorna_no_db) -> None:
    listing = sorna_no_db("--help").stdout
    for name, (_, short) in COMMANDS.items():
        command = cli.get_command(None, name)  # type: ignore[arg-type]
        assert command is not None
        assert short == command.get_short_help_str(200), name
        assert name in listing


def test_keypair_defaults_in_help_are_the_core_defaults() -> None:
    assert keypair_cli.DEFAULT_CONCURRENCY_LIMIT == keypair_core.DEFAULT_CONCURRENCY_LIMIT
    assert keypair_cli.DEFAULT_RATE_LIMIT == keypair_core.DEFAULT_RATE_LIMIT
    assert keypair_cli.DEFAULT_BILLING_PLAN == keypair_core.DEFAULT_BILLING_PLAN


def test_shell_completion_lists_commands(tmp_path: Path) -> None:
    result = run_sorna(cwd=tmp_path, env={"_SORNA_COMPLETE": "bash_complete",
                                          "COMP_WORDS": "sorna reg", "COMP_CWORD": "1"})
    assert result.returncode == 0 and "plain,registry" in result.stdout.splitlines()
    result = run_sorna(cwd=tmp_path, env={"_SORNA_COMPLETE": "bash_complete",
                                          "COMP_WORDS": "sorna registry dr", "COMP_CWORD": "2"})
    assert "plain,drain" in result.stdout.splitlines()
    script = run_sorna(cwd=tmp_path, env={"_SORNA_COMPLETE": "bash_source"})
    assert "_sorna_completion" in script.stdout


# --- no throwaway Redis ------------------------------------------------------------

@pytest.mark.parametrize("command", [["registry", "list", "--json"],
                                     ["registry", "kernels"], ["registry", "drain", "i-x"]])
def test_operator_commands_never_start_an_embedded_redis(tmp_path: Path, command) -> None:
    result = run_sorna(*command, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: no Redis: "), result.stderr
    assert "sorna-data" in lines[0]
    assert result.stdout == ""
    assert not (tmp_path / "sorna-data" / "redis.log").exists()
    assert not (tmp_path / "sorna-data" / "redis.sock").exists()


def test_health_without_anything_fails_every_check_and_creates_nothing(tmp_path: Path) -> None:
    result = run_sorna("health", "--json", cwd=tmp_path)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["status"] == "unavailable"
    assert report["failed"] == ["database", "redis", "agents"]
    assert not (tmp_path / "sorna-data").exists()
    text = run_sorna("health", cwd=tmp_path)
    assert text.returncode == 1 and "not ready: database, redis, agents failed" in text.stderr


def test_health_reports_each_check(ready_sorna, ready_db_url, redis_url, make_config) -> None:
    config = make_config(db_url=ready_db_url, redis_url=redis_url)
    env = {f"SORNA_{name.upper()}": str(db) for name, db in TEST_REDIS_DBS.items()}
    result = ready_sorna("--redis-url", redis_url, "health", "--json", env=env)
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and report["failed"] == ["agents"], result.output
    assert report["checks"]["database"]["ok"] and report["checks"]["redis"]["ok"]

    async def one_agent_heartbeats() -> None:
        registry_env = await make_env(config, intake=False, sweeper=False, create_schema=False)
        try:
            await EventIntake(registry_env.registry).handle_heartbeats([{
                "type": "instance_heartbeat", "instance_id": "i-health", "info": info(),
                "running_kernels": [], "interval": 30, "ts": time.time()}])
        finally:
            await close_env(registry_env)

    asyncio.run(one_agent_heartbeats())
    result = ready_sorna("--redis-url", redis_url, "health", env=env)
    assert result.exit_code == 0, result.output
    assert "1 live agent(s)" in result.stdout


# --- one logging set-up -----------------------------------------------------------

def test_text_and_json_log_lines_carry_the_request_id() -> None:
    log = logging.getLogger("sorna.test")
    stream = io.StringIO()
    setup_logging("INFO", "json", label="w3", stream=stream)
    try:
        token = REQUEST_ID.set("rid-42")
        log.info("inside %s", "a request", extra={"status": 201})
        REQUEST_ID.reset(token)
        log.info("outside")
        first, second = (json.loads(line) for line in stream.getvalue().splitlines())
        assert first["message"] == "inside a request" and first["request_id"] == "rid-42"
        assert first["status"] == 201 and first["level"] == "INFO"
        assert first["logger"] == "sorna.test" and first["worker"] == "w3"
        assert "timestamp" in first and "request_id" not in second

        stream = io.StringIO()
        setup_logging("INFO", "text", stream=stream)  # replaces the JSON handler
        token = REQUEST_ID.set("rid-43")
        log.info("plain")
        REQUEST_ID.reset(token)
        lines = stream.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].endswith("INFO sorna.test [rid-43]: plain")
    finally:
        setup_logging("WARNING", "text")


def test_log_format_setting_reaches_the_cli(sorna_no_db) -> None:
    result = sorna_no_db("--log-format", "yaml", "health")
    assert result.exit_code == 2 and "log-format" in result.stderr
    result = sorna_no_db("health", env={"SORNA_LOG_FORMAT": "xml"})
    assert result.exit_code == 2 and "log_format" in result.stderr
