"""The text log format: a per-second time cache that must read like the standard one."""
from __future__ import annotations

import io
import logging

import pytest

from sorna_server import logs, metrics
from sorna_server.gateway.observe import new_request_id, request_id_from


@pytest.mark.parametrize("created", [0.5, 1_000_000_000.999, 1_000_000_001.001,
                                     1_785_000_000.25, 1_785_000_000.75, 1_785_000_059.999])
def test_text_time_matches_the_standard_formatter(created):
    ours = logs.TextFormatter("%(asctime)s %(message)s")
    standard = logging.Formatter("%(asctime)s %(message)s")
    record = logging.LogRecord("sorna.test", logging.INFO, __file__, 1, "m", (), None)
    for when in (created, created + 1, created):  # the cache must follow the clock both ways
        record.created = when
        record.msecs = (when - int(when)) * 1000
        assert ours.format(record) == standard.format(record)


@pytest.fixture
def root_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_text_lines_carry_the_request_id_from_the_context(root_logging):
    stream = io.StringIO()
    logs.setup_logging("INFO", "text", stream=stream)
    token = logs.REQUEST_ID.set("trace-7")
    try:
        logging.getLogger("sorna.test").info("inside")
    finally:
        logs.REQUEST_ID.reset(token)
    logging.getLogger("sorna.test").info("outside")
    inside, outside = stream.getvalue().splitlines()
    assert inside.endswith("sorna.test [trace-7]: inside")
    assert outside.endswith("sorna.test: outside")


def test_request_ids_are_new_each_time_and_clients_ids_are_bounded():
    made = {new_request_id() for _ in range(1000)}
    assert len(made) == 1000 and all(len(rid) == 24 and int(rid, 16) >= 0 for rid in made)
    assert request_id_from("client-id.1") == "client-id.1"
    for bad in ("", "-leading", "x" * 200, "bad id", "new\nline"):
        assert request_id_from(bad) != bad


def test_metric_children_are_looked_up_once_and_count_like_labels():
    before = metrics.HTTP_REQUESTS.labels("/unit", "GET", "200")._value.get()
    child = metrics.child(metrics.HTTP_REQUESTS, "/unit", "GET", "200")
    assert metrics.child(metrics.HTTP_REQUESTS, "/unit", "GET", "200") is child
    child.inc()
    assert metrics.HTTP_REQUESTS.labels("/unit", "GET", "200")._value.get() == before + 1
