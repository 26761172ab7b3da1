"""Kernel routes end to end: the real app, a real reference agent, Redis and the DB."""
from __future__ import annotations

import asyncio
import uuid

import sqlalchemy as sa

from sorna_server.db.models import kernels, usage
from sorna_server.gateway import keys
from tests.helpers import (
    EXAMPLE_ACCESS,
    OTHER_ACCESS,
    OTHER_SECRET,
    PROBLEM,
    stdout_of,
    wait_for,
)


async def test_kernel_lifecycle(gateway_factory):
    gw = await gateway_factory(agents=1)
    token = uuid.uuid4().hex
    kernel_id = await gw.create_kernel("python3", token)
    # get-or-create: the same token and language give the same kernel
    assert await gw.create_kernel("python3", token) == kernel_id
    # ... but another key with the same token gets its own kernel
    other_id = await gw.create_kernel("python3", token, access_key=OTHER_ACCESS,
                                      secret=OTHER_SECRET)
    assert other_id != kernel_id
    assert await gw.slots_used() == 1

    status, body = await gw.execute(kernel_id, "x = 6 * 7\nprint(x)")
    assert status == 200, body
    assert body["result"]["status"] == "finished"
    assert stdout_of(body["result"]) == "42\n"
    status, body = await gw.execute(kernel_id, "print(x + 1)")  # state persists
    assert stdout_of(body["result"]) == "43\n"
    status, body = await gw.execute(kernel_id, "impo", mode="complete",
                                    options={"line": "impo", "row": 0, "col": 4})
    assert status == 200 and body["result"]["status"] == "finished"

    status, _, info = await gw.request("GET", f"/v2/kernel/{kernel_id}")
    assert status == 200
    assert info["lang"] == "python3"
    assert info["numQueriesExecuted"] == 3
    # concurrent queries are counted in batches, none lost, all written before info answers
    results = await asyncio.gather(*(gw.execute(kernel_id, "1") for _ in range(12)))
    assert [status for status, _ in results] == [200] * 12
    status, _, info = await gw.request("GET", f"/v2/kernel/{kernel_id}")
    assert info["numQueriesExecuted"] == 15
    assert info["queryTimeout"] > 0 and info["idleTimeout"] > 0 and info["memoryLimit"] > 0
    assert set(info) >= {"age", "maxCpuCredit", "idle", "memoryUsed", "cpuCreditUsed"}

    # ownership: another key sees "not found" for every operation
    for method in ("GET", "PATCH", "DELETE"):
        status, _, body = await gw.request(method, f"/v2/kernel/{kernel_id}",
                                           access_key=OTHER_ACCESS, secret=OTHER_SECRET)
        assert status == 404 and body["type"] == PROBLEM + "kernel-not-found", method
    status, _, body = await gw.request("POST", f"/v2/kernel/{kernel_id}",
                                       {"mode": "query", "code": "print(1)"},
                                       access_key=OTHER_ACCESS, secret=OTHER_SECRET)
    assert status == 404

    status, headers, _ = await gw.request("PATCH", f"/v2/kernel/{kernel_id}")
    assert status == 204 and headers["Content-Length"] == "0"
    status, body = await gw.execute(kernel_id, "print('x' in dir())")
    assert stdout_of(body["result"]) == "False\n"  # a fresh process

    status, _, _ = await gw.request("DELETE", f"/v2/kernel/{kernel_id}")
    assert status == 204
    status, _, body = await gw.request("GET", f"/v2/kernel/{kernel_id}")
    assert status == 404 and body["type"] == PROBLEM + "kernel-not-found"
    assert await gw.slots_used() == 0
    row_status = await gw.scalar(sa.select(kernels.c.status).where(kernels.c.id == kernel_id))
    assert row_status == "TERMINATED"
    assert await gw.scalar(sa.select(sa.func.count()).select_from(usage)
                           .where(usage.c.kernel_id == kernel_id)) == 1
    # the token is free again: a new kernel
    assert await gw.create_kernel("python3", token) != kernel_id
    status, _, body = await gw.request("DELETE", "/v2/kernel/0123456789abcdef")
    assert status == 404


async def test_quota_412_and_release_after_destroy(gateway_factory):
    gw = await gateway_factory(agents=1)
    creds = {"access_key": OTHER_ACCESS, "secret": OTHER_SECRET}  # concurrency limit 2
    first = await gw.create_kernel("python3", **creds)
    await gw.create_kernel("bash", **creds)
    status, headers, body = await gw.request("POST", "/v2/kernel/create", {
        "lang": "python3", "clientSessionToken": uuid.uuid4().hex}, **creds)
    assert status == 412 and body["type"] == PROBLEM + "quota-exceeded"
    assert "X-RateLimit-Remaining" in headers
    assert await gw.slots_used(OTHER_ACCESS) == 2
    status, _, _ = await gw.request("DELETE", f"/v2/kernel/{first}", **creds)
    assert status == 204
    assert await gw.slots_used(OTHER_ACCESS) == 1
    await gw.create_kernel("python3", **creds)
    # unknown language: the slot taken for it is given back
    status, _, body = await gw.request("POST", "/v2/kernel/create", {
        "lang": "cobol", "clientSessionToken": uuid.uuid4().hex})
    assert status == 503 and body["type"] == PROBLEM + "instance-not-available"
    assert body["reason"] == "language-not-offered"
    assert await gw.slots_used(EXAMPLE_ACCESS) == 0


