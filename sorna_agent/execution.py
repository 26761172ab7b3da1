"""Running code in a kernel: query, batch and complete, the exec timeout, the results.

Runs in one kernel are serialised by its lock.  What a kernel answers is
untrusted: results are rebuilt from checked fields only.
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


class Lifecycle(Protocol):
    """What execution needs from the kernel lifecycle (the agent)."""

    async def replace_runner(self, kernel: Kernel) -> None: ...

    def end_later(self, kernel: Kernel, reason: str) -> None: ...


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
                    return await self._query(kernel, code)
                if mode == "batch":
                    return await self._batch(kernel, opts)
                return await self._complete(kernel, code, opts)
            finally:
                kernel.busy -= 1
                kernel.touch()

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
        result: dict[str, Any] = {"status": status or reply.get("status", "finished"),
                                  "console": clean_console(reply.get("console"))}
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
            raise RPCError(proto.ERR_EXECUTION_FAILED, "the kernel process exited") from None
        items = [item for item in reply.get("items", []) if isinstance(item, str)]
        return {"status": "finished", "console": [], "completions": items}

    async def _run(self, kernel: Kernel, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one run to the kernel and wait for its end, within the exec timeout."""
        runner = kernel.runner
        timeout = kernel.limits.exec_timeout
        try:
            runner.send(msg)
            reply = runner.receive()
            timed_out = False

            def on_timeout() -> None:
                nonlocal timed_out
                timed_out = True
                reply.cancel()

            timer = asyncio.get_running_loop().call_later(timeout, on_timeout)
            try:
                return await reply
            except asyncio.CancelledError:
                if not timed_out:
                    raise  # our caller was cancelled, not the timer
            finally:
                timer.cancel()
            raise await self._stop_timed_out_run(kernel, timeout)
        except RunnerDied:
            raise RPCError(proto.ERR_EXECUTION_FAILED,
                           "the kernel process exited during the run") from None

    async def _stop_timed_out_run(self, kernel: Kernel, timeout: float) -> RPCError:
        """Interrupt the run; restart the kernel if it does not stop.  The error to raise."""
        runner = kernel.runner
        runner.interrupt()
        note = f"\n[execution timed out after {timeout:g} s: the run was stopped]\n"
        try:
            reply = await asyncio.wait_for(runner.receive(), INTERRUPT_GRACE)
            console = clean_console(reply.get("console"))
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


def clean_console(console: Any) -> list[list[str]]:
    """Console records from a kernel, checked (the kernel is untrusted)."""
    records: list[list[str]] = []
    if not isinstance(console, list):
        return records
    for record in console:
        if isinstance(record, (list, tuple)) and len(record) == 2 \
                and isinstance(record[0], str) and isinstance(record[1], str):
            records.append([record[0], record[1]])
    return records
