"""Runners come from a fork server (zygote) per interpreter; its death is survivable."""
from __future__ import annotations

import os
import signal
import time

import psutil

from sorna_server import agent_protocol as proto
from tests.helpers import stdout_of


def _command(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.ZombieProcess, psutil.NoSuchProcess):  # a child that is just ending
        return []


def _real_uids(processes: list[psutil.Process]) -> set[int]:
    """Real uids of the processes still there (a forked helper may end meanwhile)."""
    uids = set()
    for process in processes:
        try:
            uids.add(process.uids().real)
        except psutil.NoSuchProcess:  # ended (zombies included) since it was listed
            continue
    return uids


def _zygotes(harness) -> list[psutil.Process]:
    agent = psutil.Process(harness.agent.proc.pid)
    return [child for child in agent.children()
            if "--zygote" in _command(child) and harness.agent.instance_id in _command(child)]


def test_kernels_are_forked_by_one_zygote(harness):
    first = harness.create("python3")
    second = harness.create("bash")
    zygotes = _zygotes(harness)
    assert len(zygotes) == 1  # python3 and bash runners share the interpreter
    forked = zygotes[0].children(recursive=True)
    assert forked
    if os.geteuid() == 0:  # the kernel processes dropped to unprivileged uids
        assert zygotes[0].uids().real == 0
        assert len(_real_uids(forked) - {0}) >= 2
    assert stdout_of(harness.query(first, "import os\nos.getuid() != 0")) == "True\n"
    assert stdout_of(harness.query(second, "echo $((40 + 2))")) == "42\n"


def test_kernels_of_a_dead_zygote_are_reported_and_a_new_one_serves(harness):
    kernel_id = harness.create("python3")
    harness.query(kernel_id, "x = 1")
    (zygote,) = _zygotes(harness)
    zygote.send_signal(signal.SIGKILL)
    event = harness.terminated(kernel_id)
    assert event["reason"] == proto.REASON_EXITED
    # the pool's runners died with it: the next creation takes a fresh one at once
    created = harness.create("python3")
    assert stdout_of(harness.query(created, "6 * 7")) == "42\n"
    (replacement,) = _zygotes(harness)
    assert replacement.pid != zygote.pid
    assert harness.agent.proc.poll() is None


def test_zygote_reaps_the_runners_it_forked(harness):
    for _ in range(4):
        kernel_id = harness.create("python3")
        harness.query(kernel_id, "import subprocess\nsubprocess.run(['true'])")
        harness.ok("destroy_kernel", kernel_id=kernel_id)
    (zygote,) = _zygotes(harness)
    deadline = time.monotonic() + 5
    while True:
        zombies = [child for child in zygote.children()
                   if child.status() == psutil.STATUS_ZOMBIE]
        if not zombies or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert zombies == []
    assert zygote.children()  # the warm pool's runners are still its children
