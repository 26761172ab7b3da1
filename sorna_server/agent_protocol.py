"""The agent protocol: framing, encoding and validation shared by manager and agent.

Every message is one ZeroMQ frame holding a msgpack map with a protocol version
`v`.  RPC (manager DEALER -> agent ROUTER):

    request  {v, id, method, args, request_id?}
    reply    {v, id, ok: true, result}  |  {v, id, ok: false, error: {type, message, ...}}

Events (agent PUSH -> manager PULL): {v, type, instance_id, ts, ...fields}.

`docs/agent-protocol.md` is the prose version of this module; keep them in step.
This module has no I/O and imports nothing from the rest of `sorna_server`, so
the agent can use it without database or Redis code.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
# Frames larger than these make libzmq drop the connection (ZMQ_MAXMSGSIZE), so
# they are never buffered whole.  A heartbeat is a few KB; RPC frames carry
# uploaded files (one per call) and execute results (capped by the agent).
MAX_EVENT_BYTES = 1 << 20
MAX_RPC_BYTES = 64 << 20
MAX_FRAME_BYTES = MAX_RPC_BYTES
# What an agent may claim in its info and heartbeats.
MAX_CLAIMED_KERNELS = 4096
MAX_LANGUAGES = 64
MAX_NAME_LENGTH = 64
HEARTBEAT_INTERVAL_RANGE = (0.05, 60.0)
MAX_REQUEST_ID = 128  # characters of the optional `request_id` of an RPC request

# --- error types an agent may put in error replies -------------------------
ERR_UNKNOWN_METHOD = "unknown-method"
ERR_INVALID_ARGS = "invalid-args"
ERR_KERNEL_NOT_FOUND = "kernel-not-found"
ERR_UNSUPPORTED_LANG = "unsupported-language"
ERR_NO_CAPACITY = "no-capacity"
ERR_CREATION_FAILED = "kernel-creation-failed"
ERR_EXECUTION_TIMEOUT = "execution-timeout"
ERR_EXECUTION_FAILED = "execution-failed"
ERR_UPLOAD_FAILED = "upload-failed"
ERR_INTERNAL = "internal-error"
ERR_VERSION = "unsupported-version"

# --- error types the manager-side client raises itself ---------------------
ERR_RPC_TIMEOUT = "rpc-timeout"
ERR_AGENT_UNREACHABLE = "agent-unreachable"

# --- termination reasons in kernel_terminated ------------------------------
REASON_DESTROYED = "user-requested"
REASON_IDLE = "idle-timeout"
REASON_EXITED = "self-terminated"
REASON_OOM = "out-of-memory"
REASON_AGENT_SHUTDOWN = "agent-shutdown"
REASON_RESET = "agent-reset"
REASON_LOST = "agent-lost"

# Field specs: name -> (accepted types, required).  `None` in the types tuple
# means the value may be nil.
_ANY = (object,)
_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_MAP = (dict,)
_LIST = (list, tuple)

METHOD_ARGS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "ping": {},
    "create_kernel": {
        "lang": (_STR, True),
        "limits": (_MAP + (type(None),), False),
        "mounts": (_LIST + (type(None),), False),
        "kernel_id": (_STR + (type(None),), False),
    },
    "destroy_kernel": {"kernel_id": (_STR, True), "reason": (_STR, False)},
    "restart_kernel": {"kernel_id": (_STR, True)},
    "execute": {
        "kernel_id": (_STR, True),
        "mode": (_STR, True),
        "code": (_STR, True),
        "opts": (_MAP + (type(None),), False),
    },
    "upload_file": {
        "kernel_id": (_STR, True),
        "name": (_STR, True),
        "data": ((bytes,), True),
    },
    "resize_pty": {
        "kernel_id": (_STR, True),
        "rows": (_INT, True),
        "cols": (_INT, True),
    },
    "list_kernels": {},
    "reset": {},
}

EXECUTE_MODES = frozenset({"query", "batch", "complete"})

EVENT_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "instance_started": {"info": (_MAP, True)},
    "instance_heartbeat": {
        "info": (_MAP, True),
        "running_kernels": (_LIST, True),
        "interval": (_NUM, True),
    },
    "instance_stats": {"stats": (_MAP, True)},
    "kernel_terminated": {
        "kernel_id": (_STR, True),
        "reason": (_STR, True),
        "stats": (_MAP + (type(None),), False),
    },
    "instance_terminated": {"reason": (_STR, True)},
}

# Fields of `info` in instance_started / instance_heartbeat.
INFO_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "addr": (_STR, True),
    "max_kernels": (_INT, True),
    "num_kernels": (_INT, False),
    "languages": (_LIST, True),
    "version": (_STR, False),
    "cpu_count": (_INT, False),
    "mem_bytes": (_INT, False),
    "isolation": (_MAP, False),
    # {name: {alias_of?, version?, limits?}}: what GET /v2/languages shows clients
    "language_info": (_MAP, False),
}

# Per-kernel stats, in kernel_terminated.stats, destroy_kernel's result and
# each value of instance_stats.stats.
STATS_FIELDS = ("cpu_used", "mem_max_bytes", "io_read_bytes", "io_write_bytes",
                "net_rx_bytes", "net_tx_bytes")


class ProtocolError(ValueError):
    """A frame that is not a valid protocol message (log it and drop it)."""


@dataclass(slots=True)
class Request:
    id: int | str
    method: str
    args: dict[str, Any]
    request_id: str | None = None
    """The id of the API request this call serves (optional; agents log it)."""


@dataclass(slots=True)
class Reply:
    id: int | str
    ok: bool
    result: Any = None
    error: dict[str, Any] = field(default_factory=dict)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(frame: bytes) -> dict[str, Any]:
    """Decode one frame into a map and check its version; raise ProtocolError."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"undecodable frame: {exc.__class__.__name__}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("frame is not a map")
    version = msg.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError("missing protocol version 'v'")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    return msg


