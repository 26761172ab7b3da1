"""The one settings object every `sorna` command and process uses.

Precedence, lowest first: field defaults < config file (`sorna.toml`, or the path
from `--config` / `SORNA_CONFIG`) < `SORNA_*` environment < explicit overrides
(command-line flags).  Historic environment names (`SORNA_DB_ADDR`,
`SORNA_SERVICE_PORT`, ...) are plain fields, so they need no special casing.

Building a `SornaConfig` only validates values; nothing touches the network or
the disk except reading the config file.
"""
from __future__ import annotations

import json
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG_FILE = "sorna.toml"


class ConfigError(Exception):
    """A setting is missing or invalid; the message is one line for the operator."""


def parse_size(value: Any) -> int:
    """Accept a byte count as an int or a string such as '512m', '2g', '64k'."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512m")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    text = str(value).strip().lower().removesuffix("b").removesuffix("i")
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    factor = 1
    if text and text[-1] in units:
        factor = units[text[-1]]
        text = text[:-1]
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"expected a size such as 512m, got {value!r}") from None
    if number < 0:
        raise ValueError("must not be negative")
    size = number * factor
    if not math.isfinite(size):  # inf, nan, or a number too large for a float
        raise ValueError(f"expected a finite size such as 512m, got {value!r}")
    return int(size)


_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|passwd|pwd)=)[^&#]*")


def mask_url(url: str | None) -> str:
    """Return `url` with any password replaced by `***` (safe for logs and errors).

    Covers `scheme://user:password@host/...` and `?password=...` query values.
    """
    if not url:
        return ""
    url = _QUERY_SECRET.sub(r"\1***", str(url))
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    if "@" not in authority:
        return url
    userinfo, _, hostpart = authority.rpartition("@")
    if ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        userinfo = f"{user}:***"
    return f"{scheme}://{userinfo}@{hostpart}{slash}{tail}"


DB_SCHEMES = ("postgresql", "postgres", "sqlite")
REDIS_SCHEMES = ("redis", "rediss", "unix")


def _check_scheme(url: SecretStr | None, allowed: tuple[str, ...],
                  example: str) -> SecretStr | None:
    """Validate a URL's scheme without ever echoing the URL (it may hold a password)."""
    if url is None:
        return None
    scheme, sep, rest = url.get_secret_value().partition("://")
    backend = scheme.split("+", 1)[0].lower()
    if not sep or backend not in allowed:
        raise ValueError(f"expected a URL such as {example} (scheme one of {', '.join(allowed)})")
    if backend != "sqlite" and not rest.strip("/"):
        raise ValueError(f"expected a URL such as {example} (no host given)")
    return url


