"""Kernel working folders: creation, removal, and uploads that never follow a symlink."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def make_workdir(scratch: Path, name: str, uid: int | None) -> Path:
    path = scratch / name
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if uid is not None:
        os.chown(path, uid, uid)
    return path


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def safe_upload_path(workdir: Path, name: str) -> Path | None:
    """Resolve an upload name inside `workdir`; None for escapes and odd names."""
    if not name or "\x00" in name or name.startswith("/") or "\\" in name:
        return None
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    target = workdir.joinpath(*parts)
    try:
        target.resolve(strict=False).relative_to(workdir.resolve())
    except ValueError:
        return None
    return target


def write_upload(workdir: Path, name: str, data: bytes, uid: int | None, max_size: int) -> int:
    """Write an uploaded file below `workdir` without following any symlink the
    kernel may have planted; directories are created as needed. Blocking."""
    target = safe_upload_path(workdir, name)
    if target is None:
        raise ValueError(f"refused file name {name!r}")
    if len(data) > max_size:
        raise ValueError(f"file of {len(data)} bytes exceeds the limit of {max_size}")
    parts = name.split("/")
    dir_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, 0o755, dir_fd=dir_fd)
                if uid is not None:
                    os.chown(part, uid, uid, dir_fd=dir_fd, follow_symlinks=False)
            except FileExistsError:
                pass
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644,
                     dir_fd=dir_fd)
        try:
            if uid is not None:
                os.fchown(fd, uid, uid)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)
    return len(data)
