"""Kernel routes: create, info, restart, destroy, execute, upload.

A keypair only ever sees its own kernels: another key's kernel id is
`kernel-not-found`, exactly like an id that never existed.
"""
from __future__ import annotations

import hmac
import time
from urllib.parse import unquote

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from .. import agent_protocol as proto
from .. import metrics
from . import errors, keys
from .auth import UPLOAD_DIGEST_HEADER, upload_digest
from .errors import AuthorizationFailed, InvalidAPIParameters, RequestTooLarge
from .keys import ACCESS_KEY, UPLOAD_DIGEST
from .validation import CreateKernel, Execute, json_body, parse, sanitize_filename

MAX_UPLOAD_FILES = 32
UPLOAD_CHUNK = 64 << 10
MULTIPART_OVERHEAD = 64 << 10
"""Bytes of part headers and boundaries allowed beyond `max_upload_total` in a
declared Content-Length."""


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
        metrics.child(metrics.CREATES_REFUSED, "quota").inc()
        raise
    except errors.InstanceNotAvailable as exc:
        reason = REFUSAL_REASONS.get(str(exc.fields.get("reason")), "no-agent")
        metrics.child(metrics.CREATES_REFUSED, reason).inc()
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
        metrics.child(metrics.EXECUTIONS, record.lang, body.mode, outcome).inc()
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
    """Multipart files into the kernel's folder.  The historic client's signature
    does not cover the body; a signed `X-Sorna-Upload-SHA256` (see
    `auth.upload_digest`) does, and then files that do not match it are refused
    before any of them reaches the kernel."""
    service = request.app[keys.KERNELS]
    record = await service.get_owned(request[ACCESS_KEY], request.match_info["kernel_id"])
    if not request.content_type.startswith("multipart/"):
        raise InvalidAPIParameters("Upload files as a multipart body.")
    config = request.app[keys.CONFIG]
    total_limit = config.max_upload_total
    if (request.content_length or 0) > total_limit + MULTIPART_OVERHEAD:
        raise RequestTooLarge(f"An upload may carry at most {total_limit} bytes of files.")
    try:
        files = await _read_files(await request.multipart(), config.max_upload_size,
                                  total_limit)
    except (ValueError, AssertionError, HttpProcessingError) as exc:  # malformed framing
        # (HttpProcessingError: a part's headers that are not valid HTTP headers)
        raise InvalidAPIParameters(f"Malformed multipart body: {exc}") from None
    if not files:
        raise InvalidAPIParameters("The upload has no files.")
    signed = request.get(UPLOAD_DIGEST)
    if signed is not None and not hmac.compare_digest(upload_digest(files), signed):
        raise AuthorizationFailed(f"The files do not match the signed {UPLOAD_DIGEST_HEADER}.")
    for name, data in [(sanitize_filename(name), data) for name, data in files]:
        await service.upload(record, name, data)
    return _no_content()


async def _read_files(reader: MultipartReader, file_limit: int,
                      total_limit: int) -> list[tuple[str, bytes]]:
    """(name as sent, after percent-decoding; content) of every file part, in order."""
    files: list[tuple[str, bytes]] = []
    total = 0
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise InvalidAPIParameters("Nested multipart bodies are not supported.")
        if part.filename and len(files) >= MAX_UPLOAD_FILES:
            raise InvalidAPIParameters(f"At most {MAX_UPLOAD_FILES} files per upload.")
        # aiohttp clients percent-encode file names, requests sends them raw
        name = unquote(part.filename) if part.filename else ""
        data = await _read_limited(part, name, min(file_limit, total_limit - total),
                                   file_limit)
        total += len(data)
        if part.filename:  # a plain form field is read (and counted) but ignored
            files.append((name, data))
    return files


async def _read_limited(part: BodyPartReader, name: str, limit: int, file_limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(UPLOAD_CHUNK):
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"File {name!r} is larger than {file_limit} bytes."
                                  if limit == file_limit else
                                  "The files of this upload exceed the total allowed.")
        chunks.append(chunk)
    return b"".join(chunks)
