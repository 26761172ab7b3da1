"""Running code in a kernel: query, batch and complete, the exec timeout, the results.

Runs in one kernel are serialised by its lock.  What a kernel answers is
untrusted: results are rebuilt from checked fields only, and the output cap is
enforced here too (the runner's own cap is the tenant's to tamper with).

When execute returns (the run finished, stopped for input, timed out, or its
process died) the agent kills what the run left running (`Lifecycle.sweep`:
only the kernel's own processes and its terminal stay), and looks at its OOM
counter: any OOM kill during the run ends it with the error `out-of-memory`,
and the kernel is restarted (same id and folder, state lost).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from sorna_server import agent_protocol as proto

from .kernel import Kernel
from .process import RunnerDied
from .rpc import RPCError

log = logging.getLogger("sorna_agent")

INTERRUPT_GRACE = 1.0       # seconds a run gets to stop after SIGINT before a kill + restart
COMPLETE_TIMEOUT = 5.0
OOM_POLL = 0.2              # seconds between looks at the OOM counter during a run
MAX_COMPLETIONS = 1000
MAX_COMPLETION_CHARS = 1000
ERR_OUT_OF_MEMORY = "out-of-memory"  # an execute error type, like proto.REASON_OOM


class Lifecycle(Protocol):
    """What execution needs from the kernel lifecycle (the agent)."""

    async def replace_runner(self, kernel: Kernel) -> None: ...

    def end_later(self, kernel: Kernel, reason: str) -> None: ...

    async def sweep(self, kernel: Kernel) -> None:
        """Kill the processes the last run left behind."""


class Execution:
    def __init__(self, lifecycle: Lifecycle):
        self.lifecycle = lifecycle

    async def execute(self, kernel: Kernel, mode: str, code: str,
                      opts: dict[str, Any]) -> dict[str, Any]:
        async with kernel.lock:
            await kernel.available.wait()
            if kernel.closing:
                raise RPCError(proto.ERR_KERNEL_NOT_FOUND, f"kernel {kernel.id!r} has ended")
            kernel.busy += 1
            kernel.touch()
            try:
                if mode == "query":
                    result = await self._query(kernel, code)
                elif mode == "batch":
                    result = await self._batch(kernel, opts)
                else:
                    result = await self._complete(kernel, code, opts)
            except RPCError as exc:
                if exc.type == proto.ERR_EXECUTION_TIMEOUT:
                    await self._end_of_run(kernel, exc.details.get("console", []))
                raise
            finally:
                kernel.busy -= 1
                kernel.touch()
            await self._end_of_run(kernel, result["console"])
            return result

    async def _end_of_run(self, kernel: Kernel, console: list[list[str]]) -> None:
        """An OOM kill during the run turns it into an error; what it left is killed."""
        if kernel.sandbox.new_oom_kills():
            raise await self._out_of_memory(kernel, console)
        if kernel.runner.alive:
            await self.lifecycle.sweep(kernel)

    async def _out_of_memory(self, kernel: Kernel, console: list[list[str]]) -> RPCError:
        limit = kernel.limits.max_mem >> 20
        log.info("kernel %s: out of memory (limit %d MiB): restarting it", kernel.id, limit)
        try:
            await self.lifecycle.replace_runner(kernel)
            state = "the kernel was restarted and its state is lost"
        except (RunnerDied, OSError, TimeoutError, RuntimeError) as exc:
            log.warning("kernel %s: restart after an OOM kill failed: %s", kernel.id, exc)
            self.lifecycle.end_later(kernel, proto.REASON_OOM)
            state = "the kernel could not be restarted and has ended"
        note = (f"\n[out of memory: a process of this run was killed for going over the "
                f"kernel's memory limit of {limit} MiB; {state}]\n")
        return RPCError(ERR_OUT_OF_MEMORY,
                        f"the run went over the memory limit of {limit} MiB",
                        console=[*console, ["stderr", note]])

    async def _query(self, kernel: Kernel, code: str) -> dict[str, Any]:
        if kernel.waiting_input:
            msg = {"op": "input", "text": code}
        else:
            msg = {"op": "exec", "code": code}
        reply = await self._run(kernel, msg)
        return self._result(kernel, reply)

    def _result(self, kernel: Kernel, reply: dict[str, Any],
                status: str | None = None) -> dict[str, Any]:
        if reply.get("type") != "done":
            raise RPCError(proto.ERR_EXECUTION_FAILED, f"kernel answered {reply.get('type')!r}")
        kernel.waiting_input = reply.get("status") == "waiting-input"
        given = reply.get("status")
        result: dict[str, Any] = {
            "status": status or (given if given in RUN_STATUSES else "finished"),
            "console": clean_console(reply.get("console"), kernel.limits.max_output)}
        if kernel.waiting_input:
            result["options"] = {"is_password": bool((reply.get("options") or {})
                                                     .get("is_password"))}
        return result

    async def _batch(self, kernel: Kernel, opts: dict[str, Any]) -> dict[str, Any]:
        lang = kernel.lang
        try:
            build = lang.batch_command(opts.get("build"), lang.build)
            exec_cmd = lang.batch_command(opts.get("exec"), lang.exec)
        except ValueError as exc:
            raise RPCError(proto.ERR_INVALID_ARGS, str(exc)) from None
        if build and not kernel.batch_built:
            reply = await self._run(kernel, {"op": "shell", "cmd": build})
            result = self._result(kernel, reply)
            if reply.get("exit_code") not in (0, None):
                result["console"].append(["stderr", f"[build failed with exit code "
                                                    f"{reply.get('exit_code')}]\n"])
                return result
            kernel.batch_built = True
            result["status"] = "build-finished"
            return result
        kernel.batch_built = False
        if not exec_cmd:
            return {"status": "finished", "console": []}
        reply = await self._run(kernel, {"op": "shell", "cmd": exec_cmd})
        return self._result(kernel, reply, status="finished")

    async def _complete(self, kernel: Kernel, code: str, opts: dict[str, Any]) -> dict[str, Any]:
        given_line = opts.get("line")
        line = given_line if isinstance(given_line, str) else code
        col = opts.get("col")
        row = opts.get("row")
        msg = {"op": "complete", "line": line, "code": code,
               "row": row if isinstance(row, int) else 0,
               "col": col if isinstance(col, int) else len(line)}
        try:
            reply = await asyncio.wait_for(kernel.runner.request(msg), COMPLETE_TIMEOUT)
        except TimeoutError:
            kernel.runner.interrupt()
            raise RPCError(proto.ERR_EXECUTION_TIMEOUT, "completion took too long",
                           console=[]) from None
        except RunnerDied:
            raise await self._died_during_run(kernel) from None
        items = reply.get("items")
        completions = [item[:MAX_COMPLETION_CHARS] for item in
                       (items if isinstance(items, list) else [])[:MAX_COMPLETIONS]
                       if isinstance(item, str)]
        return {"status": "finished", "console": [], "completions": completions}

    async def _run(self, kernel: Kernel, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one run to the kernel and wait for its end, within the exec timeout; an
        OOM kill in the kernel ends the wait at once."""
        runner = kernel.runner
        timeout = kernel.limits.exec_timeout
        try:
            runner.send(msg)
            reply = runner.receive()
            watch = RunWatch(kernel, reply, timeout)
            try:
                return await reply
            except asyncio.CancelledError:
                if watch.reason is None:
                    raise  # our caller was cancelled, not the watch
            finally:
                watch.cancel()
            if watch.reason == RunWatch.OOM:
                raise await self._stop_run(kernel, RunWatch.OOM)
            raise await self._stop_run(kernel, RunWatch.TIMEOUT)
        except RunnerDied:
            raise await self._died_during_run(kernel) from None

    async def _stop_run(self, kernel: Kernel, why: str) -> RPCError:
        """Interrupt a run that must end; for an OOM kill the kernel is then restarted."""
        if why == RunWatch.TIMEOUT:
            return await self._stop_timed_out_run(kernel, kernel.limits.exec_timeout)
        kernel.runner.interrupt()
        console: list[list[str]] = []
        try:
            reply = await asyncio.wait_for(kernel.runner.receive(), INTERRUPT_GRACE)
            console = clean_console(reply.get("console"), kernel.limits.max_output)
        except (TimeoutError, RunnerDied):
            pass
        kernel.sandbox.new_oom_kills()
        return await self._out_of_memory(kernel, console)

    async def _died_during_run(self, kernel: Kernel) -> RPCError:
        """The kernel's process died mid-run: out of memory (restart), or gone (end)."""
        if kernel.sandbox.new_oom_kills():
            return await self._out_of_memory(kernel, [])
        self.lifecycle.end_later(kernel, proto.REASON_EXITED)
        if kernel.runner.violation is not None:
            return RPCError(proto.ERR_EXECUTION_FAILED,
                            f"the kernel broke the agent protocol ({kernel.runner.violation}) "
                            "and was ended")
        return RPCError(proto.ERR_EXECUTION_FAILED, "the kernel process exited during the run")

    async def _stop_timed_out_run(self, kernel: Kernel, timeout: float) -> RPCError:
        """Interrupt the run; restart the kernel if it does not stop.  The error to raise."""
        runner = kernel.runner
        runner.interrupt()
        note = f"\n[execution timed out after {timeout:g} s: the run was stopped]\n"
        try:
            reply = await asyncio.wait_for(runner.receive(), INTERRUPT_GRACE)
            console = clean_console(reply.get("console"), kernel.limits.max_output)
            kernel.waiting_input = reply.get("status") == "waiting-input"
        except TimeoutError:
            console = []
            note = (f"\n[execution timed out after {timeout:g} s: the run did not stop, "
                    f"so the kernel was restarted and its state is lost]\n")
            try:
                await self.lifecycle.replace_runner(kernel)
            except (RunnerDied, OSError, TimeoutError, RuntimeError) as exc:
                log.warning("kernel %s: restart after timeout failed: %s", kernel.id, exc)
                self.lifecycle.end_later(kernel, proto.REASON_EXITED)
        console.append(["stderr", note])
        log.info("kernel %s: execution timed out after %g s", kernel.id, timeout)
        return RPCError(proto.ERR_EXECUTION_TIMEOUT,
                        f"execution exceeded the time limit of {timeout:g} s", console=console)


