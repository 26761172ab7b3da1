"""Real resource limits: memory over all a kernel's processes, processes, disk, exact usage."""
from __future__ import annotations

import os
import time
import uuid

import psutil
import pytest

from sorna_server import agent_protocol as proto
from tests.helpers import stderr_of, stdout_of

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the kernel sandbox needs root")

# Four children of 100 MiB each: every one is well under the per-process limit,
# together they are far over the kernel's 256 MiB.
FOUR_CHILDREN = ("import os, time\n"
                 "children = []\n"
                 "for _ in range(4):\n"
                 "    pid = os.fork()\n"
                 "    if pid == 0:\n"
                 "        block = bytearray(100 << 20)\n"
                 "        block[::4096] = b'x' * len(range(0, 100 << 20, 4096))\n"
                 "        time.sleep(30)\n"
                 "        os._exit(0)\n"
                 "    children.append(pid)\n"
                 "statuses = [os.waitpid(pid, 0)[1] for pid in children]\n"
                 "print('all four finished', statuses)\n")


def test_memory_limit_covers_every_process_of_a_kernel(harness_factory):
    harness = harness_factory(max_mem="256m", exec_timeout=20)
    kernel = harness.create("python3")
    other = harness.create("python3")
    harness.query(kernel, "kept = 'state before'")
    started = time.monotonic()
    error = harness.error("execute", kernel_id=kernel, mode="query", code=FOUR_CHILDREN,
                          timeout=30)
    assert error["type"] == "out-of-memory", error
    assert time.monotonic() - started < 10  # the OOM kill ended the run (children sleep 30 s)
    assert "all four finished" not in stdout_of(error)
    assert "out of memory" in stderr_of(error) and "256 MiB" in stderr_of(error)
    # documented outcome: the kernel was restarted (same id, state lost) and serves again
    assert "NameError" in stderr_of(harness.query(kernel, "kept"))
    assert stdout_of(harness.query(kernel, "6 * 7")) == "42\n"
    assert stdout_of(harness.query(other, "'unharmed'")) == "'unharmed'\n"
    stats = harness.ok("destroy_kernel", kernel_id=kernel)
    assert stats["mem_max_bytes"] <= (256 << 20) + (8 << 20)


def test_fork_bomb_is_capped_and_cleaned_up(harness_factory):
    marker = f"bomb-{uuid.uuid4().hex[:8]}"
    harness = harness_factory(max_procs=32, exec_timeout=10)
    bomb = harness.create("python3")
    other = harness.create("python3")
    code = ("import os, time\n"
            "pids = []\n"
            "try:\n"
            "    while True:\n"
            "        pid = os.fork()\n"
            "        if pid == 0:\n"
            f"            os.execv('/bin/sleep', ['{marker}', '600'])\n"
            "        pids.append(pid)\n"
            "except OSError as exc:\n"
            "    print('stopped after', len(pids), type(exc).__name__)\n")
    result = harness.query(bomb, code)
    assert "stopped after" in stdout_of(result), result
    assert int(stdout_of(result).split()[2]) < 32
    assert stdout_of(harness.query(other, "2 + 2")) == "4\n"
    # the run is over: what it forked is gone (killed when the run ended)
    deadline = time.monotonic() + 5
    while True:
        left = [p for p in psutil.process_iter(["cmdline"])
                if marker in " ".join(p.info["cmdline"] or [])
                and p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == []
    assert stdout_of(harness.query(bomb, "'still here'")) == "'still here'\n"


FILL = ("import os\n"
        "written = 0\n"
        "chunk = b'x' * (1 << 20)\n"
        "try:\n"
        "    with open({path!r}, 'wb') as fh:\n"
        "        for _ in range(1024):\n"
        "            fh.write(chunk)\n"
        "            fh.flush()\n"
        "            written += len(chunk)\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__, exc.errno)\n"
        "print(written >> 20)\n")


def test_disk_fill_stops_at_the_quota(harness_factory):
    harness = harness_factory(max_file_size="1g", env={
        "SORNA_AGENT_DISK_QUOTA": "24m", "SORNA_AGENT_TMP_SIZE": "16m",
        "SORNA_AGENT_SHM_SIZE": "8m"})
    kernel = harness.create("python3")
    other = harness.create("python3")
    for path, quota in (("fill-1", 24), ("/tmp/fill", 16), ("/dev/shm/fill", 8)):
        out = stdout_of(harness.query(kernel, FILL.format(path=path)))
        error, written = out.splitlines()
        assert error == "OSError 28", out  # ENOSPC
        assert quota - 2 <= int(written) <= quota, out
    # a second file does not get more room, and the other tenant's folder is untouched
    out = stdout_of(harness.query(kernel, FILL.format(path="fill-2")))
    assert int(out.splitlines()[-1]) <= 1
    error, written = stdout_of(harness.query(other, FILL.format(path="mine"))).splitlines()
    assert error == "OSError 28" and 22 <= int(written) <= 24
    harness.ok("destroy_kernel", kernel_id=kernel)
    assert stdout_of(harness.query(other, "import os\nos.listdir('.')")) == "['mine']\n"


def test_cpu_usage_is_exact_and_counts_every_process(harness_factory):
    harness = harness_factory(stats_interval=60)
    kernel = harness.create("bash")
    # a child that is never waited for by the kernel (it is orphaned and reaped by
    # PID 1): a per-process sample would miss its CPU time
    busy = ("python3 -c 'import time\nt = time.process_time()\n"
            "while time.process_time() - t < 0.4: pass\nopen(\"burnt\", \"w\")' &")
    harness.query(kernel, f"( {busy} ); while [ ! -e burnt ]; do sleep 0.05; done; echo done")
    stats = harness.ok("destroy_kernel", kernel_id=kernel)
    assert stats["cpu_used"] >= 400, stats
    event = harness.terminated(kernel)
    assert event["reason"] == proto.REASON_DESTROYED and event["stats"] == stats


async def test_the_client_sees_out_of_memory_through_the_gateway(gateway_factory):
    gateway = await gateway_factory(agents=1, agent_flags={"max_mem": "256m",
                                                           "exec_timeout": 20})
    kernel_id = await gateway.create_kernel("python3")
    status, body = await gateway.execute(kernel_id, FOUR_CHILDREN)
    assert status == 500, body
    assert body["type"].endswith("/kernel-execution-failed")
    assert body["agentError"]["type"] == "out-of-memory"
    assert "out of memory" in "".join(text for _, text in body["agentError"]["console"])
    status, body = await gateway.execute(kernel_id, "6 * 7")  # restarted, usable
    assert status == 200 and body["result"]["console"] == [["stdout", "42\n"]], body
