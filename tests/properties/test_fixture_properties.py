"""The fixture validator: parsed JSON gives checked rows or FixtureInvalid, never a crash."""
from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from sorna_server.db.models import metadata
from sorna_server.fixture_loader import FixtureInvalid, validate_fixture
from tests.properties.strategies import json_values, maps_with

TABLES = sorted(metadata.tables)
COLUMNS = sorted({column.name for table in metadata.tables.values() for column in table.columns})
cell = json_values | st.sampled_from(["2017-01-01T00:00:00", "2017-01-01T00:00:00+09:00",
                                      "AKIAIOSFODNN7EXAMPLE", "x" * 65, True, 7, -1, 2**70])
rows = st.lists(maps_with(COLUMNS, cell) | json_values, max_size=3)
documents = json_values | maps_with(TABLES, rows | json_values)


@given(documents)
def test_fixtures_validate_or_are_refused(data: object) -> None:
    try:
        checked = validate_fixture(data, "generated.json")
    except FixtureInvalid as exc:
        assert str(exc).startswith("fixture generated.json: ")
        return
    assert isinstance(data, dict) and set(checked) == set(data)
    for table_name, table_rows in checked.items():
        columns = metadata.tables[table_name].columns
        assert len(table_rows) == len(data[table_name])
        for row in table_rows:
            assert set(row) <= set(columns.keys())


@given(st.integers(0, 2**31 - 1), st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", min_size=20,
                                         max_size=20),
       st.text(min_size=1, max_size=40), st.booleans(),
       st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2100, 1, 1)))
def test_valid_keypair_rows_are_kept(user_id: int, access_key: str, secret: str,
                                     active: bool, created: datetime) -> None:
    row = {"user_id": user_id, "access_key": access_key, "secret_key": secret,
           "is_active": active, "created_at": created.isoformat()}
    checked = validate_fixture({"keypairs": [row]}, "keypairs.json")
    assert checked == {"keypairs": [{**row, "created_at": created.replace(tzinfo=UTC)}]}