class RunWatch:
    """Ends the wait for a run's reply when its time is up, or as soon as the kernel's
    cgroup counts an OOM kill (polled: one pread every OOM_POLL seconds of the run)."""

    TIMEOUT, OOM = "timeout", "out-of-memory"

    def __init__(self, kernel: Kernel, reply: asyncio.Future[dict[str, Any]], timeout: float):
        self.kernel = kernel
        self.reply = reply
        self.reason: str | None = None
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.call_later(timeout, self._stop, self.TIMEOUT)
        self.poll = self.loop.call_later(OOM_POLL, self._check_memory) \
            if kernel.sandbox.cgroup is not None else None

    def _stop(self, reason: str) -> None:
        if self.reason is None and not self.reply.done():
            self.reason = reason
            self.reply.cancel()

    def _check_memory(self) -> None:
        if self.kernel.sandbox.oom_pending():
            self._stop(self.OOM)
        else:
            self.poll = self.loop.call_later(OOM_POLL, self._check_memory)

    def cancel(self) -> None:
        self.deadline.cancel()
        if self.poll is not None:
            self.poll.cancel()


RUN_STATUSES = frozenset({"finished", "continued", "waiting-input", "build-finished"})
MAX_KIND_CHARS = 32
NOTES_ALLOWANCE = 512  # characters beyond the limit for the runner's own notes (truncation)


def clean_console(console: Any, limit: int) -> list[list[str]]:
    """Console records from a kernel, checked and capped at `limit` characters of output
    (the kernel is untrusted: its own cap may have been tampered with)."""
    records: list[list[str]] = []
    if not isinstance(console, list):
        return records
    size = dropped = 0
    for record in console:
        if not (isinstance(record, (list, tuple)) and len(record) == 2
                and isinstance(record[0], str) and isinstance(record[1], str)):
            continue
        kind, text = record[0][:MAX_KIND_CHARS], record[1]
        room = max(limit + NOTES_ALLOWANCE - size, 0)
        if len(text) > room:
            dropped += len(text) - room
            text = text[:room]
        if text:
            size += len(text)
            records.append([kind, text])
    if dropped:
        records.append(["stderr", f"\n[output truncated by the agent: {dropped} more "
                                  f"characters over the limit of {limit} per execution]\n"])
    return records
