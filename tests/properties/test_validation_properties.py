"""Upload file names and request bodies: a clean value or InvalidAPIParameters (a 400)."""
from __future__ import annotations

import json

from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import BaseModel

from sorna_server.gateway.errors import InvalidAPIParameters
from sorna_server.gateway.validation import (
    MAX_FILENAME_LENGTH,
    Authorize,
    CreateKernel,
    Execute,
    decode_json_object,
    parse,
    sanitize_filename,
)
from tests.properties.strategies import json_values, maps_with

path_parts = st.sampled_from(["", ".", "..", "a", "b.c", "C:", "x:y", " ", "~", "\x00", "é"])
name_like = st.one_of(
    st.text(max_size=300),
    st.lists(path_parts | st.text(max_size=5), max_size=6).flatmap(
        lambda parts: st.sampled_from(["/", "\\"]).map(lambda sep: sep.join(parts))),
)


@given(name_like)
def test_file_names_are_clean_or_refused(name: str) -> None:
    try:
        clean = sanitize_filename(name)
    except InvalidAPIParameters:
        return
    parts = clean.split("/")
    assert all(part not in ("", ".", "..") for part in parts), clean
    assert "\\" not in clean and "\x00" not in clean and ":" not in parts[0]
    assert len(clean) <= MAX_FILENAME_LENGTH
    assert sanitize_filename(clean) == clean


safe_part = st.text(alphabet="abcXYZ019_-.", min_size=1, max_size=12).filter(
    lambda part: part not in (".", ".."))


@given(st.lists(safe_part, min_size=1, max_size=5))
def test_plain_relative_names_are_kept(parts: list[str]) -> None:
    name = "/".join(parts)
    if len(name) <= MAX_FILENAME_LENGTH:
        assert sanitize_filename(name) == name
        assert sanitize_filename("\\".join(parts)) == name


LIMITS = maps_with(["maxMem", "execTimeout"], json_values | st.sampled_from(
    ["512m", "1g", "inf", "nan", "-1k", "1e400", "0x10", "", "2.5g"]))
BODIES = {
    CreateKernel: maps_with(["lang", "clientSessionToken", "limits", "resourceLimits", "mounts"],
                            json_values | LIMITS | st.sampled_from(["python3", "abcdefghij"])),
    Execute: maps_with(["mode", "code", "options"],
                       json_values | st.sampled_from(["query", "batch", "complete"])),
    Authorize: maps_with(["echo"], json_values),
}


@given(st.sampled_from(sorted(BODIES, key=lambda model: model.__name__)).flatmap(
    lambda model: st.tuples(st.just(model), BODIES[model])))
@example((CreateKernel, {"lang": "python3", "clientSessionToken": "abcdefghij",
                         "limits": {"maxMem": "inf"}}))  # found here: used to be a 500
def test_bodies_validate_or_are_a_400(case: tuple[type[BaseModel], dict]) -> None:
    model, data = case
    try:
        body = parse(model, data)
    except InvalidAPIParameters as exc:
        assert exc.args or str(exc)
        return
    assert isinstance(body, model)
    if isinstance(body, CreateKernel):
        limits = body.agent_limits()
        assert set(limits) <= {"maxMem", "execTimeout"}
        assert isinstance(limits.get("maxMem", 0), int) and limits.get("maxMem", 0) >= 0


@given(st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.integers(1, 50_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 50_000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
))
@example(b"[" * 100_000)  # found here: used to raise RecursionError
def test_body_bytes_give_an_object_or_a_400(raw: bytes) -> None:
    try:
        data = decode_json_object(raw)
    except InvalidAPIParameters:
        return
    assert isinstance(data, dict)
