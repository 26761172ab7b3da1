"""Core agent behaviour over real RPC: kernels, execute, events."""
from __future__ import annotations

import os
import time

import psutil

from sorna_server import agent_protocol as proto
from tests.helpers import (
    is_alive,
    pty_exchange,
    stderr_of,
    stdout_of,
    wait_processes_gone,
)


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


# CPU the stats test burns, measured by the kernel itself; cpu_used is exact with
# cgroups, and read from /proc in clock ticks (10 ms) without: allow one tick.
SPIN_MS = 100
TICK_MS = 10
SPIN = f"""
import time
start = time.process_time()
while time.process_time() - start < {SPIN_MS / 1000}:
    pass
"""


def test_destroy_reports_stats_and_event(harness_factory):
    harness = harness_factory(stats_interval=0.3)
    created_at = time.monotonic()
    kernel_id = harness.create("python3")
    harness.query(kernel_id, SPIN)
    queried_at = time.time()
    periodic = harness.wait_event(lambda e: e["type"] == "instance_stats"
                                  and kernel_id in e["stats"] and e["ts"] > queried_at)
    assert set(periodic["stats"][kernel_id]) == set(proto.STATS_FIELDS)
    assert periodic["stats"][kernel_id]["cpu_used"] >= SPIN_MS - TICK_MS
    stats = harness.ok("destroy_kernel", kernel_id=kernel_id)
    assert set(stats) == set(proto.STATS_FIELDS)
    assert stats["cpu_used"] >= periodic["stats"][kernel_id]["cpu_used"]  # never decreases
    # milliseconds, not seconds or microseconds: no more CPU than the cores had since creation
    wall_ms = (time.monotonic() - created_at) * 1000
    assert stats["cpu_used"] <= wall_ms * (os.cpu_count() or 1)
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
    # the slow run takes 5 s whatever the machine's speed; the fast reply must not wait
    # for it, so it comes first (a serialising agent would answer in request order)
    slow_id = harness.send("execute", kernel_id=slow, mode="query",
                           code="import time; time.sleep(5)")
    fast_id = harness.send("execute", kernel_id=fast, mode="query", code="6 * 7")
    reply = harness.receive()
    assert reply.id == fast_id and stdout_of(reply.result) == "42\n"
    reply = harness.receive(timeout=15)
    assert reply.id == slow_id and reply.ok


def test_pty_round_trip_and_resize(harness):
    created = harness.ok("create_kernel", lang="bash")
    assert harness.ok("resize_pty", kernel_id=created["kernel_id"], rows=30, cols=100) == {}
    received = pty_exchange(harness, created, b"echo pty-$((6*7)); stty size\n", b"pty-42")
    assert b"30 100" in received
    assert harness.error("resize_pty", kernel_id=created["kernel_id"], rows=0,
                         cols=10)["type"] == proto.ERR_INVALID_ARGS
    created = harness.ok("create_kernel", lang="python3")
    pty_exchange(harness, created, b"print(6 * 7 * 1000)\n", b"42000")


def test_sigterm_destroys_kernels_and_reports_everything(harness):
    import signal
    kernels = {harness.create("python3"), harness.create("bash")}
    runner_pids = [p.pid for p in psutil.process_iter(["cmdline"])
                   if any("runner.py" in part for part in (p.info["cmdline"] or []))
                   and harness.agent.instance_id in " ".join(p.info["cmdline"] or [])]
    assert runner_pids
    assert all(is_alive(pid) for pid in runner_pids)
    assert harness.agent.stop(signal.SIGTERM) == 0
    harness.wait_event(lambda e: e["type"] == "instance_terminated")
    ended = {e["kernel_id"]: e for e in harness.events if e["type"] == "kernel_terminated"}
    assert set(ended) == kernels
    assert all(e["reason"] == proto.REASON_AGENT_SHUTDOWN for e in ended.values())
    assert harness.events[-1]["type"] == "instance_terminated"
    wait_processes_gone(runner_pids)


def test_events_wait_bounded_until_a_manager_listens(agent_factory, free_port):
    import zmq
    port = free_port()
    agent = agent_factory(events_port=port, heartbeat_interval=0.05, event_queue_size=8,
                          pool_size=0)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    pull = ctx.socket(zmq.PULL)
    try:
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(agent.addr)
        dealer.send(proto.encode_request(1, "create_kernel", {"lang": "python3"}))
        assert dealer.poll(15000)
        kernel_id = proto.decode_reply(dealer.recv()).result["kernel_id"]
        dealer.send(proto.encode_request(2, "destroy_kernel", {"kernel_id": kernel_id}))
        assert dealer.poll(15000) and proto.decode_reply(dealer.recv()).ok
        # wait until the agent says it dropped events: with the queue's 8 kept, at
        # least 18 were made while nobody listened
        deadline = time.monotonic() + 30
        while "dropped 10 heartbeat/stats events" not in agent.log():
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.05)
        pull.setsockopt(zmq.LINGER, 0)
        bound_at = time.time()
        pull.bind(f"tcp://127.0.0.1:{port}")
        events = []
        # the queue comes first, in order: read until an event made after the bind
        while not events or events[-1]["ts"] <= bound_at:
            assert pull.poll(15000), events
            events.append(proto.decode_event(pull.recv()))
        types = [e["type"] for e in events]
        assert types[0] == "instance_started"
        assert [e["kernel_id"] for e in events if e["type"] == "kernel_terminated"] == [kernel_id]
        # of the 18 or more events made while nobody listened, at most the queue's 8
        # were kept
        made_before = [e for e in events if e["ts"] < bound_at - 0.02]
        assert len(made_before) <= 8, [(e["type"], e["ts"]) for e in made_before]
        assert any(e["type"] == "instance_heartbeat" for e in made_before)
    finally:
        dealer.close(0)
        pull.close(0)
        ctx.term()


def test_cli_refuses_a_bad_address_with_one_line(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "sorna_cli", "--data-dir", str(tmp_path), "agent",
                           "--rpc-addr", "not-an-address"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode != 0
    assert "agent_rpc_addr" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_killed_agent_leaves_no_kernel_processes(harness):
    import signal
    harness.create("python3")
    busy = harness.create("python3")
    harness.send("execute", kernel_id=busy, mode="query", code="while True: pass")
    mine = [p.pid for p in psutil.process_iter(["cmdline"])
            if harness.agent.instance_id in " ".join(p.info["cmdline"] or [])
            and any("runner.py" in part for part in p.info["cmdline"] or [])]
    assert mine and all(is_alive(pid) for pid in mine)
    harness.agent.stop(signal.SIGKILL)
    wait_processes_gone(mine)
