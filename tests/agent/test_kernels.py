"""Kernel features over real RPC: input, limits, batch, complete, restart, idle."""
from __future__ import annotations

import time

from sorna_server import agent_protocol as proto
from tests.helpers import (
    kernel_process_filter,
    processes_matching,
    stderr_of,
    stdout_of,
    wait_processes_gone,
)


def test_input_continuation_and_password_prompt(harness):
    kernel_id = harness.create("python3")
    result = harness.query(kernel_id, "name = input('Name? ')\nprint('hello', name)")
    assert result["status"] == "waiting-input"
    assert result["options"] == {"is_password": False}
    assert stdout_of(result) == "Name? "
    result = harness.query(kernel_id, "Ada")
    assert result["status"] == "finished"
    assert stdout_of(result) == "hello Ada\n"
    code = "import getpass\nsecret = getpass.getpass()\nprint(len(secret))"
    result = harness.query(kernel_id, code)
    assert result["status"] == "waiting-input"
    assert result["options"]["is_password"] is True
    assert stdout_of(harness.query(kernel_id, "s3cret")) == "6\n"
    # the same run continued: state made before and after the prompt is there
    assert stdout_of(harness.query(kernel_id, "name, secret")) == "('Ada', 's3cret')\n"


def test_exec_timeout_stops_the_run_and_kernel_stays_usable(harness_factory):
    harness = harness_factory(exec_timeout=1)
    kernel_id = harness.create("python3")
    harness.query(kernel_id, "kept = 7")
    started = time.monotonic()
    error = harness.error("execute", kernel_id=kernel_id, mode="query",
                          code="print('before')\nimport time\nwhile True: time.sleep(0.01)")
    assert error["type"] == proto.ERR_EXECUTION_TIMEOUT
    assert time.monotonic() - started < 5
    assert "before" in stdout_of(error)
    assert "timed out" in stderr_of(error)
    assert stdout_of(harness.query(kernel_id, "kept")) == "7\n"
    # a run that ignores SIGINT gets the kernel restarted transparently
    code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(30)"
    error = harness.error("execute", kernel_id=kernel_id, mode="query", code=code)
    assert error["type"] == proto.ERR_EXECUTION_TIMEOUT
    assert "restarted" in stderr_of(error)
    assert stdout_of(harness.query(kernel_id, "1 + 1")) == "2\n"
    assert kernel_id in harness.ok("list_kernels")


def test_create_limits_lower_but_never_raise(harness_factory):
    harness = harness_factory(exec_timeout=5, max_mem="256m")
    result = harness.ok("create_kernel", lang="python3",
                        limits={"maxMem": "128m", "execTimeout": 2})
    assert result["limits"]["max_mem"] == 128 << 20
    assert result["limits"]["exec_timeout"] == 2
    result = harness.ok("create_kernel", lang="python3", limits={"maxMem": "4g", "execTimeout": 0})
    assert result["limits"]["max_mem"] == 256 << 20
    assert result["limits"]["exec_timeout"] == 5
    error = harness.error("create_kernel", lang="python3", limits={"maxMem": "lots"})
    assert error["type"] == proto.ERR_INVALID_ARGS


def test_memory_limit_fails_inside_the_kernel(harness):
    kernel_id = harness.create("python3")
    result = harness.query(kernel_id, "block = bytearray(2 * 1024**3)")
    assert "MemoryError" in stderr_of(result)
    assert stdout_of(harness.query(kernel_id, "'alive'")) == "'alive'\n"
    assert harness.agent.proc.poll() is None
    assert harness.ok("ping")


def test_fork_bomb_is_contained(harness_factory):
    harness = harness_factory(max_procs=32, exec_timeout=10)
    bomb = harness.create("python3")
    other = harness.create("python3")
    of_bomb = kernel_process_filter(harness, bomb)
    own = processes_matching(of_bomb)  # the kernel's own processes
    assert own
    code = ("import os, time\n"
            "pids = []\n"
            "try:\n"
            "    while True:\n"
            "        pid = os.fork()\n"
            "        if pid == 0:\n"
            "            time.sleep(60)\n"
            "            os._exit(0)\n"
            "        pids.append(pid)\n"
            "except OSError as exc:\n"
            "    print('stopped after', len(pids), type(exc).__name__)\n")
    result = harness.query(bomb, code)
    assert "stopped after" in stdout_of(result)
    count = int(stdout_of(result).split()[2])
    assert 0 < count < 32
    # the sleepers do not outlive the run: the agent kills what a run leaves behind
    # (found by what they share with the kernel; tests/isolation checks this in depth)
    deadline = time.monotonic() + 15
    while set(processes_matching(of_bomb)) - set(own):
        assert time.monotonic() < deadline, (own, processes_matching(of_bomb))
        time.sleep(0.05)
    assert stdout_of(harness.query(other, "2 + 2")) == "4\n"
    harness.ok("destroy_kernel", kernel_id=bomb)
    wait_processes_gone(own)
    assert processes_matching(of_bomb) == []


def test_output_flood_is_truncated(harness_factory):
    harness = harness_factory(max_output="64k")
    kernel_id = harness.create("python3")
    result = harness.query(kernel_id, "for i in range(200000): print('flood line', i)")
    out = stdout_of(result)
    assert len(out) <= 64 * 1024
    assert "output truncated" in stderr_of(result)
    result = harness.query(kernel_id, "import os\nos.system('yes | head -c 3000000')")
    assert len(stdout_of(result)) <= 64 * 1024
    assert "output truncated" in stderr_of(result)
    assert stdout_of(harness.query(kernel_id, "'after'")) == "'after'\n"


