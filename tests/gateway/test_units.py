"""Pure functions of the gateway: signatures (against the real sorna-client's
signing code), dates, file names, paths; and raw malformed HTTP."""
from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sorna.auth import generate_signature

from sorna_server.gateway.auth import check_date, parse_authorization, parse_date, sign_request
from sorna_server.gateway.errors import InvalidAPIParameters, InvalidAuthParameters
from sorna_server.gateway.validation import sanitize_filename
from sorna_server.gateway.versioning import path_major
from tests.helpers import VERSION_HEADERS


@pytest.mark.parametrize("hash_type", ["sha256", "sha1", "sha512"])
@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data"])
def test_signature_matches_the_historic_client(hash_type, content_type):
    date = datetime.now(UTC)
    body = b'{"lang": "python3"}'
    _, expected = generate_signature("POST", "v2.20170315", "http://127.0.0.1:8080", date,
                                     "kernel/create", content_type, body,
                                     "AKIAIOSFODNN7EXAMPLE", "secret" * 6, hash_type)
    ours = sign_request("secret" * 6, method="POST", path_qs="/v2/kernel/create",
                        raw_date=date.isoformat(), host="127.0.0.1:8080",
                        content_type=content_type, version="v2.20170315", body=body,
                        hash_name=hash_type)
    assert ours == expected


def test_authorization_header_parsing():
    assert parse_authorization("Sorna signMethod=HMAC-SHA256, credential=AKIA123:abcdef") == \
        ("sha256", "AKIA123", "abcdef")
    assert parse_authorization("Sorna signMethod=hmac-sha1,credential=K:S")[0] == "sha1"
    for bad in ("Bearer x", "Sorna credential=K:S", "Sorna signMethod=HMAC-SHA256",
                "Sorna signMethod=HMAC-SHA256, credential=nocolon",
                "Sorna signMethod=RSA, credential=K:S"):
        with pytest.raises(InvalidAuthParameters):
            parse_authorization(bad)


def test_dates():
    now = datetime.now(UTC)
    assert parse_date(now.isoformat()) == now
    assert parse_date("2017-03-15T01:02:03.123456+09:00").utcoffset() == timedelta(hours=9)
    assert parse_date("2017-03-15T01:02:03Z").tzinfo is not None
    assert parse_date("Wed, 15 Mar 2017 01:02:03 GMT") == datetime(2017, 3, 15, 1, 2, 3,
                                                                    tzinfo=UTC)
    for bad in ("", "tomorrow", "15/03/2017 noon"):
        with pytest.raises(InvalidAuthParameters):
            parse_date(bad)
    check_date(now - timedelta(minutes=14))
    with pytest.raises(InvalidAuthParameters):
        check_date(now - timedelta(minutes=16))


def test_file_names():
    assert sanitize_filename("main.py") == "main.py"
    assert sanitize_filename("./src/lib/a.py") == "src/lib/a.py"
    assert sanitize_filename("src\\win\\a.py") == "src/win/a.py"
    for bad in ("", ".", "..", "../a", "a/../../b", "/etc/passwd", "\\abs", "C:\\x",
                "a\x00b", "x" * 300, "sub\\..\\..\\x"):
        with pytest.raises(InvalidAPIParameters):
            sanitize_filename(bad)


def test_path_versions():
    assert path_major("/v2/kernel/create") == "v2"
    assert path_major("/v1") == "v1"
    assert path_major("/v2x/kernel") is None
    assert path_major("/v3/kernel") is None
    assert path_major("/") is None


async def test_malformed_http_gets_no_traceback(gateway_factory):
    gw = await gateway_factory()
    for raw in (b"GARBAGE\r\n\r\n", b"GET /v2 HTTP/9.9\r\n\r\n",
                b"GET /v2/authorize HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                b"\x00\xff\xfe\r\n\r\n"):
        reader, writer = await asyncio.open_connection(gw.client.server.host,
                                                       gw.client.server.port)
        writer.write(raw)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(65536), 10)
        writer.close()
        status_line = reply.split(b"\r\n", 1)[0]
        assert reply == b"" or (status_line.startswith(b"HTTP/1.") and b" 4" in status_line), \
            (raw, reply)
        assert b"Traceback" not in reply and b"File \"" not in reply
    resp = await gw.client.get("/v2", headers=VERSION_HEADERS)  # still serving
    assert resp.status == 200
