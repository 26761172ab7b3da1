"""The PTY WebSocket bridge and the legacy ZMQ interface, with a real agent."""
from __future__ import annotations

import asyncio
import base64
import json
import uuid

import aiohttp
import zmq
import zmq.asyncio

from tests.helpers import EXAMPLE_ACCESS, OTHER_ACCESS, PROBLEM, VERSION_HEADERS


async def _read_until(ws: aiohttp.ClientWebSocketResponse, marker: bytes, timeout: float,
                      poke: object = None) -> bytes:
    """Collect `out` data until `marker` shows up; call `poke()` while nothing comes."""
    seen = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while marker not in seen:
        remaining = deadline - loop.time()
        assert remaining > 0, f"no {marker!r} in {seen[-500:]!r}"
        try:
            msg = await ws.receive(timeout=min(0.7, remaining))
        except TimeoutError:
            if poke is not None:
                await poke()
            continue
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        if data["type"] == "out":
            seen += base64.b64decode(data["data"])
    return seen


async def test_pty_echo_restart_and_end(gateway_factory):
    gw = await gateway_factory(agents=1)
    kernel_id = await gw.create_kernel("bash")
    path = f"/v2/stream/kernel/{kernel_id}/pty"

    # unsigned and foreign requests are refused before the upgrade
    resp = await gw.client.get(path, headers=VERSION_HEADERS)
    assert resp.status == 401
    async with gw.client.ws_connect(path, headers=gw.sign_headers("GET", path)) as ws:
        async def type_command() -> None:
            chars = base64.b64encode(b"echo pty-$((40+2))\n").decode()
            await ws.send_str(json.dumps({"type": "stdin", "chars": chars}))

        await type_command()
        assert b"pty-42" in await _read_until(ws, b"pty-42", 20, type_command)
        await ws.send_str(json.dumps({"type": "ping"}))
        await ws.send_str(json.dumps({"type": "resize", "rows": 30, "cols": 100}))
        await ws.send_str("not json")
        kinds = set()
        while not {"pong", "error"} <= kinds:
            msg = json.loads((await ws.receive(timeout=10)).data)
            kinds.add(msg["type"])

        # restart through the socket: the bridge reconnects to the new ports
        await ws.send_str(json.dumps({"type": "restart"}))

        async def type_again() -> None:
            chars = base64.b64encode(b"echo again-$((1+1))\n").decode()
            await ws.send_str(json.dumps({"type": "stdin", "chars": chars}))
        assert b"again-2" in await _read_until(ws, b"again-2", 30, type_again)

        # destroying the kernel closes the WebSocket cleanly
        status, _, _ = await gw.request("DELETE", f"/v2/kernel/{kernel_id}")
        assert status == 204
        msg = await ws.receive(timeout=10)
        while msg.type == aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=10)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    # a plain GET without the upgrade is a problem body, not a crash
    status, _, body = await gw.request("GET", path)
    assert status in (400, 404) and body["type"].startswith(PROBLEM)


async def _legacy_call(addr: str, payload: bytes, timeout: float = 20) -> dict:
    sock = zmq.asyncio.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    try:
        await sock.send(payload)
        assert await sock.poll(timeout * 1000), "no legacy reply"
        return json.loads(await sock.recv())
    finally:
        sock.close(0)


async def test_legacy_zmq_interface(gateway_factory):
    gw = await gateway_factory(agents=1, legacy_access_key=EXAMPLE_ACCESS, legacy_enabled=True)
    addr = f"tcp://127.0.0.1:{gw.config.manager_port}"
    assert await _legacy_call(addr, b'{"action": 0, "body": "hi"}') == {"reply": 0, "body": "hi"}

    request = {"action": 2, "user_id": 7, "entry_id": "entry-1", "lang": "python3"}
    reply = await _legacy_call(addr, json.dumps(request).encode())
    assert reply["reply"] == 200, reply
    kernel_id = reply["kernel_id"]
    assert reply["kernel_addr"] == gw.agents[0].addr
    assert reply["stdin_addr"].startswith("tcp://127.0.0.1:")
    assert reply["stdout_addr"].startswith("tcp://127.0.0.1:")
    again = await _legacy_call(addr, json.dumps(request).encode())
    assert again["kernel_id"] == kernel_id  # get-or-create
    assert await gw.slots_used(EXAMPLE_ACCESS) == 1
    # the kernel is billed to the legacy keypair: visible through the API with that key
    status, _, info = await gw.request("GET", f"/v2/kernel/{kernel_id}")
    assert status == 200 and info["lang"] == "python3"

    # malformed frames and bad input get 400 and never stop the listener
    for bad in (b"\xff\x00garbage", b"[1, 2]", b'{"action": 99}',
                b'{"action": 2, "user_id": 7, "entry_id": "e"}',
                b'{"action": 2, "user_id": [], "entry_id": "e", "lang": "python3"}',
                b'{"action": 3}', b'{"action": 3, "kernel_id": "nope"}'):
        reply = await _legacy_call(addr, bad)
        assert reply["reply"] == 400, (bad, reply)
        assert reply["cause"]
    # a raw frame without the REQ envelope is dropped; the next request still works
    dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(addr)
    await dealer.send(b"no envelope")
    dealer.close(0)

    assert await _legacy_call(addr, json.dumps({"action": 3, "kernel_id": kernel_id}).encode()) \
        == {"reply": 200}
    assert await gw.slots_used(EXAMPLE_ACCESS) == 0
    assert (await _legacy_call(addr, b'{"action": 0, "body": 1}'))["reply"] == 0


async def test_legacy_without_a_billing_key(gateway_factory):
    gw = await gateway_factory(legacy_enabled=True)
    addr = f"tcp://127.0.0.1:{gw.config.manager_port}"
    reply = await _legacy_call(addr, json.dumps(
        {"action": 2, "user_id": 1, "entry_id": uuid.uuid4().hex, "lang": "python3"}).encode())
    assert reply["reply"] == 500 and "legacy_access_key" in reply["cause"]
    assert await gw.slots_used(OTHER_ACCESS) == 0


async def test_websocket_closes_on_shutdown(gateway_factory):
    gw = await gateway_factory(agents=1)
    kernel_id = await gw.create_kernel("bash")
    path = f"/v2/stream/kernel/{kernel_id}/pty"
    ws = await gw.client.ws_connect(path, headers=gw.sign_headers("GET", path))
    await gw.client.server.app.shutdown()
    msg = await ws.receive(timeout=10)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY
    await ws.close()
