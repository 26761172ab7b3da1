"""Agent protocol frames: any bytes decode to a valid message or raise ProtocolError
(which the receiver logs and drops); what we encode decodes to the same thing."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sorna_server import agent_protocol as proto
from tests.properties.strategies import maps_with, msgpack_values

ENVELOPE = ["v", "id", "method", "args", "ok", "result", "error", "type", "instance_id", "ts"]
FIELDS = sorted({name for spec in (*proto.METHOD_ARGS.values(), *proto.EVENT_FIELDS.values(),
                                    proto.INFO_FIELDS) for name in spec})
NAMES = sorted({*proto.METHOD_ARGS, *proto.EVENT_FIELDS, *proto.EXECUTE_MODES,
                "type", "message", "x"})

value = msgpack_values | st.sampled_from([1, 0, 2, True, [], {}, *NAMES]) \
    | maps_with(FIELDS + ["type", "message"], msgpack_values | st.sampled_from(NAMES))
message = maps_with(ENVELOPE + FIELDS, value)
frames = st.one_of(
    st.binary(max_size=64),
    msgpack_values.map(proto.pack),
    message.map(proto.pack),
    message.map(lambda msg: proto.pack({**msg, "v": proto.PROTOCOL_VERSION})),
)


@given(frames)
def test_requests_decode_or_are_dropped(frame: bytes) -> None:
    try:
        request = proto.decode_request(frame)
    except proto.ProtocolError:
        return
    assert isinstance(request.method, str) and isinstance(request.args, dict)
    assert isinstance(request.id, int | str) and not isinstance(request.id, bool)
    try:
        proto.validate_args(request.method, request.args)
    except proto.ProtocolError:
        pass


@given(frames)
def test_replies_decode_or_are_dropped(frame: bytes) -> None:
    try:
        reply = proto.decode_reply(frame)
    except proto.ProtocolError:
        return
    assert isinstance(reply.ok, bool)
    if not reply.ok:
        assert isinstance(reply.error["type"], str) and "message" in reply.error


@given(frames)
def test_events_decode_or_are_dropped(frame: bytes) -> None:
    try:
        event = proto.decode_event(frame)
    except proto.ProtocolError:
        return
    assert event["type"] in proto.EVENT_FIELDS
    assert isinstance(event["instance_id"], str) and event["instance_id"]


@given(st.sampled_from(sorted(proto.METHOD_ARGS)).flatmap(
    lambda method: st.tuples(st.just(method), maps_with(
        sorted(proto.METHOD_ARGS[method]), value | st.sampled_from(sorted(proto.EXECUTE_MODES)))))
       | st.tuples(st.text(max_size=12), maps_with(FIELDS, value)))
def test_arguments_validate_or_are_refused(case: tuple[str, dict]) -> None:
    method, args = case
    try:
        proto.validate_args(method, args)
    except proto.ProtocolError:
        return
    for name, (types, required) in proto.METHOD_ARGS[method].items():
        assert name in args or not required
        if name in args:
            assert isinstance(args[name], types)


ids = st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20)
plain = st.recursive(st.none() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10)
                     | st.binary(max_size=10) | st.floats(allow_nan=False),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                           max_size=3),
                     max_leaves=8)


@given(ids, st.text(max_size=20), st.dictionaries(st.text(max_size=8), plain, max_size=4))
def test_requests_round_trip(req_id: int | str, method: str, args: dict) -> None:
    request = proto.decode_request(proto.encode_request(req_id, method, args))
    assert (request.id, request.method, request.args) == (req_id, method, args)


@given(ids, plain, st.text(max_size=20), st.text(max_size=20))
def test_replies_round_trip(req_id: int | str, result: object, err_type: str,
                            message: str) -> None:
    assert proto.decode_reply(proto.encode_result(req_id, result)) == \
        proto.Reply(req_id, True, result)
    reply = proto.decode_reply(proto.encode_error(req_id, err_type, message))
    assert (reply.ok, reply.error) == (False, {"type": err_type, "message": message})


@given(st.text(min_size=1, max_size=20), st.text(max_size=20), st.text(max_size=20),
       st.dictionaries(st.sampled_from(proto.STATS_FIELDS), st.integers(0, 2**62)))
def test_events_round_trip(instance_id: str, kernel_id: str, reason: str, stats: dict) -> None:
    event = proto.decode_event(proto.encode_event("kernel_terminated", instance_id,
                                                  kernel_id=kernel_id, reason=reason,
                                                  stats=stats))
    assert (event["instance_id"], event["kernel_id"], event["reason"], event["stats"]) == \
        (instance_id, kernel_id, reason, stats)