def check_fields(values: Any, spec: dict[str, tuple[tuple[type, ...], bool]], what: str) -> None:
    """Raise ProtocolError unless `values` is a map matching `spec`."""
    if not isinstance(values, dict):
        raise ProtocolError(f"{what} must be a map")
    for name, (types, required) in spec.items():
        if name not in values:
            if required:
                raise ProtocolError(f"{what}: missing field {name!r}")
            continue
        value = values[name]
        if isinstance(value, bool) and bool not in types and types is not _ANY:
            raise ProtocolError(f"{what}: field {name!r} has the wrong type")
        if not isinstance(value, types):
            raise ProtocolError(f"{what}: field {name!r} has the wrong type")


# --- RPC -------------------------------------------------------------------

def encode_request(req_id: int | str, method: str, args: dict[str, Any] | None = None,
                   request_id: str | None = None) -> bytes:
    msg = {"v": PROTOCOL_VERSION, "id": req_id, "method": method, "args": args or {}}
    if request_id:
        msg["request_id"] = request_id
    return pack(msg)


def decode_request(frame: bytes) -> Request:
    """Decode a request frame.  The method name is not checked against
    METHOD_ARGS here so the agent can answer unknown methods with an error."""
    msg = unpack(frame)
    req_id = msg.get("id")
    if not isinstance(req_id, (int, str)) or isinstance(req_id, bool):
        raise ProtocolError("request without a valid 'id'")
    method = msg.get("method")
    if not isinstance(method, str):
        raise ProtocolError("request without a 'method' string")
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError("'args' must be a map")
    request_id = msg.get("request_id")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID \
            or not request_id.isprintable():
        request_id = None  # optional: a bad one is ignored, never a reason to refuse
    return Request(req_id, method, args, request_id)


def validate_args(method: str, args: dict[str, Any]) -> None:
    """Raise ProtocolError if `args` do not fit `method` (unknown names are allowed)."""
    spec = METHOD_ARGS.get(method)
    if spec is None:
        raise ProtocolError(f"unknown method {method!r}")
    check_fields(args, spec, method)
    if method == "execute" and args["mode"] not in EXECUTE_MODES:
        raise ProtocolError(f"execute: unknown mode {args['mode']!r}")


