"""Request bodies: safe JSON decoding and typed validation (bad input is a 400, never a 500).

The models are also the request schemas of the OpenAPI document, so every bound
a value must respect to reach an agent (msgpack carries integers of at most 64
bits, UTF-8 text only, a bounded nesting depth) is declared here, where both the
validation and the document see it.
"""
from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from typing_extensions import TypeAliasType

from ..config import parse_size
from .errors import InvalidAPIParameters
from .keys import SIGNED_BODY

MAX_FILENAME_LENGTH = 255
MAX_JSON_DEPTH = 32          # nesting of arrays and objects in a request body
MAX_MEM_LIMIT = 1 << 50      # bytes (1 PiB): far above any host, far below 64 bits
MAX_COORDINATE = (1 << 31) - 1


def decode_json(raw: bytes) -> Any:
    """Parse a JSON request body; anything that is not plain, bounded JSON is a 400.

    Refused: invalid UTF-8 (encoded surrogates included), NaN/Infinity, nesting
    deeper than MAX_JSON_DEPTH (also what would exhaust the parser's recursion)
    and strings with unpaired surrogate escapes (not encodable as UTF-8).
    """
    try:
        text = raw.decode("utf-8")
        data = _DECODER.decode(text)
    except RecursionError:
        raise InvalidAPIParameters(
            f"The request body nests deeper than {MAX_JSON_DEPTH} levels.") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidAPIParameters("The request body is not valid JSON.") from None
    nested = raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH
    surrogates = "\\ud" in text or "\\uD" in text
    if nested or surrogates:
        _check_tree(data)
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)  # one, not one per request


def _check_tree(data: Any) -> None:
    """Walk the decoded body (iteratively): depth bound, strings encodable as UTF-8."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise InvalidAPIParameters(
                    f"The request body nests deeper than {MAX_JSON_DEPTH} levels.")
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidAPIParameters("The request body holds an unpaired UTF-16 surrogate.") \
            from None


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
    data = decode_json(raw)
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


# --- value types ---------------------------------------------------------------
AgentInt = Annotated[StrictInt, Field(ge=-(1 << 63), le=(1 << 64) - 1)]
"""An integer an agent can receive (msgpack: signed or unsigned 64 bits)."""

if TYPE_CHECKING:
    JsonValue = Any
else:
    JsonValue = TypeAliasType(
        "JsonValue",
        Union[None, StrictBool, AgentInt, StrictFloat, StrictStr,  # noqa: UP007  (recursive)
              list["JsonValue"], dict[str, "JsonValue"]])
"""Any JSON value an agent can receive (integers beyond 64 bits become numbers)."""

SIZE_PATTERN = r"^\s*[0-9.]+\s*[kKmMgGtT]?[iI]?[bB]?\s*$"
SizeText = Annotated[StrictStr, Field(max_length=32, pattern=SIZE_PATTERN)]
Coordinate = Annotated[StrictInt, Field(ge=0, le=MAX_COORDINATE)]


class KernelLimits(BaseModel):
    model_config = ConfigDict(extra="ignore")

    maxMem: Annotated[StrictInt, Field(ge=0, le=MAX_MEM_LIMIT)] | SizeText | None = Field(
        default=None, description="Memory limit: bytes, or a size such as 512m (0 = the "
        f"agent's maximum; at most {MAX_MEM_LIMIT} bytes).")
    execTimeout: StrictInt | StrictFloat | None = Field(
        default=None, ge=0, le=86400, description="Seconds per execute (0 = the agent's default).")

    @field_validator("maxMem")
    @classmethod
    def _size(cls, value: int | str | None) -> int | None:
        if value is None:
            return None
        size = parse_size(value)
        if size > MAX_MEM_LIMIT:
            raise ValueError(f"must be at most {MAX_MEM_LIMIT} bytes")
        return size

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
    mounts: list[Annotated[StrictStr, Field(max_length=MAX_FILENAME_LENGTH)]] | None = Field(
        default=None, max_length=16)

    def agent_limits(self) -> dict[str, Any]:
        chosen = self.limits or self.resourceLimits
        return chosen.for_agent() if chosen else {}


class ExecuteOptions(BaseModel):
    """Options of an execute; other members are passed to the agent as they are."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, JsonValue] = Field(init=False)

    build: StrictStr | None = Field(
        default=None, description="batch: build command (`*` = the language's default)")
    exec: StrictStr | None = Field(
        default=None, description="batch: run command (`*` = the language's default)")
    line: StrictStr | None = Field(default=None, description="complete: the line to complete")
    row: Coordinate | None = Field(default=None, description="complete: cursor row")
    col: Coordinate | None = Field(default=None, description="complete: cursor column")


class Execute(BaseModel):
    model_config = ConfigDict(extra="ignore")

    mode: Literal["query", "batch", "complete"] = "query"
    code: StrictStr | None = None
    options: ExecuteOptions | None = None

    def agent_options(self) -> dict[str, Any]:
        """The options as the agent receives them (what the client gave)."""
        return self.options.model_dump(exclude_unset=True) if self.options else {}


class Authorize(BaseModel):
    model_config = ConfigDict(extra="ignore")

    echo: Any = Field(default=None, description="Any JSON value, returned as it is.")


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
