"""`sorna registry ...` through the real CLI boundary, with --json parsed."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from click.testing import CliRunner

from sorna_cli.main import cli
from sorna_server.registry.intake import EventIntake
from tests.helpers import REGISTRY_REDIS_DBS, close_env, info, make_env

REDIS_DB_ENV = {f"SORNA_{name.upper()}": str(db) for name, db in REGISTRY_REDIS_DBS.items()}


@pytest.fixture
def populated(registry_config):
    """Two agents (one with two kernels) registered through the real intake code."""
    config = registry_config(heartbeat_interval=30)

    async def setup():
        env = await make_env(config, intake=False, sweeper=False)
        try:
            intake = EventIntake(env.registry)
            ak = await env.create_keypair("AKIACLITEST000000001")
            for port, iid, langs in ((6001, "i-one", ["python3"]),
                                     (6002, "i-two", ["python3", "bash"])):
                await intake.handle_heartbeats([{
                    "type": "instance_heartbeat", "instance_id": iid,
                    "info": info(f"tcp://127.0.0.1:{port}", max_kernels=4,
                                 languages=tuple(langs)),
                    "running_kernels": [], "interval": 30, "ts": time.time()}])
            kids = [await env.register(ak, "i-one") for _ in range(2)]
            return ak, kids
        finally:
            await close_env(env)

    ak, kids = asyncio.run(setup())

    def sorna(*args: str):
        runner = CliRunner()
        return runner.invoke(cli, ["--db-url", config.database_url, "--redis-url",
                                   config.explicit_redis_url, "--data-dir",
                                   str(config.data_dir), *args],
                             env=REDIS_DB_ENV, catch_exceptions=False)
    return sorna, ak, kids


def test_list_inspect_kernels(populated):
    sorna, ak, kids = populated
    result = sorna("registry", "list", "--json")
    assert result.exit_code == 0, result.output
    agents = {a["id"]: a for a in json.loads(result.stdout)}
    assert set(agents) == {"i-one", "i-two"}
    assert agents["i-one"]["load"] == 2 and agents["i-one"]["max_kernels"] == 4
    assert agents["i-two"]["languages"] == ["bash", "python3"]
    assert agents["i-one"]["alive"] and agents["i-one"]["heartbeat_age"] < 60
    table = sorna("registry", "list")
    assert table.exit_code == 0 and "i-one" in table.stdout and "2/4" in table.stdout

    result = sorna("registry", "inspect", "i-one", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["instance"]["id"] == "i-one"
    assert sorted(k["id"] for k in data["kernels"]) == sorted(kids)
    assert all(k["access_key"] == ak for k in data["kernels"])
    assert sorna("registry", "inspect", "i-one").exit_code == 0

    result = sorna("registry", "kernels", "--instance", "i-two", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []
    result = sorna("registry", "kernels", "--access-key", ak, "--json")
    assert sorted(k["id"] for k in json.loads(result.stdout)) == sorted(kids)
    result = sorna("registry", "kernels", "--json")
    assert len(json.loads(result.stdout)) == 2
    assert sorna("registry", "kernels").exit_code == 0


@pytest.mark.parametrize("args", [("inspect", "i-nope"), ("drain", "i-nope"),
                                  ("undrain", "i-nope"), ("kernels", "--instance", "i-nope")])
def test_unknown_id_is_one_line_and_fails(populated, args):
    sorna, _, _ = populated
    result = sorna("registry", *args, "--json")
    assert result.exit_code != 0
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "i-nope" in result.stderr


def test_drain_wait_timeout_and_undrain(populated):
    sorna, _, kids = populated
    result = sorna("registry", "drain", "i-two", "--wait", "--timeout", "1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["drained"] is True
    result = sorna("registry", "drain", "i-one", "--wait", "--timeout", "0.5", "--json")
    assert result.exit_code == 3
    data = json.loads(result.stdout)
    assert data["drained"] is False and sorted(k["id"] for k in data["remaining"]) == sorted(kids)
    assert data["instance"]["status"] == "draining"
    assert "still run on i-one" in result.stderr
    result = sorna("registry", "undrain", "i-one", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["instance"]["draining"] is False
    agents = {a["id"]: a for a in json.loads(sorna("registry", "list", "--json").stdout)}
    assert agents["i-one"]["status"] == "running" and agents["i-two"]["status"] == "draining"


def test_reconcile_reports_and_fixes(populated, registry_config):
    sorna, ak, kids = populated
    result = sorna("registry", "reconcile", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["differences"] == []
    # break things: drop one kernel record from Redis, skew the quota counter
    config = registry_config(heartbeat_interval=30)

    async def damage():
        import sqlalchemy as sa

        from sorna_server.db.models import keypairs
        env = await make_env(config, intake=False, sweeper=False, create_schema=False)
        try:
            await env.redis.kernels.delete(f"kernel:{kids[0]}")
            # the (simulated) agent cannot be asked; silent, it cannot vouch for it
            await env.redis.instances.delete("instance:i-one:alive")
            async with env.engine.begin() as conn:
                await conn.execute(sa.update(keypairs).values(concurrency_used=7))
        finally:
            await close_env(env)
    asyncio.run(damage())
    result = sorna("registry", "reconcile", "--json")
    assert result.exit_code == 1
    kinds = {d["kind"]: d for d in json.loads(result.stdout)["differences"]}
    assert set(kinds) == {"quota-drift", "vanished-kernel"}
    assert kinds["quota-drift"]["detail"] == "concurrency_used 7, live kernels 2"
    result = sorna("registry", "reconcile", "--fix", "--json")
    assert result.exit_code == 0, result.output
    assert all(d["fixed"] for d in json.loads(result.stdout)["differences"])
    result = sorna("registry", "reconcile", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["differences"] == []
