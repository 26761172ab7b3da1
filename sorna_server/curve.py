"""CurveZMQ keys and sockets for the agent protocol (DESIGN section 10).

Every socket between gateways and agents is a CURVE socket when keys are
configured: the binding side is the CURVE server and checks the connecting
side's public key through pyzmq's ZAP authenticator; the connecting side
names the server's public key.  Key files are pyzmq's certificate files:
`NAME.key` (public) and `NAME.key_secret` (public and secret, mode 0600).

Without keys, sockets are plain and the commands refuse to bind anything but
loopback (`require_loopback`).  This module is a leaf: the agent imports it.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

ZAP_DOMAIN = "sorna"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
RELOAD_INTERVAL = 2.0   # seconds between re-reads of a folder of allowed keys
REFUSAL_LOG_INTERVAL = 10.0  # at most one "refused" line per socket per interval
# refusals by ZAP (unknown keys) are logged by the KeyRing, with the key
HANDSHAKE_FAILURES = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL


class CurveKeyError(Exception):
    """A key file is missing or unreadable; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    public: bytes   # z85, 40 characters
    secret: bytes

    @property
    def public_text(self) -> str:
        return self.public.decode("ascii")


def generate(path: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new keypair: `PATH.key_secret` (0600) and `PATH.key` beside it.

    `path` may be given with or without either suffix."""
    base = key_base(path)
    public_file = base.with_name(base.name + PUBLIC_SUFFIX)
    secret_file = base.with_name(base.name + SECRET_SUFFIX)
    if not overwrite:
        for existing in (public_file, secret_file):
            if existing.exists():
                raise CurveKeyError(f"{existing} exists already (choose another name)")
    base.parent.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    _write(secret_file, _certificate(public, secret), 0o600)
    _write(public_file, _certificate(public, None), 0o644)
    return public_file, secret_file


def key_base(path: Path) -> Path:
    """PATH without a `.key` / `.key_secret` suffix."""
    name = path.name
    for suffix in (SECRET_SUFFIX, PUBLIC_SUFFIX):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)])
    return path


def _certificate(public: bytes, secret: bytes | None) -> str:
    """pyzmq's certificate format (ZPL), so `zmq.auth.load_certificate` reads it."""
    lines = ["#   ZeroMQ CURVE certificate written by `sorna keys generate`",
             "#   " + ("SECRET: keep this file private (mode 0600)" if secret
                      else "public key: give it to the peers that must accept this key"),
             "metadata", "curve", f'    public-key = "{public.decode("ascii")}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), mode)
        fh.write(text)
    os.replace(tmp, path)


def load_keypair(path: Path, setting: str) -> KeyPair:
    """Read a secret key file (`NAME.key_secret`; the bare NAME is accepted too)."""
    candidates = [path] if path.name.endswith(SECRET_SUFFIX) else \
        [path.with_name(path.name + SECRET_SUFFIX), path]
    for candidate in candidates:
        if candidate.is_file():
            public, secret = _read(candidate, setting)
            if secret is None:
                raise CurveKeyError(f"invalid setting {setting}: {candidate} holds no secret key "
                                    f"(name the {SECRET_SUFFIX} file of `sorna keys generate`)")
            _check_private(candidate, setting)
            return KeyPair(public, secret)
    raise CurveKeyError(f"invalid setting {setting}: no key file {candidates[0]} "
                        f"(make one with `sorna keys generate`)")


def _check_private(path: Path, setting: str) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CurveKeyError(f"invalid setting {setting}: {path} is readable by others "
                            f"(mode {mode:o}); run chmod 600 {path}")


def _read(path: Path, setting: str) -> tuple[bytes, bytes | None]:
    from zmq.auth.certs import load_certificate
    try:
        public, secret = load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"invalid setting {setting}: cannot read key file {path}: {exc}") \
            from None
    if public is None or len(public) != 40:
        raise CurveKeyError(f"invalid setting {setting}: {path} holds no CURVE public key")
    return public, secret


def load_public_keys(path: Path, setting: str) -> frozenset[bytes]:
    """Public keys (z85) from a `.key` file, or from every `*.key` file of a folder.

    A folder may be empty (nothing is accepted until keys appear in it)."""
    if path.is_dir():
        files: Iterable[Path] = sorted(path.glob("*" + PUBLIC_SUFFIX))
    elif path.is_file():
        files = [path]
    elif path.with_name(path.name + PUBLIC_SUFFIX).is_file():
        files = [path.with_name(path.name + PUBLIC_SUFFIX)]
    else:
        raise CurveKeyError(f"invalid setting {setting}: {path} is neither a key file nor a folder "
                            f"of them")
    return frozenset(_read(file, setting)[0] for file in files)


class KeyRing:
    """The public keys a CURVE server accepts: a file or folder, re-read every
    few seconds so that keys can be added and removed without a restart."""

    def __init__(self, path: Path, setting: str, what: str):
        self.path = path
        self.setting = setting
        self.what = what
        self._stamp = self._changed_at()
        self.keys = load_public_keys(path, setting)
        self._loaded_at = time.monotonic()
        self.refusals = RefusalLog(f"unknown {what} key")

    def _changed_at(self) -> int | None:
        """The modification time of the file or folder (a folder's changes when a
        key file is added or removed)."""
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def current(self, *, recheck: bool = False) -> frozenset[bytes]:
        """The accepted keys, re-read every RELOAD_INTERVAL; with `recheck`, also at
        once when the file or folder changed since the last read."""
        now = time.monotonic()
        stamp = self._changed_at() if recheck else self._stamp
        if now - self._loaded_at >= RELOAD_INTERVAL or stamp != self._stamp:
            self._loaded_at = now
            self._stamp = stamp if recheck else self._changed_at()
            try:
                keys = load_public_keys(self.path, self.setting)
            except CurveKeyError as exc:  # keep the last good set while a file is being edited
                log.warning("%s; keeping the %d keys read before", exc, len(self.keys))
            else:
                if keys != self.keys:
                    log.info("%s keys from %s: %d (was %d)", self.what, self.path, len(keys),
                             len(self.keys))
                self.keys = keys
        return self.keys

    def allows(self, key: bytes | str | None) -> bool:
        if isinstance(key, str):
            key = key.encode("ascii", "replace")
        # an unknown key rechecks the folder: a key added just before its agent
        # starts is accepted at once (refusing it would make that agent exit)
        return key is not None and (key in self.current() or key in self.current(recheck=True))

    # pyzmq's ZAP handler calls this for every CURVE handshake (key in z85)
    def callback(self, domain: str, key: bytes) -> bool:
        if self.allows(key):
            return True
        self.refusals.note(f"refused a CURVE peer with an unknown {self.what} key "
                           f"{key.decode('ascii', 'replace')}")
        return False


class RefusalLog:
    """Rate-limited warnings about refused peers (one line per interval, with a count)."""

    def __init__(self, what: str, interval: float = REFUSAL_LOG_INTERVAL):
        self.what = what
        self.interval = interval
        self.count = 0
        self._unlogged = 0
        self._last = -interval

    def note(self, message: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last < self.interval:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more refused since the last report)" if self._unlogged else ""
        log.warning("%s%s", message, more)
        self._last, self._unlogged = now, 0


def start_authenticator(ctx: zmq.asyncio.Context, ring: KeyRing) -> AsyncioAuthenticator:
    """ZAP for every CURVE server socket of `ctx`: accept the keys of `ring`."""
    auth = AsyncioAuthenticator(ctx, log=logging.getLogger("sorna.zap"))
    auth.start()
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=ring)
    return auth


