"""One log line per request: method, path, status, latency, access key."""
from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from .keys import ACCESS_KEY


class RequestLog(AbstractAccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info("%s %s %d %.1fms %s", request.method, request.path, response.status,
                         time * 1000, request.get(ACCESS_KEY, "-"))

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
