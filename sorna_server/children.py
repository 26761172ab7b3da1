"""Helpers for the child processes the server starts (embedded Redis, local agent)."""
from __future__ import annotations

import contextlib
import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a freshly forked child: receive `sig` when the parent dies.

    Linux only (prctl); a no-op elsewhere.  Used as `preexec_fn`, so a server
    killed with SIGKILL does not leave its children running.
    """
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