def make_server(sock: zmq.Socket[Any], keys: KeyPair | None) -> None:
    """Make `sock` (before bind) a CURVE server with `keys`; plain when None."""
    if keys is None:
        return
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)


def make_client(sock: zmq.Socket[Any], keys: KeyPair | None, server_key: bytes | None) -> None:
    """Make `sock` (before connect) a CURVE client of the server with `server_key`."""
    if keys is None or server_key is None:
        return
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)


def peer_key(frame: zmq.Frame) -> str | None:
    """The CURVE public key (z85) of the peer that sent `frame` (None on plain sockets)."""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return user if isinstance(user, str) and len(user) == 40 else None


def is_z85_key(text: str) -> bool:
    try:
        return len(text) == 40 and len(z85.decode(text.encode("ascii"))) == 32
    except (ValueError, UnicodeEncodeError):
        return False


class HandshakeWatch:
    """Log (rate-limited) the peers a server socket refused at the handshake:
    plain peers, peers that speak another mechanism, and keys ZAP turned down."""

    def __init__(self, sock: zmq.asyncio.Socket, what: str):
        self.monitor = sock.get_monitor_socket(HANDSHAKE_FAILURES)
        self.refusals = RefusalLog(what)
        self.what = what

    async def run(self) -> None:
        while True:
            try:
                frames = await self.monitor.recv_multipart()
            except zmq.ZMQError:
                return
            event = parse_monitor_message(frames)
            self.refusals.note(f"refused a peer on {self.what} ({event['endpoint'].decode()}): "
                               f"CURVE handshake failed ({_failure(event)})")

    def close(self) -> None:
        self.monitor.close(linger=0)


def _failure(event: Any) -> str:
    if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return "plain or malformed peer"
    return "plain peer or wrong server key"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_side(secret: Path | None, secret_setting: str, peers: Path | None, peers_setting: str,
              *, peer: str, port: str, host: str) -> tuple[KeyPair, KeyRing] | None:
    """One side's keys: its keypair and the ring of `peer` keys it admits; None
    without keys, when the `port` it binds on `host` must then be loopback."""
    if secret is not None and peers is not None:
        return load_keypair(secret, secret_setting), KeyRing(peers, peers_setting, peer)
    require_loopback(port, host, f"{secret_setting} and {peers_setting}")
    return None


def require_loopback(what: str, host: str, settings: str) -> None:
    """Without keys, refuse a non-loopback bind with one line saying what to set."""
    if not is_loopback(host):
        raise CurveKeyError(f"{what} would listen on {host} without CurveZMQ keys: set {settings} "
                            f"(make keys with `sorna keys generate`), or listen on 127.0.0.1")
