"""Core agent behaviour over real RPC: kernels, execute, events."""
from __future__ import annotations

import time

from sorna_server import agent_protocol as proto

from .conftest import stderr_of, stdout_of


def test_ping_and_started_event(harness):
    result = harness.ok("ping")
    assert result["instance_id"] == harness.agent.instance_id
    assert result["addr"] == harness.agent.addr
    started = harness.wait_event(lambda e: e["type"] == "instance_started")
    info = started["info"]
    assert set(info["languages"]) >= {"python3", "bash"}
    assert info["isolation"]["user"] in ("uid-per-kernel", "agent-user")
    beat = harness.wait_event(lambda e: e["type"] == "instance_heartbeat")
    assert beat["interval"] == 0.5
    assert beat["running_kernels"] == []


def test_python_state_persists_and_errors_are_tracebacks(harness):
    kernel_id = harness.create("python3")
    assert stdout_of(harness.query(kernel_id, "x = 20\nprint('hello')")) == "hello\n"
    assert stdout_of(harness.query(kernel_id, "x * 2 + 2")) == "42\n"
    result = harness.query(kernel_id, "1 / 0")
    assert result["status"] == "finished"
    assert "ZeroDivisionError" in stderr_of(result)
    assert "runner.py" not in stderr_of(result)
    assert "SyntaxError" in stderr_of(harness.query(kernel_id, "def ("))
    result = harness.query(kernel_id, "import os\nrc = os.system('echo from-child')")
    assert "from-child" in stdout_of(result)
    listed = harness.ok("list_kernels")
    assert listed[kernel_id]["lang"] == "python3"


def test_bash_session_keeps_cwd_and_variables(harness):
    kernel_id = harness.create("bash")
    harness.query(kernel_id, "mkdir -p sub && cd sub && GREETING=hi")
    result = harness.query(kernel_id, 'echo "$GREETING from $(basename $PWD)"')
    assert stdout_of(result) == "hi from sub\n"
    assert "nope" in stderr_of(harness.query(kernel_id, "ls nope"))


def test_destroy_reports_stats_and_event(harness):
    kernel_id = harness.create("python3")
    harness.query(kernel_id, "sum(range(10**6))")
    stats = harness.ok("destroy_kernel", kernel_id=kernel_id)
    assert set(stats) == set(proto.STATS_FIELDS)
    assert stats["mem_max_bytes"] > 1 << 20
    event = harness.terminated(kernel_id)
    assert event["reason"] == proto.REASON_DESTROYED
    assert event["stats"] == stats
    assert harness.error("execute", kernel_id=kernel_id, mode="query",
                         code="1")["type"] == proto.ERR_KERNEL_NOT_FOUND


def test_errors_for_bad_requests(harness):
    assert harness.error("no_such_method")["type"] == proto.ERR_UNKNOWN_METHOD
    assert harness.error("create_kernel")["type"] == proto.ERR_INVALID_ARGS
    assert harness.error("create_kernel", lang="cobol")["type"] == proto.ERR_UNSUPPORTED_LANG
    assert harness.error("destroy_kernel", kernel_id="nope")["type"] == proto.ERR_KERNEL_NOT_FOUND
    assert harness.error("execute", kernel_id="x", mode="dance",
                         code="")["type"] == proto.ERR_INVALID_ARGS
    # malformed frames are dropped; the agent keeps answering
    harness.dealer.send(b"\xc1not msgpack")
    harness.dealer.send(proto.pack({"v": 99, "id": 1, "method": "ping"}))
    harness.dealer.send(proto.pack([1, 2, 3]))
    harness.dealer.send_multipart([b"two", b"frames"])
    assert harness.ok("ping")["instance_id"] == harness.agent.instance_id


def test_slow_kernel_does_not_delay_another(harness):
    slow = harness.create("python3")
    fast = harness.create("python3")
    slow_id = harness.send("execute", kernel_id=slow, mode="query", code="import time; time.sleep(5)")
    started = time.monotonic()
    fast_id = harness.send("execute", kernel_id=fast, mode="query", code="6 * 7")
    reply = harness.receive()
    assert reply.id == fast_id and stdout_of(reply.result) == "42\n"
    assert time.monotonic() - started < 1.0
    reply = harness.receive(timeout=10)
    assert reply.id == slow_id and reply.ok
