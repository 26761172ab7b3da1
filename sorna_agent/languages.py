"""The language catalogue (`languages.toml`): what each kernel language runs."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sorna_server.config import parse_size

CATALOGUE_FILE = Path(__file__).with_name("languages.toml")
RUNNER_KINDS = ("python", "shell", "program")
TOOL_PATH = ("/usr/local/bin", "/usr/bin", "/bin")  # the PATH kernels get


class CatalogueError(Exception):
    pass


@dataclass(frozen=True)
class Language:
    name: str
    kind: str
    python: str                      # interpreter that runs the runner program
    interactive: list[str]
    shell: list[str] = field(default_factory=list)
    build: str = ""
    exec: str = ""
    query: str = ""                  # "program" kind: shell command building+running a query
    query_source: str = ""           # "program" kind: file name the query code is written to
    limits: dict[str, Any] = field(default_factory=dict)
    alias_of: str | None = None      # set on aliases: the language this name stands for

    @property
    def runtime(self) -> str:
        """The catalogue entry that really runs (itself, or what an alias stands for)."""
        return self.alias_of or self.name

    def batch_command(self, given: Any, default: str) -> str:
        """Resolve a batch option: None/"" = nothing, "*" = the default."""
        if given is None or given == "":
            return ""
        if not isinstance(given, str):
            raise ValueError("batch build/exec options must be strings")
        return default if given.strip() == "*" else given


def world_usable(path: str) -> bool:
    """True when an unprivileged user can execute `path` (every directory searchable)."""
    real = Path(os.path.realpath(path))
    try:
        mode = real.stat().st_mode
    except OSError:
        return False
    if not mode & stat.S_IXOTH:
        return False
    for parent in real.parents:
        try:
            if not parent.stat().st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def visible(path: str, folders: list[str] | None) -> bool:
    """True when `path` (symlinks resolved) lies in one of `folders` (None: anywhere)."""
    if folders is None:
        return True
    real = os.path.realpath(path)
    return any(real.startswith(os.path.realpath(folder).rstrip("/") + "/")
               for folder in folders)


def _pick_interpreter(candidates: list[str], for_other_users: bool,
                      visible_in: list[str] | None) -> str | None:
    for candidate in candidates:
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if not path or not os.access(path, os.X_OK):
            continue
        if (for_other_users and not world_usable(path)) or not visible(path, visible_in):
            continue
        return path
    return None


def _tools_present(tools: list[str], for_other_users: bool,
                   visible_in: list[str] | None) -> bool:
    """Every tool is on the kernels' PATH (and usable by other users when asked)."""
    for tool in tools:
        found = shutil.which(tool, path=os.pathsep.join(TOOL_PATH))
        if found is None or (for_other_users and not world_usable(found)) \
                or not visible(found, visible_in):
            return False
    return True


def _expand(words: list[str], python: str) -> list[str]:
    return [word.replace("{python}", python) for word in words]


def load_catalogue(  # noqa: C901  (one flat check per catalogue field)
        path: Path = CATALOGUE_FILE, *, for_other_users: bool = False,
        visible_in: list[str] | None = None) -> dict[str, Language]:
    """Read the catalogue; languages whose interpreter is missing are left out (and those
    outside `visible_in`, the folders kernels see, when given)."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CatalogueError(f"cannot read language catalogue {path}: {exc}") from None
    languages: dict[str, Language] = {}
    aliases: dict[str, str] = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise CatalogueError(f"language {name!r}: expected a table")
        if "alias_of" in entry:
            target = entry["alias_of"]
            if set(entry) != {"alias_of"}:
                raise CatalogueError(f"language {name!r}: an alias has only `alias_of`")
            if not isinstance(raw.get(target), dict) or "alias_of" in raw[target]:
                raise CatalogueError(f"language {name!r}: alias_of {target!r} is not a "
                                     "language of the catalogue")
            aliases[name] = target
            continue
        if not _tools_present(list(entry.get("requires", [])), for_other_users, visible_in):
            continue
        kind = entry.get("kind", "python")
        if kind not in RUNNER_KINDS:
            raise CatalogueError(f"language {name!r}: unknown kind {kind!r}")
        python = _pick_interpreter(list(entry.get("interpreters", ["python3"])), for_other_users,
                                   visible_in)
        if python is None:
            continue
        query_source = str(entry.get("query_source", ""))
        if "/" in query_source or query_source.startswith("."):
            raise CatalogueError(f"language {name!r}: query_source must be a plain file name")
        limits = dict(entry.get("limits", {}))
        if "max_mem" in limits:
            limits["max_mem"] = parse_size(limits["max_mem"])
        if "max_output" in limits:
            limits["max_output"] = parse_size(limits["max_output"])
        languages[name] = Language(
            name=name, kind=kind, python=python,
            interactive=_expand(list(entry.get("interactive", [])), python),
            shell=_expand(list(entry.get("shell", [])), python),
            build=str(entry.get("build", "")).replace("{python}", python),
            exec=str(entry.get("exec", "")).replace("{python}", python),
            query=str(entry.get("query", "")),
            query_source=query_source,
            limits=limits,
        )
    for name, target in aliases.items():
        if target in languages:  # left out with its target when that cannot run here
            languages[name] = replace(languages[target], name=name, alias_of=target)
    return languages


def runtime_versions(languages: dict[str, Language], timeout: float = 5.0) -> dict[str, str]:
    """The interpreter version of each python-kind language (one run per interpreter);
    languages whose version cannot be told are left out."""
    found: dict[str, str] = {}
    for python in sorted({lang.python for lang in languages.values() if lang.kind == "python"}):
        try:
            done = subprocess.run(
                [python, "-c", "import platform; print(platform.python_version())"],
                capture_output=True, text=True, timeout=timeout, check=True)
        except (OSError, subprocess.SubprocessError):
            continue
        found[python] = done.stdout.strip()[:32]
    return {name: found[lang.python] for name, lang in languages.items()
            if lang.kind == "python" and lang.python in found}
