"""Shared hypothesis strategies: JSON documents and msgpack values as an attacker may send."""
from __future__ import annotations

from hypothesis import strategies as st

SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20))

# Anything `json.loads` can return (Python's json accepts NaN and Infinity too).
json_values = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)

MSGPACK_SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
                   | st.text(max_size=20) | st.binary(max_size=20))

# Anything msgpack can carry (map keys: strings or bytes, as strict_map_key allows).
msgpack_values = st.recursive(
    MSGPACK_SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10) | st.binary(max_size=10), children, max_size=4),
    max_leaves=12,
)


def maps_with(keys: list[str], values: st.SearchStrategy = msgpack_values
              ) -> st.SearchStrategy[dict]:
    """Maps that use some of `keys` (the names a decoder looks at) plus random ones."""
    extra = st.dictionaries(st.text(max_size=8), values, max_size=2)
    if not keys:
        return extra
    known = st.dictionaries(st.sampled_from(keys), values, max_size=len(keys))
    return st.builds(lambda a, b: {**b, **a}, known, extra)