async def test_concurrent_creates_with_one_token_share_a_kernel(gateway_factory):
    gw = await gateway_factory(agents=1)
    token = uuid.uuid4().hex
    results = await asyncio.gather(*(gw.request("POST", "/v2/kernel/create", {
        "lang": "python3", "clientSessionToken": token}) for _ in range(5)))
    ids = {body["kernelId"] for status, _, body in results if status == 201}
    assert [status for status, _, _ in results] == [201] * 5, results
    assert len(ids) == 1
    assert await gw.slots_used() == 1


async def test_batch_upload_and_path_traversal(gateway_factory):
    gw = await gateway_factory(agents=1)
    kernel_id = await gw.create_kernel("python3")
    path = f"/v2/kernel/{kernel_id}/upload"

    async def upload(files: list[tuple[str, bytes]]) -> tuple[int, object]:
        # encoded like `requests` does for sorna-client: file names verbatim
        boundary = uuid.uuid4().hex
        body = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="src"; '
            f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + data + b"\r\n" for name, data in files) + f"--{boundary}--\r\n".encode()
        headers = gw.sign_headers("POST", path, content_type="multipart/form-data")
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        async with gw.client.post(path, data=body, headers=headers) as resp:
            text = await resp.text()
            return resp.status, (await resp.json() if text else None)

    status, _ = await upload([("main.py", b"import helper\nprint(helper.VALUE)\n"),
                              ("helper.py", b"VALUE = 'from-upload'\n")])
    assert status == 204
    status, body = await gw.execute(kernel_id, "", mode="batch",
                                    options={"build": "*", "exec": "*"})
    assert status == 200, body
    assert "from-upload" in stdout_of(body["result"])

    for bad in ("../escape.py", "a/../../b.py", "..", "C:\\x.py", "..%2Fescape.py",
                "%2E%2E/x.py"):
        status, body = await upload([(bad, b"x")])
        assert status == 400, bad
        assert body["type"] == PROBLEM + "invalid-api-params"
    # aiohttp's multipart parser already drops the leading "/" of absolute names
    status, body = await upload([("/tmp/abs-upload.txt", b"abs")])
    assert status == 204
    status, body = await gw.execute(
        kernel_id, "import os\nprint(os.path.exists('tmp/abs-upload.txt'), "
                   "os.path.exists('/tmp/abs-upload.txt'))")
    assert stdout_of(body["result"]) == "True False\n"
    status, body = await upload([("sub/dir/big.bin", b"x" * 2048)])
    assert status == 204
    status, body = await gw.execute(kernel_id, "print(len(open('sub/dir/big.bin').read()))")
    assert stdout_of(body["result"]) == "2048\n"
    gw.config.__dict__["max_upload_size"] = 1024  # lower the limit for this app
    status, body = await upload([("big.bin", b"x" * 2048)])
    assert status == 413 and body["type"].startswith(PROBLEM)


async def test_execution_timeout_is_a_problem_not_a_hang(gateway_factory):
    gw = await gateway_factory(agents=1, agent_flags={"exec_timeout": 1.5})
    kernel_id = await gw.create_kernel("python3")
    status, body = await gw.execute(kernel_id, "import time\nprint('before')\ntime.sleep(30)")
    assert status == 500, body
    assert body["type"] == PROBLEM + "kernel-execution-failed"
    assert body["agentError"]["type"] == "execution-timeout"
    # the kernel stays usable
    status, body = await gw.execute(kernel_id, "print('after')")
    assert status == 200 and stdout_of(body["result"]) == "after\n"


async def test_agent_killed_mid_execute_gives_a_problem_quickly(gateway_factory):
    gw = await gateway_factory(agents=1)
    kernel_id = await gw.create_kernel("python3")
    task = asyncio.create_task(gw.execute(kernel_id, "import time\ntime.sleep(20)"))
    await asyncio.sleep(0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    gw.agents[0].proc.kill()
    status, body = await asyncio.wait_for(task, 10)
    assert loop.time() - started < 8
    # the client is told to retry (issue 10: never 500 for an agent that went away)
    assert status == 503 and body["type"] == PROBLEM + "instance-not-available"
    assert body["agentError"]["type"] in ("agent-unreachable", "rpc-timeout")
    # and while it is gone, new requests fail fast with a problem body too
    started = loop.time()
    status, body = await gw.execute(kernel_id, "print(1)")
    assert status in (404, 503) and body["type"].startswith(PROBLEM)
    assert loop.time() - started < 5
    # the sweeper settles its kernels LOST and gives the quota back
    async def settled() -> bool:
        return await gw.slots_used() == 0
    await wait_for(settled, timeout=20)
    assert await gw.scalar(sa.select(kernels.c.status).where(kernels.c.id == kernel_id)) == "LOST"


async def test_no_agent_gives_instance_not_available(gateway_factory):
    gw = await gateway_factory()
    status, _, body = await gw.request("POST", "/v2/kernel/create", {
        "lang": "python3", "clientSessionToken": uuid.uuid4().hex})
    assert status == 503 and body["type"] == PROBLEM + "instance-not-available"
    assert await gw.slots_used() == 0
    registry = gw.app[keys.REGISTRY]
    assert await registry.list_instances() == []