def test_idle_timeout_destroys_with_event(harness_factory):
    harness = harness_factory(idle_timeout=1)
    kernel_id = harness.create("python3")
    event = harness.terminated(kernel_id, timeout=10)
    assert event["reason"] == proto.REASON_IDLE
    assert set(event["stats"]) == set(proto.STATS_FIELDS)
    assert kernel_id not in harness.ok("list_kernels")


def test_restart_keeps_id_and_clears_state(harness):
    created = harness.ok("create_kernel", lang="python3", kernel_id="k-restart-test")
    kernel_id = created["kernel_id"]
    assert kernel_id == "k-restart-test"
    harness.query(kernel_id, "value = 99")
    ports = harness.ok("restart_kernel", kernel_id=kernel_id)
    assert (ports["stdin_port"], ports["stdout_port"]) != \
        (created["stdin_port"], created["stdout_port"])
    assert "NameError" in stderr_of(harness.query(kernel_id, "value"))
    assert stdout_of(harness.query(kernel_id, "'fresh'")) == "'fresh'\n"
    # events come in order: a heartbeat made after the restart that lists the kernel
    # comes after any kernel_terminated the restart could have sent
    restarted_at = time.time()
    harness.wait_event(lambda e: e["type"] == "instance_heartbeat" and e["ts"] > restarted_at
                       and kernel_id in e["running_kernels"])
    assert not [e for e in harness.events if e["type"] == "kernel_terminated"]


def test_upload_and_batch(harness):
    kernel_id = harness.create("python3")
    main = b"import helper\nprint('batch', helper.VALUE)\n"
    assert harness.ok("upload_file", kernel_id=kernel_id, name="main.py", data=main) == \
        {"name": "main.py", "size": len(main)}
    harness.ok("upload_file", kernel_id=kernel_id, name="helper.py", data=b"VALUE = 5\n")
    harness.ok("upload_file", kernel_id=kernel_id, name="sub/dir/data.txt", data=b"x")
    for bad in ("../escape.py", "/etc/passwd", "sub/../../x", ""):
        error = harness.error("upload_file", kernel_id=kernel_id, name=bad, data=b"x")
        assert error["type"] == proto.ERR_INVALID_ARGS, bad
    # a symlink planted by the kernel is not followed
    harness.query(kernel_id, "import os\nos.symlink('/tmp', 'link')")
    assert harness.error("upload_file", kernel_id=kernel_id, name="link/x",
                         data=b"x")["type"] in (proto.ERR_INVALID_ARGS, proto.ERR_UPLOAD_FAILED)

    opts = {"build": "echo building; python3 -c 'open(\"built.txt\",\"w\").write(\"ok\")'",
            "exec": "*"}
    result = harness.ok("execute", kernel_id=kernel_id, mode="batch", code="", opts=opts)
    assert result["status"] == "build-finished"
    assert "building" in stdout_of(result)
    result = harness.ok("execute", kernel_id=kernel_id, mode="batch", code="", opts=opts)
    assert result["status"] == "finished"
    assert stdout_of(result) == "batch 5\n", result
    result = harness.ok("execute", kernel_id=kernel_id, mode="batch", code="",
                        opts={"exec": "cat built.txt sub/dir/data.txt"})
    assert result == {"status": "finished", "console": [["stdout", "okx"]]}


def test_bash_batch_with_default_exec(harness):
    kernel_id = harness.create("bash")
    harness.ok("upload_file", kernel_id=kernel_id, name="main.sh",
               data=b"echo from-script $((6*7))\n")
    result = harness.ok("execute", kernel_id=kernel_id, mode="batch", code="",
                        opts={"build": "", "exec": "*"})
    assert result["status"] == "finished"
    assert stdout_of(result) == "from-script 42\n"


def test_complete(harness):
    kernel_id = harness.create("python3")
    harness.query(kernel_id, "import collections\nmy_variable = 1")
    result = harness.ok("execute", kernel_id=kernel_id, mode="complete", code="",
                        opts={"line": "my_va", "row": 0, "col": 5})
    assert "my_variable" in result["completions"]
    result = harness.ok("execute", kernel_id=kernel_id, mode="complete", code="",
                        opts={"line": "collections.Ord", "row": 0, "col": 15})
    assert "collections.OrderedDict(" in result["completions"]


def test_bash_exec_timeout_keeps_the_session(harness_factory):
    harness = harness_factory(exec_timeout=1)
    kernel_id = harness.create("bash")
    harness.query(kernel_id, "KEEP=yes")
    error = harness.error("execute", kernel_id=kernel_id, mode="query",
                          code="echo start; sleep 30; echo never")
    assert error["type"] == proto.ERR_EXECUTION_TIMEOUT
    assert "start" in stdout_of(error) and "never" not in stdout_of(error)
    assert stdout_of(harness.query(kernel_id, "echo $KEEP")) == "yes\n"


def test_kernel_that_exits_is_reported(harness):
    kernel_id = harness.create("python3")
    error = harness.error("execute", kernel_id=kernel_id, mode="query",
                          code="import os\nos._exit(3)")
    assert error["type"] == proto.ERR_EXECUTION_FAILED
    event = harness.terminated(kernel_id)
    assert event["reason"] == proto.REASON_EXITED
    assert kernel_id not in harness.ok("list_kernels")


def test_reset_destroys_everything(harness_factory):
    harness = harness_factory(max_kernels=2)
    first, second = harness.create("python3"), harness.create("bash")
    assert harness.error("create_kernel", lang="python3")["type"] == proto.ERR_NO_CAPACITY
    result = harness.ok("reset")
    assert sorted(result["destroyed"]) == sorted([first, second])
    for kernel_id in (first, second):
        assert harness.terminated(kernel_id)["reason"] == proto.REASON_RESET
    assert harness.ok("list_kernels") == {}
    assert harness.create("python3")