def encode_result(req_id: int | str, result: Any) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "id": req_id, "ok": True, "result": result})


def encode_error(req_id: int | str | None, err_type: str, message: str, **details: Any) -> bytes:
    error = {"type": err_type, "message": message, **details}
    return pack({"v": PROTOCOL_VERSION, "id": req_id, "ok": False, "error": error})


def decode_reply(frame: bytes) -> Reply:
    msg = unpack(frame)
    req_id = msg.get("id")
    if not isinstance(req_id, (int, str)) or isinstance(req_id, bool):
        raise ProtocolError("reply without an integer or string 'id'")
    ok = msg.get("ok")
    if not isinstance(ok, bool):
        raise ProtocolError("reply without a boolean 'ok'")
    if ok:
        return Reply(req_id, True, msg.get("result"))
    error = msg.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("type"), str):
        raise ProtocolError("error reply without error.type")
    error.setdefault("message", "")
    return Reply(req_id, False, None, error)


# --- events ----------------------------------------------------------------

def encode_event(event_type: str, instance_id: str, **fields: Any) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "type": event_type, "instance_id": instance_id,
                 "ts": time.time(), **fields})


def decode_event(frame: bytes) -> dict[str, Any]:
    """Decode and validate an event; raise ProtocolError for anything malformed."""
    msg = unpack(frame)
    event_type = msg.get("type")
    spec = EVENT_FIELDS.get(event_type) if isinstance(event_type, str) else None
    if spec is None:
        raise ProtocolError(f"unknown event type {event_type!r}")
    instance_id = msg.get("instance_id")
    if not isinstance(instance_id, str) or not instance_id:
        raise ProtocolError("event without an instance_id")
    if not isinstance(msg.get("ts"), (int, float)) or isinstance(msg.get("ts"), bool):
        raise ProtocolError("event without a numeric ts")
    assert isinstance(event_type, str)  # spec is None otherwise
    check_fields(msg, spec, event_type)
    if "info" in spec:
        check_fields(msg["info"], INFO_FIELDS, f"{event_type}.info")
    if event_type == "instance_stats":
        for kernel_id, stats in msg["stats"].items():
            if not isinstance(kernel_id, str) or not isinstance(stats, dict):
                raise ProtocolError("instance_stats: stats must map kernel ids to maps")
    if event_type == "instance_heartbeat":
        check_heartbeat(msg)
    if "info" in spec:
        check_claims(msg["info"], event_type)
    if len(instance_id) > MAX_NAME_LENGTH * 2:
        raise ProtocolError("instance_id too long")
    return msg


def check_heartbeat(msg: dict[str, Any]) -> None:
    if not all(isinstance(k, str) for k in msg["running_kernels"]):
        raise ProtocolError("instance_heartbeat: running_kernels must be strings")
    low, high = HEARTBEAT_INTERVAL_RANGE
    if not low <= msg["interval"] <= high:
        raise ProtocolError(f"instance_heartbeat: interval outside {low:g}..{high:g} s")
    if len(msg["running_kernels"]) > MAX_CLAIMED_KERNELS:
        raise ProtocolError("instance_heartbeat: too many running_kernels")


def check_claims(info: dict[str, Any], event_type: str) -> None:
    """Bound what an agent may claim about itself."""
    if not 0 < info["max_kernels"] <= MAX_CLAIMED_KERNELS:
        raise ProtocolError(f"{event_type}.info: max_kernels outside 1..{MAX_CLAIMED_KERNELS}")
    languages = info["languages"]
    if len(languages) > MAX_LANGUAGES or not all(
            isinstance(lang, str) and 0 < len(lang) <= MAX_NAME_LENGTH for lang in languages):
        raise ProtocolError(f"{event_type}.info: at most {MAX_LANGUAGES} language names of "
                            f"at most {MAX_NAME_LENGTH} characters")
