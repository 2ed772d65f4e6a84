"""Authenticating peers on other hosts: CURVE (libzmq's public-key encryption) plus a ZAP gate.

Off by default: on one host everything binds to loopback. With keys, the broker is the trust
anchor. It admits clients and daemons whose public keys are in its authorized set; it tells each
daemon the public key of the client that owns a runtime (``owner_key`` in create_runtime) and
each client the daemon's public key (``daemon_key`` in the create reply). The daemon's control
socket and body pipes are then encrypted and admit only the clients that own runtimes on it.

Keys are the certificate files ``zmq.auth.create_certificates`` writes: ``NAME.key`` (public)
and ``NAME.key_secret`` (both halves). ``python -m wire.auth DIR NAME`` makes a pair; the secret
file is created with mode 0600 before a key is written into it.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator


@dataclass(frozen=True, slots=True)
class KeyPair:
    public: bytes  # Z85, 40 bytes
    secret: bytes


def load_keypair(path: str | Path) -> KeyPair:
    public, secret = zmq.auth.load_certificate(str(path))
    if not secret:
        raise ValueError(f"{path} holds no secret key (use the .key_secret file)")
    return KeyPair(public, secret)


def load_public_key(path: str | Path) -> bytes:
    return zmq.auth.load_certificate(str(path))[0]


def load_authorized(path: str | Path) -> set[bytes]:
    """Public keys from a directory of certificate files (or one file)."""
    p = Path(path)
    if p.is_dir():
        return set(zmq.auth.load_certificates(str(p)))
    return {load_public_key(p)}


def user_key(frame: zmq.Frame) -> bytes | None:
    """The CURVE public key (Z85) the ZAP gate admitted the sender of ``frame`` with, if any."""
    try:
        uid = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        return None
    return uid.encode() if uid else None


class Gate:
    """The ZAP handler of one process: CURVE peers get in only if their public key is allowed.

    libzmq allows one ZAP handler per context, so a broker and its embedded daemon share one gate
    (``for_context``); both then serve the same key pair.
    """

    _by_context: dict[int, Gate] = {}

    def __init__(self, ctx: zmq.asyncio.Context, keys: KeyPair, allowed: set[bytes] | None = None) -> None:
        self.keys = keys
        self.allowed: dict[bytes, int] = dict.fromkeys(allowed or (), 1)
        self.domains: dict[str, set[bytes]] = {}
        self._ctx_id = id(ctx)
        self._users = 1
        self._auth = AsyncioAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve_callback("*", self)

    @classmethod
    def for_context(cls, ctx: zmq.asyncio.Context, keys: KeyPair, allowed: set[bytes] | None = None) -> Gate:
        gate = cls._by_context.get(id(ctx))
        if gate is None:
            gate = cls._by_context[id(ctx)] = cls(ctx, keys, allowed)
            return gate
        if gate.keys != keys:
            raise ValueError("one process serves one CURVE key pair")
        gate._users += 1
        for key in allowed or ():
            gate.allow(key)
        return gate

    def callback(self, domain: str, key: bytes) -> bool:
        """A socket served with a ZAP ``domain`` admits that domain's keys; others, ``allowed``."""
        if domain in self.domains:
            return key in self.domains[domain]
        return key in self.allowed

    def allow(self, key: bytes) -> None:
        self.allowed[key] = self.allowed.get(key, 0) + 1

    def revoke(self, key: bytes) -> None:
        """Undo one ``allow``; the key stays admitted while other grants remain."""
        n = self.allowed.get(key, 0) - 1
        if n > 0:
            self.allowed[key] = n
        else:
            self.allowed.pop(key, None)

    def serve(self, sock: zmq.Socket, domain: str | None = None, keys: set[bytes] | None = None) -> None:
        """Make ``sock`` a CURVE server whose peers pass this gate (call before bind); with a
        ``domain``, only ``keys`` get in through it."""
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True
        if domain is not None:
            self.domains[domain] = set(keys or ())
            self._auth.configure_curve_callback(domain, self)  # pyzmq looks providers up by domain
            sock.zap_domain = domain.encode()

    def stop(self) -> None:
        self._users -= 1
        if self._users == 0:
            self._by_context.pop(self._ctx_id, None)
            self._auth.stop()


def connect_with(sock: zmq.Socket, keys: KeyPair | None, server_key: bytes | None) -> None:
    """Make ``sock`` a CURVE client of ``server_key`` (call before connect); no-op without keys."""
    if keys is None or server_key is None:
        return
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_key


def write_keypair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``directory/NAME.key`` and ``NAME.key_secret``; the secret is readable by its owner
    only (created 0600 before the key goes in, so it is never readable by others, not even briefly)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / f"{name}.key_secret", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    finally:
        os.close(fd)
    public, secret = zmq.auth.create_certificates(d, name)  # truncates and rewrites: the mode stays
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def exposed(endpoints: Iterable[str]) -> list[str]:
    """The endpoints that are not loopback-only (``ipc://`` and ``inproc://`` are local)."""
    out = []
    for ep in endpoints:
        transport, _, addr = ep.partition("://")
        if transport in ("ipc", "inproc"):
            continue
        host = addr.rpartition(":")[0].strip("[]")
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            out.append(ep)
    return out


def exposure_warning(endpoints: Iterable[str], curve: bool) -> str | None:
    """The warning a CLI prints when it binds beyond loopback without CURVE, or None."""
    wide = exposed(endpoints)
    if curve or not wide:
        return None
    return (
        f"binding {', '.join(wide)} beyond loopback WITHOUT CURVE: anyone who can reach it can connect, "
        "unauthenticated and unencrypted; give --curve-keypair (see README, Running across hosts)"
    )


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m wire.auth DIR NAME   (writes DIR/NAME.key and DIR/NAME.key_secret, mode 0600)")
        return 2
    public, secret = write_keypair(argv[0], argv[1])
    print(f"public: {public}\nsecret: {secret}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
