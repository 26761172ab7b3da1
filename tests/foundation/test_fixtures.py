"""`sorna fixture`: idempotent populate, listing, and bad input."""
from __future__ import annotations

import json

import pytest

from sorna_server import fixture_loader
from sorna_server.config import load_config
from sorna_server.db.engine import open_database

EXAMPLE = {
    "user_id": 2, "access_key": "AKIAIOSFODNN7EXAMPLE",
    "secret_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "is_active": True,
    "billing_plan": "free", "concurrency_limit": 30, "rate_limit": 1000,
}


def test_example_keypair_fixture_content() -> None:
    data = fixture_loader.load_fixture("example_keypair")
    assert list(data) == ["keypairs"] and len(data["keypairs"]) == 1
    row = data["keypairs"][0]
    assert {key: row[key] for key in EXAMPLE} == EXAMPLE
    assert "example_keypair" in fixture_loader.available_fixtures()


def test_populate_twice_is_idempotent(ready_sorna) -> None:
    first = ready_sorna.json("fixture", "populate", "example_keypair")
    assert first["inserted"] == 1 and first["skipped"] == 0

    second = ready_sorna("fixture", "populate", "example_keypair")
    assert second.exit_code == 0, second.output
    assert "skipped 1 already present" in second.stdout
    assert "AKIAIOSFODNN7EXAMPLE" in second.stdout

    third = ready_sorna.json("fixture", "populate", "example_keypair")
    assert third["inserted"] == 0 and third["skipped"] == 1
    assert third["tables"][0]["skipped_rows"] == ["access_key=AKIAIOSFODNN7EXAMPLE"]

    listed = ready_sorna.json("keypair", "list")
    assert [row["access_key"] for row in listed] == ["AKIAIOSFODNN7EXAMPLE"]
    assert "secret_key" not in listed[0]
    assert {key: listed[0][key] for key in EXAMPLE if key != "secret_key"} == \
        {key: value for key, value in EXAMPLE.items() if key != "secret_key"}


def test_populate_from_path_with_several_tables(ready_sorna, write_file) -> None:
    """Parents go in before children, whatever the order in the file."""
    path = write_file("history.json", json.dumps({
        "usage": [{"access_key": "AKIAAAAAAAAAAAAAAAAA", "kernel_type": "python3",
                   "kernel_id": "k1", "started_at": "2017-01-01T00:00:00+00:00",
                   "terminated_at": "2017-01-01T00:05:00", "cpu_used": 1200}],
        "kernels": [{"id": "k1", "lang": "python3", "access_key": "AKIAAAAAAAAAAAAAAAAA",
                     "status": "TERMINATED"}],
        "keypairs": [{"user_id": 7, "access_key": "AKIAAAAAAAAAAAAAAAAA",
                      "secret_key": "s" * 40}],
    }))
    report = ready_sorna.json("fixture", "populate", str(path))
    assert [t["table"] for t in report["tables"]] == ["keypairs", "kernels", "usage"]
    assert report["inserted"] == 3
    again = ready_sorna.json("fixture", "populate", str(path))
    assert again["inserted"] == 0 and again["skipped"] == 3
    assert again["tables"][2]["skipped_rows"] == ["kernel_id=k1"]


async def test_populate_api_reports(ready_db_url: str) -> None:
    async with open_database(load_config(None, db_url=ready_db_url)) as engine:
        first = await fixture_loader.populate(engine, "example_keypair")
        second = await fixture_loader.populate(engine, "example_keypair")
    assert (first.inserted, first.skipped) == (1, 0)
    assert (second.inserted, second.skipped) == (0, 1)
    assert second.fixture == "example_keypair"


def test_fixture_list_shows_tables_and_counts(sorna_no_db) -> None:
    listed = sorna_no_db.json("fixture", "list")
    example = next(entry for entry in listed if entry["name"] == "example_keypair")
    assert example["tables"] == {"keypairs": 1}
    assert "error" not in example


