"""Request bodies: JSON parsing and typed validation (bad input is a 400, never a 500)."""
from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any, Literal

from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from ..config import parse_size
from .errors import InvalidAPIParameters
from .keys import SIGNED_BODY

MAX_FILENAME_LENGTH = 255


async def json_body(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; an empty body is `{}`.  Signed requests hand
    over the bytes their signature covered (read by the auth middleware)."""
    raw = request.get(SIGNED_BODY)
    if raw is None:
        if request.content_type.startswith("multipart/"):
            raise InvalidAPIParameters("This request takes a JSON body, not a multipart one.")
        raw = await request.read()
    return decode_json_object(raw)


def decode_json_object(raw: bytes) -> dict[str, Any]:
    """Bytes of a JSON object (empty: `{}`); anything else is invalid-api-params."""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[...
        raise InvalidAPIParameters("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise InvalidAPIParameters("The request body must be a JSON object.")
    return data


def parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidAPIParameters(f"{where}: {first['msg']}",
                                   errors=[{"field": ".".join(str(p) for p in err["loc"]),
                                            "message": err["msg"]}
                                           for err in exc.errors(include_url=False)[:10]]) \
            from None


class KernelLimits(BaseModel):
    model_config = ConfigDict(extra="ignore")

    maxMem: StrictInt | StrictStr | None = None
    execTimeout: StrictInt | StrictFloat | None = Field(default=None, ge=0, le=86400)

    @field_validator("maxMem")
    @classmethod
    def _size(cls, value: int | str | None) -> int | None:
        return None if value is None else parse_size(value)

    def for_agent(self) -> dict[str, Any]:
        """Only the limits that were given (0 means "the agent's maximum")."""
        limits: dict[str, Any] = {}
        if self.maxMem:
            limits["maxMem"] = self.maxMem
        if self.execTimeout:
            limits["execTimeout"] = self.execTimeout
        return limits


class CreateKernel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lang: StrictStr = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$")
    clientSessionToken: StrictStr = Field(min_length=8, max_length=80)
    limits: KernelLimits | None = None
    resourceLimits: KernelLimits | None = None
    mounts: list[StrictStr] | None = Field(default=None, max_length=16)

    def agent_limits(self) -> dict[str, Any]:
        chosen = self.limits or self.resourceLimits
        return chosen.for_agent() if chosen else {}


class Execute(BaseModel):
    model_config = ConfigDict(extra="ignore")

    mode: Literal["query", "batch", "complete"] = "query"
    code: StrictStr | None = None
    options: dict[str, Any] | None = None


class Authorize(BaseModel):
    model_config = ConfigDict(extra="ignore")

    echo: Any = None


def sanitize_filename(name: str | None) -> str:
    """A relative path inside the kernel's folder, or invalid-api-params.

    Backslashes count as separators; absolute paths, `..` components, NUL and
    empty names are refused (never silently rewritten to something else).
    """
    if not name or "\x00" in name or len(name) > MAX_FILENAME_LENGTH:
        raise InvalidAPIParameters(f"Invalid file name {name!r}.")
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise InvalidAPIParameters(f"File name {name!r} must be a relative path.")
    parts = [part for part in path.parts if part != "."]
    if not parts or ".." in parts:
        raise InvalidAPIParameters(f"File name {name!r} escapes the kernel's folder.")
    return "/".join(parts)
