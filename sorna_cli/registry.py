"""`sorna registry`: look at and steer the live registry of agents and kernels.

Reaches the same Redis as `sorna serve` through the shared config (an explicit
Redis URL, or the embedded Redis socket in the data directory).  It never starts
a Redis of its own: with none configured and none running in the data
directory, a command says so and exits 1.
"""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from .context import EXIT_FAILURE, CliContext, OperatorError, operator_errors, pass_cli, run_async
from .output import console, json_option, print_fields, print_json, print_table

if TYPE_CHECKING:
    from sorna_server.registry import Instance, KernelRecord, Registry

EXIT_TIMEOUT = 3  # drain --wait ran out of time


def _run(cli: CliContext, action: Callable[[Registry], Awaitable[Any]], *,
         need_db: bool = False) -> Any:
    from sorna_server.db.engine import DatabaseUnavailable
    from sorna_server.redis_conn import RedisUnavailable
    from sorna_server.registry import open_registry
    from sorna_server.schema import SchemaMissing

    config = cli.with_running_redis()

    async def main() -> Any:
        async with open_registry(config, need_db=need_db) as reg:
            return await action(reg)

    with operator_errors(RedisUnavailable, DatabaseUnavailable, SchemaMissing):
        return run_async(main())


def _age(since: float, now: float | None = None) -> str:
    if not since:
        return "-"
    seconds = max((now or time.time()) - since, 0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _instance_json(inst: Instance, alive: bool, now: float) -> dict[str, Any]:
    return {**inst.as_dict(), "alive": alive,
            "heartbeat_age": round(now - inst.last_heartbeat, 3) if inst.last_heartbeat else None}


def _kernel_json(record: KernelRecord, now: float) -> dict[str, Any]:
    return {**record.as_dict(), "age": round(now - record.created_at, 3)}


def _stats_text(stats: dict[str, Any]) -> str:
    if not stats:
        return "-"
    cpu = stats.get("cpu_used", 0) or 0
    mem = (stats.get("mem_max_bytes", 0) or 0) / (1 << 20)
    return f"cpu {cpu / 1000:.1f}s, mem {mem:.0f} MiB"


def _kernel_rows(records: list[KernelRecord], now: float, *,
                 with_instance: bool = True) -> Iterator[list[Any]]:
    for r in records:
        row: list[Any] = [r.id]
        if with_instance:
            row.append(r.instance_id)
        yield row + [r.access_key, r.lang, _age(r.created_at, now), _age(r.last_used, now),
                     r.num_queries, _stats_text(r.last_stats)]


async def _require_instance(reg: Registry, instance_id: str) -> Instance:
    inst = await reg.get_instance(instance_id)
    if inst is None:
        raise OperatorError(f"no agent with id {instance_id!r} in the registry "
                            "(see `sorna registry list`)")
    return inst


@click.group()
def registry() -> None:
    """Inspect the live registry of agents and kernels; drain agents; reconcile."""


@registry.command("list")
@json_option
@pass_cli
def list_(cli: CliContext, as_json: bool) -> None:
    """List agents: address, status, kernels used/max, languages, heartbeat age."""
    async def action(reg: Registry) -> list[tuple[Instance, bool]]:
        return [(inst, await reg.is_alive(inst.id)) for inst in await reg.list_instances()]

    items = _run(cli, action)
    now = time.time()
    if as_json:
        print_json([_instance_json(inst, alive, now) for inst, alive in items])
        return
    if not items:
        console(stderr=True).print("no agents registered")
        return
    print_table(
        ("id", "address", "status", "kernels", "languages", "heartbeat", "draining"),
        [(inst.id, inst.addr, inst.status if alive or inst.status == "lost" else
          f"{inst.status} (silent)", f"{inst.load}/{inst.max_kernels}",
          ", ".join(inst.languages), f"{_age(inst.last_heartbeat, now)} ago",
          "yes" if inst.draining else "no")
         for inst, alive in items])


@registry.command()
@click.argument("instance_id")
@json_option
@pass_cli
def inspect(cli: CliContext, instance_id: str, as_json: bool) -> None:
    """Show every field of an agent and its kernels."""
    async def action(reg: Registry) -> tuple[Instance, bool, list[KernelRecord]]:
        inst = await _require_instance(reg, instance_id)
        return inst, await reg.is_alive(instance_id), await reg.list_kernels(
            instance_id=instance_id)

    inst, alive, records = _run(cli, action)
    now = time.time()
    if as_json:
        print_json({"instance": _instance_json(inst, alive, now),
                    "kernels": [_kernel_json(r, now) for r in records]})
        return
    fields = _instance_json(inst, alive, now)
    fields["languages"] = ", ".join(inst.languages)
    print_fields(fields, title=f"agent {inst.id}")
    if records:
        print_table(("kernel", "owner", "lang", "age", "idle", "queries", "last stats"),
                    _kernel_rows(records, now, with_instance=False), title="kernels")
    else:
        console(stderr=True).print("no kernels")


@registry.command()
@click.option("--instance", "instance_id", help="Only kernels on this agent.")
@click.option("--access-key", help="Only kernels of this access key.")
@json_option
@pass_cli
def kernels(cli: CliContext, instance_id: str | None, access_key: str | None,
            as_json: bool) -> None:
    """List live kernels (owner, language, agent, age, last stats)."""
    async def action(reg: Registry) -> list[KernelRecord]:
        if instance_id is not None:
            await _require_instance(reg, instance_id)
        return await reg.list_kernels(instance_id=instance_id, access_key=access_key)

    records = _run(cli, action)
    now = time.time()
    if as_json:
        print_json([_kernel_json(r, now) for r in records])
        return
    if not records:
        console(stderr=True).print("no kernels")
        return
    print_table(("kernel", "agent", "owner", "lang", "age", "idle", "queries", "last stats"),
                _kernel_rows(records, now))


@registry.command()
@click.argument("instance_id")
@click.option("--wait", is_flag=True, help="Wait until the agent's kernels are gone.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None,
              help="With --wait: give up after this many seconds (exit status 3).")
@json_option
@pass_cli
def drain(cli: CliContext, instance_id: str, wait: bool, timeout: float | None,
          as_json: bool) -> None:
    """Send no new kernels to an agent; its kernels keep running."""
    if timeout is not None and not wait:
        raise OperatorError("--timeout needs --wait", exit_code=2)

    async def action(reg: Registry) -> tuple[Instance, list[KernelRecord], bool]:
        await _require_instance(reg, instance_id)
        inst = await reg.set_draining(instance_id, True)
        if inst is None:
            raise OperatorError(f"no agent with id {instance_id!r} in the registry")
        if not wait:
            return inst, await reg.list_kernels(instance_id=instance_id), True
        finished = await _wait_drained(reg, instance_id, timeout, show=not as_json)
        return (await reg.get_instance(instance_id) or inst,
                await reg.list_kernels(instance_id=instance_id), finished)

    inst, remaining, finished = _run(cli, action)
    now = time.time()
    if as_json:
        print_json({"instance": _instance_json(inst, True, now), "drained": not remaining,
                    "remaining": [_kernel_json(r, now) for r in remaining]})
    elif not wait:
        click.echo(f"{instance_id} is draining: no new kernels go there; "
                   f"{len(remaining)} kernel(s) keep running")
    elif finished:
        click.echo(f"{instance_id} is drained: no kernels left")
    if wait and not finished:
        if not as_json:
            print_table(("kernel", "owner", "lang", "age", "idle", "queries", "last stats"),
                        _kernel_rows(remaining, now, with_instance=False),
                        title=f"still running on {instance_id}")
        raise OperatorError(f"timed out after {timeout:g} s: {len(remaining)} kernel(s) still "
                            f"run on {instance_id}", exit_code=EXIT_TIMEOUT)


async def _wait_drained(reg: Registry, instance_id: str, timeout: float | None,
                        *, show: bool) -> bool:
    """Poll until the agent holds no kernels; a progress bar for people."""
    import asyncio

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = None if timeout is None else time.monotonic() + timeout
    initial = len(await reg.instance_kernel_ids(instance_id))
    progress = Progress(TextColumn("[bold]draining {task.fields[agent]}"), BarColumn(),
                        TextColumn("{task.fields[left]} kernel(s) left"), TimeElapsedColumn(),
                        console=console(stderr=True), disable=not show, transient=False)
    with progress:
        task = progress.add_task("drain", total=max(initial, 1), agent=instance_id,
                                 left=initial)
        while True:
            left = len(await reg.instance_kernel_ids(instance_id))
            total = max(initial, left, 1)
            progress.update(task, total=total, completed=total - left, left=left)
            if left == 0:
                progress.update(task, total=1, completed=1)
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.5 if deadline is None else
                                min(0.5, max(deadline - time.monotonic(), 0.01)))


