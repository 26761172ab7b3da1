"""The Authorization header and the request date: any text gives a parsed value or
InvalidAuthParameters (a 400), never another exception (a 500)."""
from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from sorna_server.gateway.auth import (
    SIGN_METHODS,
    check_date,
    parse_authorization,
    parse_date,
)
from sorna_server.gateway.errors import InvalidAuthParameters

header_like = st.one_of(
    st.text(max_size=80),
    st.builds(lambda params: "Sorna " + params, st.text(max_size=80)),
    st.builds(lambda method, cred: f"Sorna signMethod={method}, credential={cred}",
              st.sampled_from([*SIGN_METHODS, "hmac-sha256", "RSA", ""]), st.text(max_size=40)),
)


@given(header_like)
def test_authorization_parses_or_is_a_400(header: str) -> None:
    try:
        hash_name, access_key, signature = parse_authorization(header)
    except InvalidAuthParameters:
        return
    assert hash_name in SIGN_METHODS.values()
    assert access_key and signature and ":" not in access_key


token = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ234567abcdef0123456789", min_size=1,
                max_size=40)


@given(st.sampled_from(sorted(SIGN_METHODS)), st.booleans(), token, token,
       st.sampled_from([", ", ",", " , "]))
def test_authorization_round_trip(method: str, lower: bool, access_key: str, signature: str,
                                  comma: str) -> None:
    header = (f"Sorna signMethod={method.lower() if lower else method}{comma}"
              f"credential={access_key}:{signature}")
    assert parse_authorization(header) == (SIGN_METHODS[method], access_key, signature)


date_like = st.one_of(
    st.text(max_size=40),
    st.datetimes().map(datetime.isoformat),
    st.from_regex(r"\A[A-Z][a-z]{2}, \d{1,2} [A-Z][a-z]{2} \d{1,5} \d\d:\d\d:\d\d"
                  r"( [+-]\d{4}| GMT| [A-Z]{3})?\Z"),
)


@given(date_like)
def test_date_parses_or_is_a_400(raw: str) -> None:
    try:
        date = parse_date(raw)
    except InvalidAuthParameters:
        return
    assert date.tzinfo is not None
    try:
        check_date(date)  # what the middleware does next: also a 400 at worst
    except InvalidAuthParameters:
        pass


offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes)))


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                    timezones=offsets))
def test_iso_dates_round_trip(moment: datetime) -> None:
    assert parse_date(moment.isoformat()) == moment


@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1)))
def test_rfc1123_dates_round_trip(moment: datetime) -> None:
    moment = moment.replace(microsecond=0, tzinfo=UTC)
    assert parse_date(email.utils.format_datetime(moment, usegmt=True)) == moment


@given(st.integers(-14 * 60, 14 * 60), st.integers(16 * 60, 10**6))
def test_only_dates_near_the_clock_pass(near_s: int, far_s: int) -> None:
    now = datetime.now(UTC)
    check_date(now + timedelta(seconds=near_s), now)
    for sign in (1, -1):
        try:
            check_date(now + sign * timedelta(seconds=far_s), now)
        except InvalidAuthParameters:
            continue
        raise AssertionError(f"{sign * far_s} s away was accepted")
