"""One log line per request: method, path, status, latency, access key, request id.

Text: `... INFO sorna.access [1f0c...]: GET /v2/authorize 200 0.8ms AKIAIOSFODNN7EXAMPLE`
(the request id in brackets, as on every line logged for a request); with
`log_format = "json"` the values are fields of the JSON object (`method`,
`path`, `status`, `latency_ms`, `access_key`, `request_id`).
"""
from __future__ import annotations

import logging
import time as clock

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from .keys import ACCESS_KEY, REQUEST_ID, STARTED


class RequestLog(AbstractAccessLogger):
    """aiohttp's access logger, given the `log_format` setting as its format
    (`AppRunner(access_log_format=config.log_format)`): the JSON fields are only
    attached for JSON logs (the access log is on the hot path)."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self.structured = log_format == "json"

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        # aiohttp's `time` has the resolution of its cached clock (about 1 ms)
        started = request.get(STARTED)
        seconds = clock.perf_counter() - started if started is not None else time
        latency_ms = round(seconds * 1000, 2)
        access_key = request.get(ACCESS_KEY, "-")
        extra: dict[str, object] = {"request_id": request.get(REQUEST_ID, "-")}
        if self.structured:
            extra.update(method=request.method, path=request.path, status=response.status,
                         latency_ms=latency_ms, access_key=access_key)
        # made and handled directly: `Logger.info` would walk the stack to find
        # its caller (aiohttp's internals, of no use here) on every request
        logger = self.logger
        logger.handle(logger.makeRecord(
            logger.name, logging.INFO, __file__, 0, "%s %s %d %.2fms %s",
            (request.method, request.path, response.status, latency_ms, access_key), None,
            extra=extra))

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