@registry.command()
@click.argument("instance_id")
@json_option
@pass_cli
def undrain(cli: CliContext, instance_id: str, as_json: bool) -> None:
    """Let an agent take new kernels again."""
    async def action(reg: Registry) -> Instance:
        await _require_instance(reg, instance_id)
        inst = await reg.set_draining(instance_id, False)
        if inst is None:
            raise OperatorError(f"no agent with id {instance_id!r} in the registry")
        return inst

    inst = _run(cli, action)
    if as_json:
        print_json({"instance": _instance_json(inst, True, time.time())})
    else:
        click.echo(f"{instance_id} takes new kernels again (status {inst.status})")


@registry.command()
@click.option("--fix", is_flag=True, help="Repair the differences found.")
@json_option
@pass_cli
def reconcile(cli: CliContext, fix: bool, as_json: bool) -> None:
    """Compare Redis with the database's kernel rows and quota counters.

    Exit status 0 when consistent (or everything was fixed), 1 when differences
    remain."""
    from sorna_server.registry.reconcile import reconcile as run_reconcile

    async def action(reg: Registry) -> list:
        return await run_reconcile(reg, fix=fix)

    diffs = _run(cli, action, need_db=True)
    remaining = [d for d in diffs if not d.fixed]
    if as_json:
        print_json({"differences": [d.as_dict() for d in diffs], "fixed": fix,
                    "remaining": len(remaining)})
    elif not diffs:
        click.echo("registry and database agree")
    else:
        print_table(("kind", "subject", "detail", "fix", "fixed"),
                    [(d.kind, d.subject, d.detail, d.action, "yes" if d.fixed else "no")
                     for d in diffs])
        if not fix:
            console(stderr=True).print("run with --fix to repair")
    if remaining:
        raise click.exceptions.Exit(EXIT_FAILURE)