def test_unknown_fixture_lists_available(ready_sorna) -> None:
    result = ready_sorna("fixture", "populate", "no_such_fixture")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "unknown fixture 'no_such_fixture'" in result.stderr
    assert "example_keypair" in result.stderr


def test_missing_fixture_file(ready_sorna, tmp_path) -> None:
    result = ready_sorna("fixture", "populate", str(tmp_path / "gone.json"))
    assert result.exit_code == 2
    assert "gone.json does not exist" in result.stderr


@pytest.mark.parametrize(("content", "problem"), [
    ('{"keypairs": [', "invalid JSON at line 1"),
    ('[1, 2]', "expected a JSON object"),
    ('{}', "it has no tables"),
    ('{"users": []}', "unknown table 'users'"),
    ('{"keypairs": {"a": 1}}', "keypairs: expected a list of rows"),
    ('{"keypairs": [7]}', "keypairs[0]: expected an object"),
    ('{"keypairs": [{"user_id": 1, "access_key": "AKIAAAAAAAAAAAAAAAAA"}]}',
     "keypairs[0]: missing required column 'secret_key'"),
    ('{"keypairs": [{"user_id": "one", "access_key": "AKIAAAAAAAAAAAAAAAAA", '
     '"secret_key": "x"}]}', "keypairs[0].user_id: expected an integer"),
    ('{"keypairs": [{"user_id": 1, "access_key": "AKIAAAAAAAAAAAAAAAAAtoolong", '
     '"secret_key": "x"}]}', "keypairs[0].access_key: longer than 20 characters"),
    ('{"keypairs": [{"user_id": 1, "access_key": "AKIAAAAAAAAAAAAAAAAA", '
     '"secret_key": "x", "colour": "red"}]}', "unknown column 'colour'"),
    ('{"usage": [{"access_key": "AKIAAAAAAAAAAAAAAAAA", "kernel_type": "x", '
     '"kernel_id": "k", "started_at": "yesterday", "terminated_at": "2017-01-01T00:00:00"}]}',
     "usage[0].started_at: expected an ISO 8601 date-time"),
])
def test_malformed_fixture_names_file_and_problem(ready_sorna, write_file, content: str,
                                                  problem: str) -> None:
    path = write_file("bad.json", content)
    result = ready_sorna("fixture", "populate", str(path))
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1
    assert f"fixture {path}" in result.stderr
    assert problem in result.stderr
    assert ready_sorna.json("keypair", "list") == []


def test_rows_refused_by_the_database_roll_back(ready_sorna, write_file) -> None:
    """A row breaking a foreign key: nothing from the file is kept."""
    path = write_file("orphan.json", json.dumps({
        "keypairs": [{"user_id": 1, "access_key": "AKIABBBBBBBBBBBBBBBB", "secret_key": "s" * 40}],
        "kernels": [{"id": "k9", "lang": "python3", "access_key": "AKIANOSUCHKEYANYWHER"}],
    }))
    result = ready_sorna("fixture", "populate", str(path))
    assert result.exit_code == 2, result.output
    assert "kernels[0] was refused by the database" in result.stderr
    assert ready_sorna.json("keypair", "list") == []


def test_populate_without_schema_says_how_to_fix(sorna) -> None:
    result = sorna("fixture", "populate", "example_keypair")
    assert result.exit_code == 1
    assert "sorna schema oneshot head" in result.stderr


def test_fixture_path_that_is_a_folder(ready_sorna, tmp_path) -> None:
    folder = tmp_path / "fixtures.json"
    folder.mkdir()
    result = ready_sorna("fixture", "populate", str(folder))
    assert result.exit_code == 2 and "is not a file" in result.stderr


def test_fixture_file_that_is_not_utf8(ready_sorna, tmp_path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"keypairs": [{"billing_plan": "\xe9"}]}')
    result = ready_sorna("fixture", "populate", str(path))
    assert result.exit_code == 2
    assert f"fixture {path}: cannot read it" in result.stderr
