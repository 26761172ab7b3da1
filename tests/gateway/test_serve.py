"""`sorna serve` as a real process, used by the unchanged historic `sorna-client`.

From an empty folder, `sorna serve --standalone` brings up embedded Redis and
SQLite, the schema, the example keypair and a local agent; the client's `run`
command (the one `lcc` runs) and its `Kernel` class then work against it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import (
    EXAMPLE_ACCESS,
    EXAMPLE_SECRET,
    VERSION_HEADERS,
    stdout_of,
)


def client_env(endpoint: str) -> dict[str, str]:
    return {**os.environ, "SORNA_ENDPOINT": endpoint, "SORNA_ACCESS_KEY": EXAMPLE_ACCESS,
            "SORNA_SECRET_KEY": EXAMPLE_SECRET}


KERNEL_SCRIPT = textwrap.dedent("""
    import json, sys, uuid
    from sorna.kernel import Kernel
    out = {}
    token = uuid.uuid4().hex
    kernel = Kernel.get_or_create("python3", token)
    out["same"] = Kernel.get_or_create("python3", token).kernel_id == kernel.kernel_id
    out["query"] = kernel.execute("a = 20\\nprint(a + 22)")
    out["input"] = kernel.execute("name = input('who? ')\\nprint('hi', name)")
    if out["input"]["status"] == "waiting-input":
        out["input_answer"] = kernel.execute("sorna")
    out["info"] = kernel.get_info()
    kernel.restart()
    out["after_restart"] = kernel.execute("print('a' in dir())")
    resp = kernel.upload(["main.py"])
    out["upload_status"] = resp.status
    out["batch"] = kernel.execute("", mode="batch", opts={"build": "*", "exec": "*"})
    kernel.destroy()
    try:
        kernel.get_info()
        out["after_destroy"] = "still there"
    except BaseException as exc:
        out["after_destroy"] = repr(exc)
    print(json.dumps(out))
""")


def test_standalone_from_an_empty_folder_with_sorna_client(serve):
    server, ports = serve("--standalone")
    endpoint = server.wait_ready()
    assert endpoint == f"http://127.0.0.1:{ports['port']}"
    banner = server.log()
    assert EXAMPLE_ACCESS in banner and EXAMPLE_SECRET in banner
    assert "python -m sorna.cli run python3 -c 'print(1)'" in banner
    assert (server.cwd / "sorna-data" / "sorna.db").is_file()

    # the client's `run` command (what `lcc run` executes)
    run = subprocess.run([sys.executable, "-m", "sorna.cli", "run", "python3", "-c", "print(1)"],
                         env=client_env(endpoint), capture_output=True, text=True, timeout=60,
                         cwd=server.cwd)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["1"], (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr

    # its console script `lpython` runs language "python" (`lcc`: see the next test)
    scripts = Path(sys.executable).parent
    lpython = subprocess.run([str(scripts / "lpython"), "-q", "-c", "print(6 * 7)"],
                             env=client_env(endpoint), capture_output=True, text=True,
                             timeout=60, cwd=server.cwd)
    assert lpython.stdout.splitlines() == ["42"], (lpython.stdout, lpython.stderr)

    # its Kernel class, unchanged
    (server.cwd / "main.py").write_text("print('batch', sum(range(5)))\n")
    script = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT], env=client_env(endpoint),
                            capture_output=True, text=True, timeout=90, cwd=server.cwd)
    assert script.returncode == 0, script.stderr
    out = json.loads(script.stdout)
    assert out["same"] is True
    assert stdout_of(out["query"]) == "42\n"
    assert out["input"]["status"] == "waiting-input"
    assert "hi sorna" in stdout_of(out["input_answer"])
    assert out["info"]["lang"] == "python3" and out["info"]["numQueriesExecuted"] >= 2
    assert stdout_of(out["after_restart"]) == "False\n"
    assert out["upload_status"] == 204
    assert "batch 10" in stdout_of(out["batch"])
    assert "404" in out["after_destroy"] and "kernel-not-found" in out["after_destroy"]

    # headers every response carries
    resp = requests.get(endpoint + "/v2", headers=VERSION_HEADERS, timeout=10)
    assert resp.headers["Server"].startswith("Sorna-API/")
    assert resp.headers["X-RateLimit-Limit"]

    assert server.stop() == 0
    log = server.log()
    assert re.search(r"POST /v2/kernel/create 201 [\d.]+ms " + EXAMPLE_ACCESS, log), log
    assert re.search(r"GET /v2 200 [\d.]+ms -", log)
    assert "gateway stopped" in log
    with pytest.raises(requests.ConnectionError):
        requests.get(endpoint + "/v2", headers=VERSION_HEADERS, timeout=2)


@pytest.mark.needs_gcc
def test_lcc_builds_and_runs_c_files(serve):
    """The client's `lcc` script uploads C files; the agent builds them with gcc."""
    server, _ = serve("--standalone", name="lcc")
    endpoint = server.wait_ready()
    (server.cwd / "hello.c").write_text(
        '#include <stdio.h>\nint main(void) { printf("hello %d\\n", 6 * 7); return 0; }\n')
    lcc = subprocess.run([str(Path(sys.executable).parent / "lcc"), "hello.c", "-q"],
                         env=client_env(endpoint), capture_output=True, text=True, timeout=90,
                         cwd=server.cwd)
    assert "hello 42" in lcc.stdout, (lcc.stdout, lcc.stderr)
    assert "Traceback" not in lcc.stdout + lcc.stderr
    assert server.stop() == 0