@registry.command()
@click.argument("instance_id")
@click.option("--force", is_flag=True, help="Also forget an agent that still reports.")
@json_option
@pass_cli
def forget(cli: CliContext, instance_id: str, force: bool, as_json: bool) -> None:
    """Remove a lost agent from the registry: its kernels end as lost, and its
    instance id is free for another agent key to register."""
    from sorna_server.agent_protocol import REASON_LOST
    from sorna_server.db.models import KernelStatus
    from sorna_server.registry.constants import SETTLED_BY_AGENT

    async def action(reg: Registry) -> int:
        inst = await _require_instance(reg, instance_id)
        if inst.status != "lost" and await reg.is_alive(instance_id) and not force:
            raise OperatorError(f"{instance_id} still reports (status {inst.status}): stop it "
                                f"first, or use --force")
        held = await reg.instance_kernel_ids(instance_id)
        if held:
            await reg.lifecycle.settle_many(held, KernelStatus.LOST.value, REASON_LOST,
                                            path=SETTLED_BY_AGENT, instance_id=instance_id)
        await reg.forget_instance(instance_id)
        return len(held)

    ended = _run(cli, action, need_db=True)
    if as_json:
        print_json({"forgotten": instance_id, "kernels_ended": ended})
    else:
        click.echo(f"forgot {instance_id} ({ended} kernel(s) ended as lost)")
