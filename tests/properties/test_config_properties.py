"""Size strings and URL masking from the one config loader."""
from __future__ import annotations

from urllib.parse import quote

from hypothesis import example, given
from hypothesis import strategies as st

from sorna_server.config import mask_url, parse_size

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

size_like = st.one_of(
    st.integers(), st.floats(), st.booleans(), st.none(), st.text(max_size=20),
    st.builds(lambda number, unit, suffix: f"{number}{unit}{suffix}",
              st.one_of(st.integers(-10, 10**6), st.floats(), st.sampled_from(
                  ["inf", "-inf", "nan", "Infinity", "1e400", "1_000", " 7 "])),
              st.sampled_from([*UNITS, "K", "M", "G", "x"]), st.sampled_from(["", "b", "ib", "B"])),
)


@given(size_like)
@example("inf")  # found here: used to raise OverflowError
@example("1.6742321987285427e+299t")  # found here: finite, but not once multiplied
@example("nan")
def test_sizes_parse_to_a_byte_count_or_a_value_error(value: object) -> None:
    try:
        size = parse_size(value)
    except ValueError:
        return
    assert isinstance(size, int) and not isinstance(size, bool) and size >= 0


@given(st.integers(0, 10**9), st.sampled_from(sorted(UNITS)), st.booleans(),
       st.sampled_from(["", "b", "ib"]))
def test_sizes_round_trip(number: int, unit: str, upper: bool, suffix: str) -> None:
    text = f"{number}{unit}{suffix if unit else ''}"
    assert parse_size(text.upper() if upper else text) == number * UNITS[unit]
    assert parse_size(number) == number


@given(st.one_of(st.none(), st.text(max_size=80)))
def test_masking_never_raises(url: str | None) -> None:
    assert isinstance(mask_url(url), str)


lower = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10)
# "SeCrEt" cannot occur in the lower-case parts, so finding it means the password leaked
passwords = st.text(max_size=20).map(lambda text: "SeCrEt" + quote(text, safe=""))


@given(st.sampled_from(["postgresql", "postgresql+asyncpg", "redis", "rediss"]), lower,
       passwords, lower, st.one_of(st.none(), st.integers(1, 65535)), lower)
def test_passwords_never_show(scheme: str, user: str, password: str, host: str,
                              port: int | None, path: str) -> None:
    netloc = f"{host}:{port}" if port else host
    masked = mask_url(f"{scheme}://{user}:{password}@{netloc}/{path}")
    assert "SeCrEt" not in masked
    assert masked == f"{scheme}://{user}:***@{netloc}/{path}"
    masked = mask_url(f"{scheme}://{netloc}/{path}?user={user}&password={password}&x=1")
    assert "SeCrEt" not in masked and masked.endswith("&password=***&x=1")
