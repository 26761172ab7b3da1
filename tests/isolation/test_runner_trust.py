"""The agent trusts nothing the runner says: a tenant may rewrite its own runner."""
from __future__ import annotations

import os

import pytest

from sorna_server import agent_protocol as proto
from tests.helpers import stderr_of, stdout_of

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the kernel sandbox needs root")

# Find the runner's channel to the agent and write a `done` of our own making, with
# far more output than the kernel's limit, for the request being answered.
FORGE_DONE = ("import gc, json, struct\n"
              "kernel = next(o for o in gc.get_objects() if type(o).__name__ == 'PythonKernel')\n"
              "text = 'A' * {size}\n"
              "frame = json.dumps({{'type': 'done', 'status': 'finished', 'seq': kernel.seq,\n"
              "                     'console': [['stdout', text]]}}).encode()\n"
              "kernel.chan.sock.sendall(struct.pack('>I', len(frame)) + frame)\n")


def test_forged_done_with_oversized_output_does_not_get_through(harness_factory):
    harness = harness_factory(max_output="64k")
    kernel = harness.create("python3")
    other = harness.create("python3")

    # under the frame cap but over the output limit: cut by the agent itself
    result = harness.query(kernel, FORGE_DONE.format(size=300_000))
    assert len(stdout_of(result)) <= 64 * 1024 + 512
    assert "output truncated by the agent" in stderr_of(result)
    assert stdout_of(harness.query(kernel, "'after'")) == "'after'\n"

    # 52 MB: the frame alone breaks the protocol, the kernel is ended
    reply = harness.call("execute", kernel_id=kernel, mode="query",
                         code=FORGE_DONE.format(size=52_000_000), timeout=30)
    assert not reply.ok
    assert reply.error["type"] == proto.ERR_EXECUTION_FAILED
    assert "protocol" in reply.error["message"]
    assert len(proto.pack(reply.error)) < 4096
    assert harness.terminated(kernel)["reason"] == proto.REASON_EXITED
    assert stdout_of(harness.query(other, "'unharmed'")) == "'unharmed'\n"


def test_a_runner_flooding_the_agent_with_messages_is_ended(harness):
    kernel = harness.create("python3")
    code = ("import gc, json, struct\n"
            "kernel = next(o for o in gc.get_objects() if type(o).__name__ == 'PythonKernel')\n"
            "frame = json.dumps({'type': 'pong', 'seq': kernel.seq}).encode()\n"
            "for _ in range(10000):\n"
            "    kernel.chan.sock.sendall(struct.pack('>I', len(frame)) + frame)\n"
            "import time; time.sleep(5)\n")
    reply = harness.call("execute", kernel_id=kernel, mode="query", code=code, timeout=30)
    # the first forged message answers the run (not a `done`: refused); the flood behind
    # it breaks the protocol and ends the kernel, instead of piling up in the agent
    assert not reply.ok and reply.error["type"] == proto.ERR_EXECUTION_FAILED
    assert harness.terminated(kernel)["reason"] == proto.REASON_EXITED
    assert harness.ok("ping")
