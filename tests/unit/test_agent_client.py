"""The manager-side RPC client against a real ZeroMQ ROUTER peer."""
from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from sorna_server import agent_protocol as proto
from sorna_server.agent_client import AgentError, AgentRPCClient, AgentTimeout, AgentUnreachable


async def _serve(sock: zmq.asyncio.Socket, delays: dict[str, float]) -> None:
    while True:
        ident, frame = await sock.recv_multipart()
        req = proto.decode_request(frame)

        async def answer(ident=ident, req=req) -> None:
            await asyncio.sleep(delays.get(req.method, 0))
            if req.method == "ping":
                reply = proto.encode_result(req.id, {"pong": req.args.get("n")})
            else:
                reply = proto.encode_error(req.id, proto.ERR_UNKNOWN_METHOD, req.method)
            await sock.send_multipart([ident, reply])
        asyncio.create_task(answer())


@pytest.fixture
async def router(free_port):
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = free_port()
    sock.bind(f"tcp://127.0.0.1:{port}")
    delays: dict[str, float] = {}
    task = asyncio.create_task(_serve(sock, delays))
    yield f"tcp://127.0.0.1:{port}", delays, sock
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    sock.close(0)
    ctx.term()


async def test_concurrent_calls_are_multiplexed(router):
    addr, delays, _ = router
    client = AgentRPCClient()
    try:
        results = await asyncio.gather(*(client.call(addr, "ping", {"n": i}) for i in range(50)))
        assert [r["pong"] for r in results] == list(range(50))
        with pytest.raises(AgentError) as info:
            await client.call(addr, "nope")
        assert info.value.type == proto.ERR_UNKNOWN_METHOD
    finally:
        await client.close()


async def test_deadline_and_unreachable(router, free_port):
    addr, delays, _ = router
    client = AgentRPCClient(connect_grace=0.3)
    try:
        delays["ping"] = 2.0
        with pytest.raises(AgentTimeout):
            await client.call(addr, "ping", timeout=0.2)
        dead = f"tcp://127.0.0.1:{free_port()}"
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(AgentUnreachable):
            await client.call(dead, "ping", timeout=5)
        assert loop.time() - started < 1.0
    finally:
        await client.close()


async def test_inflight_call_fails_when_peer_disappears(router):
    addr, delays, sock = router
    client = AgentRPCClient()
    try:
        await client.call(addr, "ping")
        delays["ping"] = 30
        call = asyncio.create_task(client.call(addr, "ping", timeout=20))
        await asyncio.sleep(0.2)
        sock.close(0)
        with pytest.raises(AgentUnreachable):
            await asyncio.wait_for(call, 5)
    finally:
        await client.close()


async def test_many_agents_do_not_exhaust_the_socket_table(free_port):
    """Three ZeroMQ sockets per agent connection: 600 agents pass libzmq's default
    limit of 1,023 sockets per context, which the client raises."""
    ctx = zmq.Context()
    client = AgentRPCClient(connect_grace=0.05, ctx=ctx)
    try:
        addrs = [f"tcp://127.0.0.1:{free_port()}" for _ in range(600)]
        results = await asyncio.gather(*(client.call(addr, "ping", timeout=1) for addr in addrs),
                                       return_exceptions=True)
        assert all(isinstance(r, AgentUnreachable) for r in results), \
            {type(r).__name__ for r in results}
    finally:
        await client.close()
        ctx.term()