def test_workers_share_the_port_and_a_second_signal_forces_exit(serve):
    server, ports = serve("--standalone", "--workers", "2", "--legacy", name="workers")
    endpoint = server.wait_ready()
    for _ in range(30):  # fresh connections spread over both workers
        with requests.Session() as session:
            resp = session.get(endpoint + "/v2", headers=VERSION_HEADERS, timeout=10)
            assert resp.status_code == 200
    run = subprocess.run([sys.executable, "-m", "sorna.cli", "run", "python3", "-c",
                          "print(6*7)"], env=client_env(endpoint), capture_output=True,
                         text=True, timeout=60, cwd=server.cwd)
    assert run.stdout.splitlines() == ["42"], run.stderr
    log = server.log()
    assert "[w0]" in log and "[w1]" in log
    assert len(set(re.findall(r"\[(w\d)\] sorna\.access", log))) == 2, log
    assert log.count("legacy ZMQ interface listening") == 1  # only worker 0 binds ZMQ
    server.proc.send_signal(signal.SIGINT)
    server.wait_log("received SIGINT: shutting down")
    started = time.monotonic()
    code = server.stop(signal.SIGINT, timeout=20)
    assert code != 0
    assert time.monotonic() - started < 10
    assert "forced exit" in server.log()


def test_https_and_registry_cli_beside_a_standalone_server(serve, tmp_path):
    """TLS with --ssl-cert/--ssl-key, and `sorna registry` reaching the embedded
    Redis that the running standalone server holds (same data folder)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file = _write_pem(tmp_path / "cert.pem", cert.cert_chain_pems)
    key_file = _write_pem(tmp_path / "key.pem", [cert.private_key_pem])
    ca_file = _write_pem(tmp_path / "ca.pem", [ca.cert_pem])
    server, ports = serve("--standalone", "--ssl-cert", str(cert_file), "--ssl-key",
                          str(key_file), name="tls")
    endpoint = server.wait_ready()
    assert endpoint == f"https://127.0.0.1:{ports['port']}"
    resp = requests.get(endpoint + "/v2", headers=VERSION_HEADERS, timeout=10, verify=str(ca_file))
    assert resp.status_code == 200 and resp.json()["version"].startswith("v")
    with pytest.raises(requests.exceptions.SSLError):
        # not trusted without the CA
        requests.get(endpoint + "/v2", headers=VERSION_HEADERS, timeout=10)

    env = {**client_env(endpoint), "REQUESTS_CA_BUNDLE": str(ca_file)}
    run = subprocess.run([sys.executable, "-m", "sorna.cli", "run", "python3", "-c",
                          "print('over tls')"], env=env, capture_output=True, text=True,
                         timeout=60, cwd=server.cwd)
    assert run.stdout.splitlines() == ["over tls"], run.stderr

    listing = subprocess.run([sys.executable, "-m", "sorna_cli", "registry", "list", "--json"],
                             cwd=server.cwd, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    instances = json.loads(listing.stdout)
    assert len(instances) == 1
    assert instances[0]["status"] == "running" and "python3" in instances[0]["languages"]
    assert server.stop() == 0


def _write_pem(path: Path, blobs: list[Any]) -> Path:
    path.write_bytes(b"".join(blob.bytes() for blob in blobs))
    return path


def test_children_end_when_the_server_is_killed(serve):
    """SIGKILL gives no chance to clean up: the embedded Redis and the local agent
    (and so its kernels) still end, because they die with their parent."""
    psutil = pytest.importorskip("psutil")
    server, _ = serve("--standalone", name="killed")
    server.wait_ready()
    children = psutil.Process(server.proc.pid).children(recursive=True)

    def command(child: psutil.Process) -> str:
        try:
            return " ".join(child.cmdline())
        except (psutil.ZombieProcess, psutil.NoSuchProcess):  # a short-lived helper
            return ""
    names = " ".join(command(child) for child in children)
    assert "redis-server" in names and "agent" in names, names
    server.proc.kill()
    server.proc.wait(10)
    gone, alive = psutil.wait_procs(children, timeout=15)
    for proc in alive:  # leave nothing behind even when the test fails
        proc.kill()
    assert not alive, [proc.name() for proc in alive]
