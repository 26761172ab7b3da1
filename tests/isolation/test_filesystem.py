"""A kernel's private filesystem view: other tenants' files, the server's data, host sockets."""
from __future__ import annotations

import os
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from sorna_server.datadir import prepare_data_dir
from tests.helpers import stderr_of, stdout_of

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the kernel sandbox needs root")

LEAVE_SECRETS = ("import os\n"
                 "for path in ('/tmp/secret-a', '/dev/shm/secret-a'):\n"
                 "    with open(path, 'w') as fh:\n"
                 "        fh.write('top secret')\n"
                 "    os.chmod(path, 0o644)  # readable by anyone who can reach it\n"
                 "print(os.getuid())\n")
LOOK_FOR_SECRETS = ("import os\n"
                    "found = []\n"
                    "for path in ('/tmp/secret-a', '/dev/shm/secret-a'):\n"
                    "    try:\n"
                    "        found.append(open(path).read())\n"
                    "    except OSError as exc:\n"
                    "        found.append(type(exc).__name__)\n"
                    "print(os.getuid(), found, os.listdir('/tmp') + os.listdir('/dev/shm'))\n")
NOT_FOUND = "['FileNotFoundError', 'FileNotFoundError'] []"
# all a kernel's root may hold (the lib* and bin links depend on the host's layout)
ROOT = {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp", "usr",
        "workspace"}


def test_tmp_and_shm_stay_private_even_when_the_uid_comes_back(harness_factory):
    # a block of 8 uids: round-robin brings tenant A's uid back after a few kernels
    harness = harness_factory(max_kernels=3, env={"SORNA_AGENT_UID_BLOCK_SIZE": "8"})
    tenant_a = harness.create("python3")
    uid_a = int(stdout_of(harness.query(tenant_a, LEAVE_SECRETS)))
    tenant_b = harness.create("python3")
    seen = stdout_of(harness.query(tenant_b, LOOK_FOR_SECRETS))
    assert seen.split(" ", 1)[1].strip() == NOT_FOUND, seen
    harness.ok("destroy_kernel", kernel_id=tenant_a)

    for _ in range(40):  # churn until a new tenant gets A's uid
        tenant_c = harness.create("python3")
        seen = stdout_of(harness.query(tenant_c, LOOK_FOR_SECRETS))
        if int(seen.split()[0]) == uid_a:
            break
        harness.ok("destroy_kernel", kernel_id=tenant_c)
    else:
        pytest.fail(f"uid {uid_a} never came back")
    assert seen.split(" ", 1)[1].strip() == NOT_FOUND, seen


@pytest.fixture
def exposed_data_dir():
    """A data directory whose parent is world-searchable, as /srv/sorna would be."""
    parent = Path(tempfile.mkdtemp(prefix="sorna-exposed-"))
    parent.chmod(0o755)
    try:
        yield parent / "sorna-data"
    finally:
        import shutil
        shutil.rmtree(parent, ignore_errors=True)


def test_data_directory_is_out_of_reach(harness_factory, exposed_data_dir):
    data_dir = exposed_data_dir
    harness = harness_factory(data_dir=data_dir)
    # what the server keeps there (its SQLite file holds every secret key)
    old_umask = os.umask(0o022)
    try:
        prepare_data_dir(data_dir)
        (data_dir / "sorna.db-wal").write_text("AKIA... secret key")
    finally:
        os.umask(old_umask)
    assert (data_dir.stat().st_mode & 0o777) == 0o700
    assert ((data_dir / "sorna.db-wal").stat().st_mode & 0o777) == 0o600
    state_files = list(data_dir.glob("agent-*.json"))
    assert state_files and all((f.stat().st_mode & 0o777) == 0o600 for f in state_files)

    kernel = harness.create("python3")
    code = ("import os\n"
            "for path in [{d!r}, {d!r} + '/sorna.db-wal', {d!r} + '/agent.log', {p!r}]:\n"
            "    try:\n"
            "        print(path, os.listdir(path) if os.path.isdir(path) else open(path).read())\n"
            "    except OSError as exc:\n"
            "        print(path, type(exc).__name__)\n").format(d=str(data_dir),
                                                              p=str(data_dir.parent))
    seen = stdout_of(harness.query(kernel, code))
    assert "secret" not in seen and "AKIA" not in seen
    assert seen.count("FileNotFoundError") == 4, seen
    # the kernels' own folders are not in the data directory either
    assert not any(p.name.startswith("k-") for p in data_dir.rglob("*"))


@pytest.fixture
def host_socket():
    """A unix socket server on the host that anybody may connect to (like a database's)."""
    folder = Path(tempfile.mkdtemp(prefix="sorna-host-sock-"))
    folder.chmod(0o755)
    path = folder / "service.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o777)
    server.listen()
    accepted: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)
            conn.sendall(b"hello from the host\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path, accepted
    finally:
        server.close()
        for conn in accepted:
            conn.close()
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


CONNECT = ("import socket\n"
           "for path in {paths!r}:\n"
           "    s = socket.socket(socket.AF_UNIX)\n"
           "    try:\n"
           "        s.connect(path)\n"
           "        print(path, 'connected', s.recv(100))\n"
           "    except OSError as exc:\n"
           "        print(path, type(exc).__name__)\n")


def test_host_unix_sockets_are_out_of_reach(harness, host_socket):
    path, accepted = host_socket
    paths = [str(path)]
    postgres = "/run/postgresql/.s.PGSQL.5432"
    if os.path.exists(postgres):
        paths.append(postgres)
    # the socket works from the host: the attack below would succeed without the sandbox
    probe = socket.socket(socket.AF_UNIX)
    probe.connect(str(path))
    assert probe.recv(100) == b"hello from the host\n"
    probe.close()
    accepted_before = len(accepted)

    kernel = harness.create("python3")
    seen = stdout_of(harness.query(kernel, CONNECT.format(paths=paths)))
    assert "connected" not in seen, seen
    assert seen.count("FileNotFoundError") == len(paths), seen
    assert len(accepted) == accepted_before


def test_kernel_root_is_minimal_and_read_only(harness):
    kernel = harness.create("bash")
    # a bash kernel keeps its command script in its own folder, not in /tmp
    assert stdout_of(harness.query(kernel, "echo hi; ls -a /tmp")) == "hi\n.\n..\n"
    result = harness.query(kernel, "ls /; echo ---; ls /etc | tr '\\n' ' '; echo; "
                                   "touch /usr/x /etc/x /x 2>&1 | sed 's/.*: //'; "
                                   "echo ---; pwd; echo $HOME; id -un; "
                                   "grep -c . /proc/self/mountinfo >/dev/null && echo proc-ok; "
                                   "su -c id root 2>&1 | head -1")
    out = stdout_of(result)
    top, middle, rest = out.split("---\n")
    assert {"dev", "etc", "proc", "tmp", "usr", "workspace"} <= set(top.split()) <= ROOT, out
    etc, *touched = middle.splitlines()
    for secret in ("shadow", "gshadow", "sorna", "sudoers"):
        assert secret not in etc.split()
    assert {"passwd", "group", "hosts", "hostname"} <= set(etc.split())
    assert touched == ["Read-only file system"] * 3, out + stderr_of(result)
    assert rest.splitlines()[:4] == ["/workspace", "/workspace", "work", "proc-ok"], out
    assert "uid=0" not in out  # setuid binaries give nothing (nosuid, no_new_privs)
