"""The `sorna` command as a whole: help, error boundary, unreachable database, dbshell."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sorna_cli.dbshell import shell_command
from sorna_cli.main import COMMANDS
from sorna_server.config import load_config
from tests.helpers import PG_URL, run_sorna

FOUNDATION_COMMANDS = ["dbshell", "fixture", "keypair", "schema"]


def test_help_lists_every_present_command(sorna_no_db) -> None:
    result = sorna_no_db("--help")
    assert result.exit_code == 0, result.output
    for name in FOUNDATION_COMMANDS:
        assert f"  {name} " in result.stdout
    for name in COMMANDS:
        group = sorna_no_db(name, "--help")
        if f"  {name} " in result.stdout:
            assert group.exit_code == 0, group.output
            assert "Usage: sorna " in group.stdout
    for name in ("schema", "fixture", "keypair"):
        group = sorna_no_db(name, "--help")
        for line in group.stdout.split("Commands:")[1].strip().splitlines():
            sub = line.split()[0]
            assert sorna_no_db(name, sub, "--help").exit_code == 0


def test_python_dash_m_and_version(tmp_path: Path) -> None:
    result = run_sorna("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("sorna, version ")
    assert run_sorna("-h", cwd=tmp_path).returncode == 0


def test_unreachable_database_is_one_masked_line(sorna_no_db, free_port) -> None:
    url = f"postgresql://sorna:hunter2@127.0.0.1:{free_port()}/sorna"
    for command in (["keypair", "list"], ["schema", "current"], ["schema", "oneshot"],
                    ["fixture", "populate", "example_keypair"]):
        result = sorna_no_db("--db-url", url, *command)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("Error: cannot reach database "
                                        "postgresql://sorna:***@127.0.0.1:")
        assert "refused" in result.stderr.lower()
        assert "hunter2" not in result.output and result.stderr.count("\n") == 1


def test_unreachable_database_in_a_real_process(free_port, tmp_path: Path) -> None:
    url = f"postgresql://sorna:hunter2@127.0.0.1:{free_port()}/sorna"
    result = run_sorna("keypair", "list", env={"SORNA_DB_URL": url}, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: cannot reach database postgresql://sorna:***@")
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr
    debug = run_sorna("--debug", "keypair", "list", env={"SORNA_DB_URL": url}, cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    debug = run_sorna("keypair", "list", env={"SORNA_DB_URL": url, "SORNA_DEBUG": "true"},
                      cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.skipif(not PG_URL, reason="needs SORNA_TEST_DB_URL")
def test_missing_postgresql_database(sorna_no_db) -> None:
    from sqlalchemy.engine import make_url
    url = make_url(PG_URL).set(database="sorna_no_such_db").render_as_string(hide_password=False)
    result = sorna_no_db("--db-url", url, "schema", "current")
    assert result.exit_code == 1
    assert 'database "sorna_no_such_db" does not exist' in result.stderr


def test_missing_sqlite_folder(sorna_no_db, tmp_path: Path) -> None:
    result = sorna_no_db("--db-url", f"sqlite:///{tmp_path}/no/such/dir/x.db", "schema", "current")
    assert result.exit_code == 1
    assert "unable to open database file" in result.stderr


def test_bad_config_value_exits_2_naming_the_setting(sorna_no_db, write_file) -> None:
    result = sorna_no_db("keypair", "list", env={"SORNA_EVENTS_PORT": "many"})
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: invalid setting events_port "
                                    "(from environment SORNA_EVENTS_PORT)")
    assert result.stderr.count("\n") == 1

    write_file("custom.toml", "redis_db_kernels = 99\n")
    result = sorna_no_db("--config", "custom.toml", "schema", "current")
    assert result.exit_code == 2 and "invalid setting redis_db_kernels" in result.stderr
    result = sorna_no_db("--config", "absent.toml", "schema", "current")
    assert result.exit_code == 2 and "config file absent.toml does not exist" in result.stderr
    result = sorna_no_db("--db-url", "mysql://root:hunter2@h/db", "keypair", "list")
    assert result.exit_code == 2 and "hunter2" not in result.output


def test_embedded_database_in_data_dir(sorna_no_db, tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    created = sorna_no_db.json("--data-dir", str(data_dir), "schema", "oneshot")
    assert created["url"] == f"sqlite:///{data_dir / 'sorna.db'}"
    assert (data_dir / "sorna.db").is_file()
    populated = sorna_no_db.json("fixture", "populate", "example_keypair",
                                 env={"SORNA_DATA_DIR": str(data_dir)})
    assert populated["inserted"] == 1


def test_dbshell_command_keeps_password_out_of_argv() -> None:
    argv, env = shell_command(load_config(None, db_url="postgresql://u:s3cret@db.example:6432/x"))
    assert argv == ["psql", "-h", "db.example", "-p", "6432", "-U", "u", "x"]
    assert env == {"PGPASSWORD": "s3cret"}
    argv, env = shell_command(load_config(None, db_url="sqlite:////srv/sorna.db"))
    assert (argv, env) == (["sqlite3", "/srv/sorna.db"], {})


def test_dbshell_runs_the_client(ready_db_url: str, tmp_path: Path) -> None:
    backend = "sqlite3" if ready_db_url.startswith("sqlite") else "psql"
    if shutil.which(backend) is None:
        pytest.skip(f"{backend} is not installed")
    query = ["select count(*) from keypairs;"] if backend == "sqlite3" else \
        ["-tAc", "select count(*) from keypairs"]
    result = run_sorna("--db-url", ready_db_url, "dbshell", "--", *query, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


def test_dbshell_without_the_client_binary(tmp_path: Path) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    result = run_sorna("--db-url", f"sqlite:///{tmp_path}/x.db", "dbshell",
                       env={"PATH": str(empty_bin)}, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: sqlite3 is not installed or not on PATH")
    result = run_sorna("--db-url", "postgresql://u:hunter2@127.0.0.1/x", "dbshell",
                       env={"PATH": str(empty_bin)}, cwd=tmp_path)
    assert result.returncode == 1 and "psql is not installed" in result.stderr
    assert "hunter2" not in result.stderr
