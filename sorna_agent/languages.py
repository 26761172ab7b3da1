"""The language catalogue (`languages.toml`): what each kernel language runs."""
from __future__ import annotations

import os
import shutil
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sorna_server.config import parse_size

CATALOGUE_FILE = Path(__file__).with_name("languages.toml")
RUNNER_KINDS = ("python", "shell")


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
    limits: dict[str, Any] = field(default_factory=dict)

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


def world_searchable(directory: Path) -> bool:
    """True when other users can reach `directory` (it and all its parents o+x)."""
    real = Path(os.path.realpath(directory))
    for path in (real, *real.parents):
        try:
            if not path.stat().st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _pick_interpreter(candidates: list[str], for_other_users: bool) -> str | None:
    for candidate in candidates:
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if not path or not os.access(path, os.X_OK):
            continue
        if for_other_users and not world_usable(path):
            continue
        return path
    return None


def _expand(words: list[str], python: str) -> list[str]:
    return [word.replace("{python}", python) for word in words]


def load_catalogue(path: Path = CATALOGUE_FILE, *, for_other_users: bool = False
                   ) -> dict[str, Language]:
    """Read the catalogue; languages whose interpreter is missing are left out."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CatalogueError(f"cannot read language catalogue {path}: {exc}") from None
    languages: dict[str, Language] = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise CatalogueError(f"language {name!r}: expected a table")
        kind = entry.get("kind", "python")
        if kind not in RUNNER_KINDS:
            raise CatalogueError(f"language {name!r}: unknown kind {kind!r}")
        python = _pick_interpreter(list(entry.get("interpreters", ["python3"])), for_other_users)
        if python is None:
            continue
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
            limits=limits,
        )
    return languages
