"""A kernel's processes: what it can see, what a run may leave behind, its terminal."""
from __future__ import annotations

import os
import time
import uuid

import psutil
import pytest

from tests.helpers import pty_exchange, stdout_of

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the kernel sandbox needs root")

COUNT_PROCESSES = ("import os\n"
                   "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
                   "cmdlines = [open(f'/proc/{p}/cmdline', 'rb').read() for p in pids]\n"
                   "print(len(pids), any(b'MARKER' in c for c in cmdlines))\n")


def _host_processes_with(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _wait_until_gone(marker: str, timeout: float = 5.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in _host_processes_with(marker)
                 if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def test_kernel_sees_only_its_own_processes(harness):
    marker = f"tenant-a-{uuid.uuid4().hex[:8]}"
    # tenant A's terminal runs a long command: a process of A outside any run
    tenant_a = harness.ok("create_kernel", lang="bash")
    pty_exchange(harness, tenant_a, f"(exec -a {marker} sleep 300) &\necho started-$((6*7))\n"
                 .encode(), b"started-42")
    assert _host_processes_with(marker)  # it runs, and the host sees it
    assert len(psutil.pids()) > 20
    tenant_b = harness.create("python3")
    count, seen_marker = stdout_of(harness.query(
        tenant_b, COUNT_PROCESSES.replace("MARKER", marker))).split()
    assert int(count) <= 3, count  # PID 1 and the kernel: nothing of the host or of A
    assert seen_marker == "False"
    # A sees its own terminal's processes, and not many more
    count, seen_marker = stdout_of(harness.query(
        tenant_a["kernel_id"], "python3 -c \"$(cat <<'EOF'\n"
        + COUNT_PROCESSES.replace("MARKER", marker) + "EOF\n)\"")).split()
    assert seen_marker == "True" and int(count) <= 9, count


def test_background_spinner_is_killed_when_the_run_ends(harness):
    marker = f"spinner-{uuid.uuid4().hex[:8]}"
    kernel = harness.create("python3")
    result = harness.query(kernel, "import subprocess, sys\n"
                                   "spinner = subprocess.Popen([sys.executable, '-c', "
                                   f"'while 1: pass', {marker!r}])\n"
                                   "kept = 'state'\n"
                                   "print('started')")
    assert stdout_of(result) == "started\n"
    assert _wait_until_gone(marker) == []
    assert stdout_of(harness.query(kernel, "kept")) == "'state'\n"  # the kernel itself stays

    shell = harness.create("bash")
    harness.query(shell, f"KEEP=yes; (exec -a {marker}-bash python3 -c 'while 1: pass') & "
                         "disown; echo started")
    assert _wait_until_gone(f"{marker}-bash") == []
    assert stdout_of(harness.query(shell, "echo $KEEP")) == "yes\n"  # the session stays


def test_terminal_has_no_new_privileges(harness):
    created = harness.ok("create_kernel", lang="bash")
    received = pty_exchange(harness, created,
                            b"grep NoNewPrivs /proc/self/status; su -c 'echo ROOT' root "
                            b"</dev/null 2>/dev/null || echo su-$((40+2))-refused\n",
                            b"su-42-refused")
    assert b"NoNewPrivs:\t1" in received
    assert b"\r\nROOT" not in received
    # the terminal lives in the kernel's sandbox: its own root, its own uid
    received = pty_exchange(harness, created, b"echo uid-$(id -u) $(ls / | tr -d '\\n')\n",
                            b"workspace")
    assert b"uid-0" not in received


def test_a_spinner_hidden_behind_an_ended_thread_is_killed_soon_after(harness_factory):
    # the check after each run counts the kernel's tasks: a run that ends one of the
    # kernel's threads and leaves a process keeps the count; the periodic sweep (every
    # agent_stats_interval) finds it
    harness = harness_factory(stats_interval=0.5)
    marker = f"hidden-{uuid.uuid4().hex[:8]}"
    kernel = harness.create("python3")
    harness.query(kernel, "import threading\nstop = threading.Event()\n"
                          "worker = threading.Thread(target=stop.wait)\nworker.start()")
    result = harness.query(kernel, "import subprocess, sys\nstop.set()\nworker.join()\n"
                                   "spinner = subprocess.Popen([sys.executable, '-c', "
                                   f"'while 1: pass', {marker!r}])\nprint('started')")
    assert stdout_of(result) == "started\n"
    assert _wait_until_gone(marker, timeout=5.0) == []
