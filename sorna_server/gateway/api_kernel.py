"""Kernel routes: create, info, restart, destroy, execute, upload.

A keypair only ever sees its own kernels: another key's kernel id is
`kernel-not-found`, exactly like an id that never existed.
"""
from __future__ import annotations

import time
from urllib.parse import unquote

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from .. import agent_protocol as proto
from .. import metrics
from . import errors, keys
from .errors import InvalidAPIParameters, RequestTooLarge
from .keys import ACCESS_KEY
from .validation import CreateKernel, Execute, json_body, parse, sanitize_filename

MAX_UPLOAD_FILES = 32
UPLOAD_CHUNK = 64 << 10


def _no_content() -> web.Response:
    return web.Response(status=204)


# instance-not-available reasons (registry) -> sorna_kernel_creates_refused_total reasons
REFUSAL_REASONS = {"no-agents": "no-agent", "language-not-offered": "language",
                   "all-full": "full", "all-draining": "draining"}
# agent error types of a failed execute -> sorna_executions_total outcomes
EXECUTE_FAILURES = {proto.ERR_EXECUTION_TIMEOUT: "timeout", proto.ERR_RPC_TIMEOUT: "timeout",
                    proto.REASON_OOM: "oom"}


async def create(request: web.Request) -> web.Response:
    body = parse(CreateKernel, await json_body(request))
    service = request.app[keys.KERNELS]
    try:
        record, _created = await service.get_or_create(
            request[ACCESS_KEY], body.lang, body.clientSessionToken,
            body.agent_limits(), body.mounts)
    except errors.QuotaExceeded:
        metrics.CREATES_REFUSED.labels("quota").inc()
        raise
    except errors.InstanceNotAvailable as exc:
        reason = REFUSAL_REASONS.get(str(exc.fields.get("reason")), "no-agent")
        metrics.CREATES_REFUSED.labels(reason).inc()
        raise
    return web.json_response({"kernelId": record.id}, status=201)


async def info(request: web.Request) -> web.Response:
    service = request.app[keys.KERNELS]
    record = await service.get_owned(request[ACCESS_KEY], request.match_info["kernel_id"])
    config = request.app[keys.CONFIG]
    limits = record.limits or {}
    stats = record.last_stats or {}
    exec_timeout = float(limits.get("exec_timeout") or config.agent_exec_timeout)
    idle_timeout = float(limits.get("idle_timeout") or config.agent_idle_timeout)
    max_mem = int(limits.get("max_mem") or config.agent_max_mem)
    now = time.time()
    return web.json_response({
        "lang": record.lang,
        "age": int((now - record.created_at) * 1000),              # ms
        "queryTimeout": int(exec_timeout * 1000),                  # ms
        "idleTimeout": int(idle_timeout * 1000),                   # ms
        "memoryLimit": max_mem // 1024,                            # KiB
        "maxCpuCredit": int(exec_timeout * 1000),                  # ms
        "numQueriesExecuted": int(record.num_queries),
        "idle": max(int((now - record.last_used) * 1000), 0),      # ms
        "memoryUsed": int(stats.get("mem_max_bytes") or 0) // 1024,  # KiB
        "cpuCreditUsed": int(stats.get("cpu_used") or 0),          # ms
    })


async def restart(request: web.Request) -> web.Response:
    service = request.app[keys.KERNELS]
    record = await service.get_owned(request[ACCESS_KEY], request.match_info["kernel_id"])
    await service.restart(record)
    return _no_content()


async def destroy(request: web.Request) -> web.Response:
    service = request.app[keys.KERNELS]
    record = await service.get_owned(request[ACCESS_KEY], request.match_info["kernel_id"])
    await service.destroy(record)
    return _no_content()


async def execute(request: web.Request) -> web.Response:
    body = parse(Execute, await json_body(request))
    service = request.app[keys.KERNELS]
    record = await service.get_owned(request[ACCESS_KEY], request.match_info["kernel_id"],
                                     fresh=False)
    outcome = "failed"
    try:
        result = await service.execute(record, body.mode, body.code or "", body.agent_options())
        outcome = str(result.get("status")) if isinstance(result, dict) else "failed"
    except errors.Problem as exc:
        outcome = execute_outcome(exc)
        raise
    finally:
        if outcome not in metrics.EXECUTE_OUTCOMES:
            outcome = "failed"  # a status no client knows: bounded label values
        metrics.EXECUTIONS.labels(record.lang, body.mode, outcome).inc()
    return web.json_response({"result": result})


def execute_outcome(exc: errors.Problem) -> str:
    """The outcome label of a failed execute."""
    if isinstance(exc, errors.KernelNotFound):
        return "not-found"
    if isinstance(exc, errors.InvalidAPIParameters):
        return "invalid"
    agent_error = exc.fields.get("agentError") or {}
    for marker in (agent_error.get("type"), agent_error.get("reason")):
        if marker in EXECUTE_FAILURES:
            return EXECUTE_FAILURES[marker]
    return "failed"


async def upload(request: web.Request) -> web.Response:
    service = request.app[keys.KERNELS]
    record = await service.get_owned(request[ACCESS_KEY], request.match_info["kernel_id"])
    if not request.content_type.startswith("multipart/"):
        raise InvalidAPIParameters("Upload files as a multipart body.")
    limit = request.app[keys.CONFIG].max_upload_size
    try:
        reader = await request.multipart()
        files: list[tuple[str, bytes]] = []
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidAPIParameters("Nested multipart bodies are not supported.")
            if not part.filename:
                await part.release()  # a plain form field: ignore it
                continue
            if len(files) >= MAX_UPLOAD_FILES:
                raise InvalidAPIParameters(f"At most {MAX_UPLOAD_FILES} files per upload.")
            # aiohttp clients percent-encode file names, requests sends them raw
            name = sanitize_filename(unquote(part.filename))
            files.append((name, await _read_limited(part, name, limit)))
    except (ValueError, AssertionError, HttpProcessingError) as exc:  # malformed framing
        # (HttpProcessingError: a part's headers that are not valid HTTP headers)
        raise InvalidAPIParameters(f"Malformed multipart body: {exc}") from None
    if not files:
        raise InvalidAPIParameters("The upload has no files.")
    for name, data in files:
        await service.upload(record, name, data)
    return _no_content()


async def _read_limited(part: BodyPartReader, name: str, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(UPLOAD_CHUNK):
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"File {name!r} is larger than {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)
