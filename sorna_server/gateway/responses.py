"""Response bodies of the API, as pydantic models: the OpenAPI document's response
schemas, and what the handlers that build their bodies from a model use.

The schemathesis test checks every answer of a live server against these
schemas, so a handler that drifts from its model fails the suite.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ConsoleRecord = Annotated[list[Any], Field(
    min_length=2, max_length=2,
    description="[kind, data]: kind is stdout, stderr, media, html, ...; data is usually text")]


class Hello(BaseModel):
    version: str = Field(description="The newest API revision this server speaks.")


class Authorized(BaseModel):
    authorized: Literal["yes"]
    echo: Any = Field(default=None, description="The request's `echo`, when it had one.")


class KernelCreated(BaseModel):
    kernelId: str


class KernelInfo(BaseModel):
    lang: str
    age: int = Field(description="ms since creation")
    queryTimeout: int = Field(description="ms per execute")
    idleTimeout: int = Field(description="ms without use before the kernel ends")
    memoryLimit: int = Field(description="KiB")
    maxCpuCredit: int = Field(description="ms")
    numQueriesExecuted: int
    idle: int = Field(description="ms since the last use")
    memoryUsed: int = Field(description="KiB (peak)")
    cpuCreditUsed: int = Field(description="ms of CPU used")


class ExecuteResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: Literal["finished", "continued", "waiting-input", "build-finished"]
    console: list[ConsoleRecord]
    options: dict[str, Any] | None = Field(
        default=None, description="waiting-input: {is_password}")
    completions: list[str] | None = Field(default=None, description="complete mode")


class ExecuteReply(BaseModel):
    result: ExecuteResult


class LanguageLimits(BaseModel):
    model_config = ConfigDict(extra="allow")

    maxMem: int | None = Field(default=None, description="bytes")
    execTimeout: float | None = Field(default=None, description="seconds per execute")


class LanguageOffer(BaseModel):
    name: str = Field(description="What to send as `lang` in POST /kernel/create.")
    aliases: list[str] = Field(description="Other names that create the same language.")
    versions: list[str] = Field(description="Runtime versions the agents report (may be "
                                            "empty when agents do not report them).")
    defaultLimits: LanguageLimits = Field(
        description="What a kernel gets without `limits`: as the agents report it, else "
                    "the gateway's configured agent defaults.")
    agents: int = Field(description="Live agents offering the language.")
    accepting: int = Field(description="... of which take new kernels (not draining).")


class Languages(BaseModel):
    languages: list[LanguageOffer]


class Check(BaseModel):
    ok: bool
    detail: str
    latency_ms: float


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    failed: list[str] = Field(description="Names of the checks that failed.")
    checks: dict[str, Check]


class Liveness(BaseModel):
    status: Literal["ok"]


class ProblemBody(BaseModel):
    """RFC 7807 problem details (`application/problem+json`)."""

    model_config = ConfigDict(extra="allow", title="Problem")

    type: str = Field(description="https://api.sorna.io/probs/<name>")
    title: str
    detail: str | None = None
