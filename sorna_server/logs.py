"""The one logging set-up of every `sorna` process, and the request id they share.

`setup_logging(level, fmt)` configures the root logger once per process:
`text` writes `TIME LEVEL [LABEL] LOGGER [REQUEST-ID]: MESSAGE` lines, `json` one
JSON object per line (python-json-logger) with `timestamp`, `level`, `logger`,
`message`, `request_id` when the line belongs to a request, and any `extra`
fields the caller gave (the access log gives method, path, status, ...).

The request id of the request being served lives in a context variable set by
the gateway's request middleware: every log line written while serving the
request carries it, and the agent RPC client sends it along with each call.
This module imports nothing of the project (the agent and the CLI use it too).
"""
from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from typing import TextIO

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s {label}%(name)s%(rid)s: %(message)s"

REQUEST_ID: ContextVar[str | None] = ContextVar("sorna_request_id", default=None)
"""The id of the HTTP request being served in this context (None outside requests)."""


def current_request_id() -> str | None:
    return REQUEST_ID.get()


class RequestIdFilter(logging.Filter):
    """Stamps `record.request_id` from the context unless the caller gave one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            rid = REQUEST_ID.get()
            if rid is not None:
                record.request_id = rid
        return True


class TextFormatter(logging.Formatter):
    _stamp: tuple[int, str] = (-1, "")  # (whole second, its date and time)

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.rid = f" [{rid}]" if rid else ""
        return super().format(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The standard `2026-11-30 12:00:00,123`, with the date and time made
        once a second (strftime on every line costs ~1 us of every request)."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if self._stamp[0] != second:
            self._stamp = (second, time.strftime(self.default_time_format,
                                                 self.converter(record.created)))
        msec_format = self.default_msec_format
        return msec_format % (self._stamp[1], record.msecs) if msec_format else self._stamp[1]


def _formatter(fmt: str, label: str | None) -> logging.Formatter:
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter("{levelname}{name}{message}", style="{",
                             rename_fields={"levelname": "level", "name": "logger"},
                             static_fields={"worker": label} if label else None,
                             timestamp=True)
    return TextFormatter(TEXT_FORMAT.format(label=f"[{label}] " if label else ""))


class _SornaHandler(logging.StreamHandler):
    """Marks the handler this module installed, so a second set-up replaces it."""


def setup_logging(level: str | int = "INFO", fmt: str = "text", *, label: str | None = None,
                  stream: TextIO | None = None) -> None:
    """(Re)configure the root logger: one stderr handler in the given format.

    Safe to call again (the CLI does once the config is loaded): the handler of
    an earlier call is replaced, handlers others installed (pytest's) stay.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _SornaHandler)]:
        root.removeHandler(old)
    handler = _SornaHandler(stream or sys.stderr)
    handler.setFormatter(_formatter(fmt, label))
    handler.addFilter(RequestIdFilter())
    root.addHandler(handler)
    root.setLevel(level)
