"""A terminal opened before its access key was deactivated, against the real
gateway, database, Redis and agent: the gateway closes it within the keypair
cache TTL (plus a quarter of it between checks), and other keys' terminals
stay open."""
from __future__ import annotations

import asyncio
import base64
import json

import aiohttp

from sorna_server import keypairs as keypair_api
from sorna_server.gateway import keys
from tests.helpers import EXAMPLE_ACCESS, EXAMPLE_SECRET, OTHER_ACCESS, OTHER_SECRET

CACHE_TTL = 0.5


async def _echo(ws: aiohttp.ClientWebSocketResponse, word: str, timeout: float = 20) -> None:
    """Type `echo <word>` until its output shows up."""
    command = base64.b64encode(f"echo {word}-$((40+2))\n".encode()).decode()
    marker = f"{word}-42".encode()
    seen = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    await ws.send_str(json.dumps({"type": "stdin", "chars": command}))
    while marker not in seen:
        assert loop.time() < deadline, seen[-300:]
        try:
            msg = await ws.receive(timeout=0.7)
        except TimeoutError:
            await ws.send_str(json.dumps({"type": "stdin", "chars": command}))
            continue
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        if data["type"] == "out":
            seen += base64.b64decode(data["data"])


async def _open(gw, access: str, secret: str) -> tuple[str, aiohttp.ClientWebSocketResponse]:
    kernel_id = await gw.create_kernel("bash", access_key=access, secret=secret)
    path = f"/v2/stream/kernel/{kernel_id}/pty"
    ws = await gw.client.ws_connect(path, headers=gw.sign_headers(
        "GET", path, access_key=access, secret=secret))
    return path, ws


async def test_a_deactivated_keys_open_terminal_is_closed(gateway_factory):
    gw = await gateway_factory(agents=1, keypair_cache_ttl=CACHE_TTL)
    path, victim_ws = await _open(gw, OTHER_ACCESS, OTHER_SECRET)
    _, bystander_ws = await _open(gw, EXAMPLE_ACCESS, EXAMPLE_SECRET)
    try:
        await _echo(victim_ws, "before")
        await _echo(bystander_ws, "bystander")

        await keypair_api.deactivate_keypair(gw.app[keys.DB], OTHER_ACCESS)
        loop = asyncio.get_running_loop()
        deactivated = loop.time()
        msg = await victim_ws.receive(timeout=10)
        while msg.type == aiohttp.WSMsgType.TEXT:  # output still on its way
            msg = await victim_ws.receive(timeout=10)
        elapsed = loop.time() - deactivated
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
        assert victim_ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
        assert elapsed < CACHE_TTL * 1.25 + 1.0, elapsed  # + scheduling on a busy machine

        # the key cannot open a new one, and another key's terminal still works
        async with gw.client.get(path, headers=gw.sign_headers(
                "GET", path, access_key=OTHER_ACCESS, secret=OTHER_SECRET)) as resp:
            assert resp.status == 401
            assert "not active" in (await resp.json())["detail"]
        await _echo(bystander_ws, "still")
        assert not bystander_ws.closed
    finally:
        await victim_ws.close()
        await bystander_ws.close()
