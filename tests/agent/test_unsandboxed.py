"""The fallback paths of an agent without uid switch or namespaces (as when not root)."""
from __future__ import annotations

import signal

from sorna_server import agent_protocol as proto
from tests.helpers import pty_exchange, stderr_of, stdout_of, wait_for_exit


def test_plain_processes_still_run_and_clean_up(harness_factory):
    harness = harness_factory(isolation="none", exec_timeout=1)
    info = harness.wait_event(lambda e: e["type"] == "instance_started")["info"]
    assert info["isolation"]["user"] == "agent-user"
    assert info["isolation"]["pid_namespace"] is False
    kernel_id = harness.create("python3")
    harness.query(kernel_id, "import os\nstate = os.getpid()")
    assert stdout_of(harness.query(kernel_id, "state > 1")) == "True\n"
    error = harness.error("execute", kernel_id=kernel_id, mode="query",
                          code="import time\ntime.sleep(20)")
    assert error["type"] == proto.ERR_EXECUTION_TIMEOUT
    assert "timed out" in stderr_of(error)
    result = harness.query(kernel_id, "import subprocess\n"
                                      "p = subprocess.Popen(['sleep', '300'])\n"
                                      "p.pid")
    child = int(stdout_of(result))
    created = harness.ok("create_kernel", lang="bash")
    bash = created["kernel_id"]
    assert stdout_of(harness.query(bash, "cd /; pwd")) == "/\n"
    pty_exchange(harness, created, b"echo pty-$((6*7))\n", b"pty-42")
    harness.ok("destroy_kernel", kernel_id=kernel_id)
    assert wait_for_exit([child]) == []
    assert harness.agent.stop(signal.SIGTERM) == 0
    harness.collect(1.0)
    assert [e["kernel_id"] for e in harness.events if e["type"] == "kernel_terminated"] == \
        [kernel_id, bash]
