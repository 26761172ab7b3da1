"""The plan of a kernel's root filesystem (built by the runner, as PID 1 of the kernel).

The agent works it out once at start from the host's folders, so the runner
only follows it: which system folders to bind read-only, which of the host's
top-level symlinks to copy (/bin -> usr/bin on merged-/usr systems), which
parts of /etc to show, and the generated /etc files (passwd, group, hosts,
hostname).  docs/kernel-sandbox.md lists the result.
"""
from __future__ import annotations

import glob
import os
from typing import Any

HOME = "/workspace"           # the kernel's working folder, as the kernel sees it
KERNEL_USER = "work"
HOSTNAME = "sorna-kernel"
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def plan(binds: list[str], etc: list[str], stage: str, tmp_size: int,
         shm_size: int) -> dict[str, Any]:
    """The static part of the plan (the same for every kernel of this agent)."""
    folders, links = [], []
    for path in binds:
        if os.path.islink(path):
            links.append([path, os.readlink(path)])
        elif os.path.isdir(path):
            folders.append(path)
    etc_binds, etc_links = [], []
    for pattern in etc:
        for found in sorted(glob.glob(os.path.join("/etc", pattern))):
            name = os.path.relpath(found, "/etc")
            if "/" in name or name in ("passwd", "group", "hosts", "hostname"):
                continue
            if os.path.islink(found):
                etc_links.append([name, os.readlink(found)])
            elif os.path.isfile(found) or os.path.isdir(found):
                etc_binds.append(name)
    return {"stage": stage, "binds": folders, "links": links, "etc_binds": etc_binds,
            "etc_links": etc_links, "tmp_size": tmp_size, "shm_size": shm_size, "home": HOME}


def etc_files(uid: int | None) -> dict[str, str]:
    """Generated /etc files: the kernel's own user is the only one besides root/nobody."""
    user = uid if uid is not None else 0
    passwd = "root:x:0:0:root:/:/usr/sbin/nologin\n"
    group = "root:x:0:\n"
    if user != 0:
        passwd += f"{KERNEL_USER}:x:{user}:{user}:kernel:{HOME}:/bin/bash\n"
        group += f"{KERNEL_USER}:x:{user}:\n"
    passwd += "nobody:x:65534:65534:nobody:/:/usr/sbin/nologin\n"
    group += "nogroup:x:65534:\n"
    return {"passwd": passwd, "group": group, "hosts": HOSTS, "hostname": HOSTNAME + "\n"}
