"""`sorna keypair`: generate, create, list, deactivate."""
from __future__ import annotations

import re

import pytest

from sorna_server import keypairs
from sorna_server.config import load_config
from sorna_server.db.engine import open_database

ACCESS_KEY = re.compile(r"^AKIA[A-Z2-7]{16}$")
SECRET_KEY = re.compile(r"^[A-Za-z0-9_-]{40}$")


def test_generate_format_and_uniqueness(sorna_no_db) -> None:
    pairs = {keypairs.generate_keypair() for _ in range(200)}
    assert len(pairs) == 200
    for access_key, secret_key in pairs:
        assert ACCESS_KEY.match(access_key) and SECRET_KEY.match(secret_key)
    printed = sorna_no_db.json("keypair", "generate")
    assert ACCESS_KEY.match(printed["access_key"]) and SECRET_KEY.match(printed["secret_key"])
    human = sorna_no_db("keypair", "generate")
    assert human.exit_code == 0 and re.search(r"access key: AKIA\w{16}\n", human.stdout)


def test_create_list_and_hide_secrets(ready_sorna) -> None:
    created = ready_sorna.json("keypair", "create", "--user-id", "7",
                               "--concurrency-limit", "3", "--rate-limit", "50")
    assert ACCESS_KEY.match(created["access_key"]) and SECRET_KEY.match(created["secret_key"])
    assert (created["user_id"], created["concurrency_limit"], created["rate_limit"]) == (7, 3, 50)
    assert created["is_active"] is True

    defaults = ready_sorna.json("keypair", "create", "--user-id", "8")
    assert (defaults["concurrency_limit"], defaults["rate_limit"]) == (30, 1000)

    listed = ready_sorna.json("keypair", "list")
    assert {row["access_key"] for row in listed} == {created["access_key"],
                                                     defaults["access_key"]}
    assert all("secret_key" not in row for row in listed)

    table = ready_sorna("keypair", "list")
    assert table.exit_code == 0 and created["secret_key"] not in table.stdout
    assert created["access_key"] in table.stdout

    shown = ready_sorna.json("keypair", "list", "--show-secret", "--user-id", "7")
    assert [(r["access_key"], r["secret_key"]) for r in shown] == \
        [(created["access_key"], created["secret_key"])]


def test_create_with_given_keys_and_duplicate(ready_sorna) -> None:
    given = ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    created = ready_sorna.json("keypair", "create", "--user-id", "2",
                               "--access-key", given[0], "--secret-key", given[1])
    assert (created["access_key"], created["secret_key"]) == given
    again = ready_sorna("keypair", "create", "--user-id", "2",
                        "--access-key", given[0], "--secret-key", given[1])
    assert again.exit_code == 1
    assert again.stderr == f"Error: keypair {given[0]} already exists\n"


@pytest.mark.parametrize(("args", "problem"), [
    (["--access-key", "AKIASHORT", "--secret-key", "s" * 40], "invalid access key"),
    (["--access-key", "AKIAIOSFODNN7EXAMPLE", "--secret-key", "short"], "invalid secret key"),
    (["--access-key", "AKIAIOSFODNN7EXAMPLE"], "give both the access key and the secret key"),
    (["--user-id", "-1"], "invalid user id"),
])
def test_create_rejects_bad_input(ready_sorna, args: list[str], problem: str) -> None:
    if "--user-id" not in args:
        args = ["--user-id", "1", *args]
    result = ready_sorna("keypair", "create", *args)
    assert result.exit_code == 2, result.output
    assert problem in result.stderr and result.stderr.count("\n") == 1
    assert ready_sorna.json("keypair", "list") == []


def test_create_needs_user_id(ready_sorna) -> None:
    result = ready_sorna("keypair", "create")
    assert result.exit_code == 2 and "--user-id" in result.stderr


def test_deactivate_and_activate(ready_sorna) -> None:
    key = ready_sorna.json("keypair", "create", "--user-id", "1")["access_key"]
    first = ready_sorna.json("keypair", "deactivate", key)
    assert first == {"access_key": key, "is_active": False, "changed": True}
    second = ready_sorna("keypair", "deactivate", key)
    assert second.exit_code == 0 and "already inactive" in second.stdout
    assert ready_sorna.json("keypair", "list")[0]["is_active"] is False
    assert ready_sorna.json("keypair", "list", "--active-only") == []
    assert ready_sorna.json("keypair", "activate", key)["changed"] is True
    assert ready_sorna.json("keypair", "list")[0]["is_active"] is True


def test_deactivate_unknown_key(ready_sorna) -> None:
    result = ready_sorna("keypair", "deactivate", "AKIANOSUCHKEY0000000")
    assert result.exit_code == 1
    assert result.stderr == "Error: no keypair AKIANOSUCHKEY0000000\n"


async def test_keypair_api(ready_db_url: str) -> None:
    async with open_database(load_config(None, db_url=ready_db_url)) as engine:
        row = await keypairs.create_keypair(engine, 5, concurrency_limit=2, rate_limit=10)
        fetched = await keypairs.get_keypair(engine, row["access_key"])
        assert fetched == row and fetched["created_at"].tzinfo is not None
        with pytest.raises(keypairs.KeypairExists):
            await keypairs.create_keypair(engine, 5, access_key=row["access_key"],
                                          secret_key=row["secret_key"])
        assert await keypairs.deactivate_keypair(engine, row["access_key"]) is True
        assert await keypairs.deactivate_keypair(engine, row["access_key"]) is False
        with pytest.raises(keypairs.KeypairNotFound):
            await keypairs.deactivate_keypair(engine, "AKIANOSUCHKEY0000000")
        assert [r["is_active"] for r in await keypairs.list_keypairs(engine)] == [False]
        assert await keypairs.get_keypair(engine, "AKIANOSUCHKEY0000000") is None


def test_empty_list_says_how_to_start(ready_sorna) -> None:
    result = ready_sorna("keypair", "list")
    assert result.exit_code == 0 and result.stdout == ""
    assert "sorna keypair create --user-id N" in result.stderr
    assert ready_sorna.json("keypair", "list") == []