class SornaConfig(BaseSettings):
    """Typed settings; see README's configuration table for each one."""

    model_config = SettingsConfigDict(
        env_prefix="SORNA_",
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
        env_ignore_empty=True,  # `SORNA_DB_URL=` means "not set", not "empty URL"
    )

    # --- general ---------------------------------------------------------
    data_dir: Path = Field(
        default=Path("sorna-data"),
        description="folder for the embedded SQLite file and Redis socket",
    )
    debug: bool = False
    log_level: str = "INFO"

    # --- database --------------------------------------------------------
    db_url: SecretStr | None = Field(default=None, description="any SQLAlchemy URL")
    db_addr: str | None = Field(default=None, description="historic host:port")
    db_name: str = "sorna"
    db_user: str = "postgres"
    db_password: SecretStr | None = None

    # --- redis -----------------------------------------------------------
    redis_url: SecretStr | None = None
    redis_addr: str | None = Field(default=None, description="historic host:port")
    redis_db_kernels: int = Field(default=1, ge=0, le=15)
    redis_db_instances: int = Field(default=2, ge=0, le=15)
    redis_db_sessions: int = Field(default=3, ge=0, le=15)
    redis_db_ratelimit: int = Field(default=4, ge=0, le=15)

    # --- gateway ---------------------------------------------------------
    service_ip: str = "0.0.0.0"
    service_port: int = Field(default=0, ge=0, le=65535, description="0 = 8080, or 8443 with TLS")
    ssl_cert: Path | None = None
    ssl_key: Path | None = None
    workers: int = Field(default=1, ge=1, le=64)
    shutdown_timeout: float = Field(default=10.0, gt=0)
    manager_ip: str = Field(default="127.0.0.1", description="legacy ZMQ bind address")
    manager_port: int = Field(default=5001, ge=0, le=65535, description="legacy ZMQ port")
    legacy_enabled: bool = Field(
        default=False, description="serve the legacy ZMQ interface (no authentication: "
                                   "trusted networks only, see docs/security.md)")
    legacy_access_key: str | None = None
    events_ip: str = Field(default="127.0.0.1",
                           description="agent events bind address (beyond loopback only "
                                       "with gateway_key and agent_keys)")
    events_port: int = Field(default=5002, ge=0, le=65535)
    heartbeat_interval: float = Field(default=3.0, gt=0)
    agent_rpc_timeout: float = Field(default=10.0, gt=0)
    keypair_cache_ttl: float = Field(default=5.0, ge=0)
    max_upload_size: int = Field(default=16 << 20, description="bytes per uploaded file")
    rate_limit_window: float = Field(default=900.0, gt=0,
                                     description="seconds of the rolling rate-limit window")

    # --- HTTP authentication and request bodies (docs/security.md) ----------
    max_request_body: int = Field(
        default=8 << 20, description="bytes of a signed non-multipart (JSON) request body")
    max_upload_total: int = Field(
        default=32 << 20, description="bytes of all the files of one upload request")
    auth_body_budget: int = Field(
        default=32 << 20,
        description="bytes of bodies held in memory, over all requests, before their "
                    "signature is checked (each request also has 64 KiB of its own)")
    auth_body_timeout: float = Field(
        default=60.0, gt=0,
        description="seconds a body may take to arrive before its signature is checked")
    # (the sizes above are parsed by `_sizes` below)

    # --- CurveZMQ keys of the agent protocol (docs/security.md) -----------------
    gateway_key: Path | None = Field(
        default=None, description="the gateway's secret key file (`sorna keys generate`)")
    agent_keys: Path | None = Field(
        default=None, description="public key file, or folder of them, of the agents a "
                                  "gateway accepts")
    agent_key: Path | None = Field(
        default=None, description="the agent's secret key file (`sorna keys generate`)")
    gateway_keys: Path | None = Field(
        default=None, description="public key file, or folder of them, of the gateways an "
                                  "agent accepts")

    # --- registry fault handling (issue 10) --------------------------------
    reconcile_interval: float = Field(
        default=10.0, ge=0,
        description="seconds between reconciliation passes (every gateway; 0 = start-up only)")
    creation_deadline: float = Field(
        default=30.0, gt=0,
        description="seconds after which a kernel still being created is abandoned")

    # --- reference agent -------------------------------------------------
    agent_port: int = Field(default=6001, ge=0, le=65535)
    agent_rpc_addr: str | None = Field(default=None, description="tcp://IP:PORT to bind")
    agent_advertise_host: str | None = None
    agent_managers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["tcp://127.0.0.1:5002"],
        description="comma-separated manager event addresses",
    )
    agent_instance_id: str | None = None
    agent_max_kernels: int = Field(default=16, ge=1)
    agent_pool_size: int = Field(default=2, ge=0, le=64)
    agent_idle_timeout: float = Field(default=600.0, gt=0)
    agent_exec_timeout: float = Field(default=10.0, gt=0)
    agent_max_mem: int = Field(default=512 << 20, description="bytes, e.g. 512m")
    agent_max_cpu_time: float = Field(default=600.0, gt=0, description="CPU seconds per kernel")
    agent_max_procs: int = Field(default=64, ge=1)
    agent_max_file_size: int = Field(default=64 << 20)
    agent_max_output: int = Field(default=1 << 20, description="bytes of output per execute")
    agent_scratch_dir: Path | None = Field(
        default=None, description="where the agent makes its folder of kernel folders "
                                  "(default: the system temporary folder; never the data dir)")
    agent_stats_interval: float = Field(default=5.0, gt=0)
    agent_event_queue_size: int = Field(
        default=256, ge=1, description="events kept while no manager listens")
    agent_isolation: str = Field(
        default="auto", pattern="^(auto|best-effort|none)$",
        description="auto: full sandbox, refuse to start without a mount namespace; "
                    "best-effort: what the host allows; none: plain processes")

    # --- kernel sandbox of the reference agent (docs/kernel-sandbox.md) ------------
    # `agent_mount_namespace = false` / `agent_cgroups = "none"` make the agent act
    # as on a host that refuses them (tests use this; so can an operator who must).
    agent_mount_namespace: bool = Field(
        default=True, description="private filesystem view per kernel (false: act as if "
                                  "the host refused mount namespaces)")
    agent_cgroups: str = Field(default="auto", pattern="^(auto|v2|v1|none)$",
                               description="cgroup version for kernel limits; none: rlimits only")
    agent_cgroup_root: str | None = Field(
        default=None, description="parent cgroup of the kernels' cgroups in each hierarchy "
                                  "(default: the agent's own cgroup)")
    agent_cpu_limit: float = Field(default=1.0, gt=0, description="CPUs per kernel (cgroup quota)")
    agent_disk_quota: int = Field(default=256 << 20,
                                  description="size of a kernel's working folder (tmpfs); 0 = none")
    agent_tmp_size: int = Field(default=64 << 20, description="size of a kernel's /tmp")
    agent_shm_size: int = Field(default=64 << 20, description="size of a kernel's /dev/shm")
    agent_uid_min: int = Field(default=1_000_000, ge=1000, description="lowest kernel uid")
    agent_uid_max: int = Field(default=1_999_999_999, le=(1 << 31) - 2,
                               description="highest kernel uid")
    agent_uid_block_size: int = Field(default=65536, ge=8,
                                      description="kernel uids of one agent (a random block)")
    agent_runtime_dir: Path = Field(default=Path("/run/sorna-agent"),
                                    description="host-wide folder of the agents' uid-block locks")
    agent_rootfs_binds: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"],
        description="host folders kernels see, read-only (comma-separated)")
    agent_rootfs_etc: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [
            "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "ssl",
            "ca-certificates", "localtime", "timezone", "nsswitch.conf", "mime.types",
            "protocols", "services", "inputrc", "magic", "magic.mime", "fonts", "python3*",
            "terminfo"],
        description="entries of /etc kernels see, read-only (comma-separated, globs)")

    @field_validator("agent_rootfs_binds", "agent_rootfs_etc", mode="before")
    @classmethod
    def _sandbox_lists(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    # --- operations: logs, metrics, CORS (issue 12) ------------------------
    log_format: Literal["text", "json"] = Field(
        default="text", description="log lines as plain text or as one JSON object per line")
    metrics_enabled: bool = Field(
        default=True, description="serve Prometheus metrics on GET /metrics")
    metrics_addr: str | None = Field(
        default=None, description="host:port to serve /metrics on instead of the API port")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated browser origins allowed to call the API (CORS)")

    @field_validator("agent_max_mem", "agent_max_file_size", "agent_max_output",
                     "max_upload_size", "max_request_body", "max_upload_total",
                     "auth_body_budget", "agent_disk_quota", "agent_tmp_size",
                     "agent_shm_size", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> int:
        return parse_size(value)

    @field_validator("agent_managers", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    raise ValueError("expected a JSON list or comma-separated addresses") from None
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

    @field_validator("db_url")
    @classmethod
    def _db_url(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_scheme(value, DB_SCHEMES, "postgresql://user:password@host:5432/sorna")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_scheme(value, REDIS_SCHEMES, "redis://host:6379")

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            scheme, sep, host = origin.partition("://")
            if origin != "*" and (scheme not in ("http", "https") or not sep or not host
                                  or "/" in host):
                raise ValueError(f"expected origins such as https://app.example, got {origin!r}")
        return value

    @field_validator("db_addr", "redis_addr", "metrics_addr")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected host:port, got {value!r}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    # --- derived values ----------------------------------------------------
    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL in use: explicit URL, historic parts, or embedded SQLite."""
        if self.db_url is not None:
            return self.db_url.get_secret_value()
        if self.db_addr:
            password = self.db_password.get_secret_value() if self.db_password else ""
            auth = quote(self.db_user, safe="")
            if password:
                auth += ":" + quote(password, safe="")
            return f"postgresql://{auth}@{self.db_addr}/{self.db_name}"
        return f"sqlite:///{self.data_dir.resolve() / 'sorna.db'}"

    @property
    def uses_embedded_db(self) -> bool:
        return self.db_url is None and not self.db_addr

    @property
    def explicit_redis_url(self) -> str | None:
        """The configured Redis URL, or None when the embedded Redis should be used."""
        if self.redis_url is not None:
            return self.redis_url.get_secret_value()
        if self.redis_addr:
            return f"redis://{self.redis_addr}"
        return None

    @property
    def embedded_redis_socket(self) -> Path:
        return self.data_dir.resolve() / "redis.sock"

    @property
    def http_port(self) -> int:
        if self.service_port:
            return self.service_port
        return 8443 if self.ssl_cert else 8080

    @property
    def agent_bind_addr(self) -> str:
        return self.agent_rpc_addr or f"tcp://127.0.0.1:{self.agent_port}"


_SECRET_NAMES = ("password", "_url", "secret", "_key")


def _origin_of(name: str, overrides: dict[str, Any], toml_path: Path | None) -> str:
    """Say where the winning value of setting `name` came from (flag > env > file)."""
    if name in overrides:
        return "from the command line"
    env_name = f"SORNA_{name.upper()}"
    if any(key.upper() == env_name and value for key, value in os.environ.items()):
        return f"from environment {env_name}"
    if toml_path is not None:
        return f"from {toml_path}"
    return "default"


def _format_validation_error(exc: ValidationError, overrides: dict[str, Any],
                             toml_path: Path | None) -> str:
    first = exc.errors()[0]
    name = ".".join(str(part) for part in first["loc"][:1]) or "config"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown setting {name!r} in {toml_path or 'the given settings'}"
    value = first.get("input")
    secret = name.endswith(_SECRET_NAMES) or isinstance(value, (dict, list))
    shown = "" if secret else f" (got {value!r})"
    return f"invalid setting {name} ({_origin_of(name, overrides, toml_path)}): {message}{shown}"


def load_config(config_file: str | os.PathLike | None = None, **overrides: Any) -> SornaConfig:
    """Build the settings object once per process.

    `config_file` (or `SORNA_CONFIG`) names a TOML file; without either,
    `./sorna.toml` is read when present.  `overrides` are flag values; `None`
    means "not given on the command line".
    """
    explicit = config_file or os.environ.get("SORNA_CONFIG")
    path = Path(explicit) if explicit else Path(DEFAULT_CONFIG_FILE)
    if explicit and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.is_file():
        try:
            with path.open("rb") as fh:
                tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
    given = {key: value for key, value in overrides.items() if value is not None}
    settings_cls: type[SornaConfig] = SornaConfig
    if path.is_file():
        settings_cls = type(
            "SornaConfig",
            (SornaConfig,),
            {"model_config": {**SornaConfig.model_config, "toml_file": path}},
        )
    try:
        config = settings_cls(**given)
    except ValidationError as exc:
        toml_path = path if path.is_file() else None
        raise ConfigError(_format_validation_error(exc, given, toml_path)) from None
    except SettingsError as exc:  # a value the source could not even parse
        raise ConfigError(str(exc).splitlines()[0]) from None
    if (config.ssl_cert is None) != (config.ssl_key is None):
        raise ConfigError("invalid setting ssl_cert/ssl_key: give both or neither")
    if (config.gateway_key is None) != (config.agent_keys is None):
        raise ConfigError("invalid setting gateway_key/agent_keys: give both or neither")
    if (config.agent_key is None) != (config.gateway_keys is None):
        raise ConfigError("invalid setting agent_key/gateway_keys: give both or neither")
    return config
