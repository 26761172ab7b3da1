"""The data directory: private to the server's user, and files private by default.

`prepare_data_dir(path)` sets the process umask to 077 (so the SQLite file and
its WAL, logs, the embedded Redis socket and keys are created 0600) and makes
the folder 0700, tightening an existing one of ours that others could enter.
`sorna serve`, `sorna agent` and the embedded Redis call it before they write
anything there.  A leaf module: it imports nothing of the server.
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077


def prepare_data_dir(path: Path) -> Path:
    """Umask 077 for this process, and `path` created 0700 (or tightened).  Returns it."""
    os.umask(PRIVATE_UMASK)
    path = path.resolve()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077:
        log.warning("data directory %s was open to other users (mode %o): made it 0700",
                    path, stat.S_IMODE(info.st_mode))
        path.chmod(0o700)
    return path
