"""Authenticating peers on other hosts: CURVE (libzmq's public-key encryption) plus a ZAP gate.

Off by default: on one host everything binds to loopback. With keys, the broker is the trust
anchor. It admits clients and daemons whose public keys are in its authorized set; it tells each
daemon the public key of the client that owns a runtime (``owner_key`` in create_runtime) and
each client the daemon's public key (``daemon_key`` in the create reply). The daemon's control
socket is then encrypted and admits only the clients that own runtimes on it.

Body pipes are guarded with or without keys (``Gate.serve_pipe``, ``pipe_client``): each pipe the
daemon binds has a ZAP domain of its own that admits exactly its owner, before any message moves:
with CURVE the runtime owner's key, without it a PLAIN password that is the stream id (16 random
bytes that only the daemon, the broker and the owner know). A daemon therefore runs a gate even
without keys.

Keys are the certificate files ``zmq.auth.create_certificates`` writes: ``NAME.key`` (public)
and ``NAME.key_secret`` (both halves). ``python -m wire.auth DIR NAME`` makes a pair; the secret
file is created with mode 0600 before a key is written into it.
"""

from __future__ import annotations

import hmac
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


#: ZAP domains of pipe sockets start with this; the rest names the one peer the pipe admits.
PIPE_DOMAIN = "pipe:"
#: The PLAIN user name a client presents to a pipe (the password is the stream id, in hex).
PIPE_USER = b"pipe"


class _Authenticator(AsyncioAuthenticator):
    """pyzmq's ZAP handler, plus the PLAIN check of pipe domains: the password must be the secret
    the domain was made with (the socket's own domain: a peer cannot choose it)."""

    def _authenticate_plain(self, domain: str, username: str, password: str) -> tuple[bool, bytes]:
        if domain.startswith(PIPE_DOMAIN):
            ok = hmac.compare_digest(password.encode(), domain[len(PIPE_DOMAIN) :].encode())
            return ok, b"OK" if ok else b"not this pipe's owner"
        return super()._authenticate_plain(domain, username, password)


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

    def __init__(self, ctx: zmq.asyncio.Context, keys: KeyPair | None, allowed: set[bytes] | None = None) -> None:
        self.keys = keys
        self.allowed: dict[bytes, int] = dict.fromkeys(allowed or (), 1)
        self.domains: dict[str, set[bytes]] = {}
        self._ctx_id = id(ctx)
        self._users = 1
        self._auth = _Authenticator(ctx)
        self._auth.start()
        self._auth.configure_curve_callback("*", self)

    @classmethod
    def for_context(cls, ctx: zmq.asyncio.Context, keys: KeyPair | None, allowed: set[bytes] | None = None) -> Gate:
        """The gate of ``ctx``, made on first use; without ``keys`` it guards pipes only."""
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
        if domain.startswith(PIPE_DOMAIN):
            return hmac.compare_digest(key, domain[len(PIPE_DOMAIN) :].encode())
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
        assert self.keys is not None, "a gate without keys serves pipes only"
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True
        if domain is not None:
            self.domains[domain] = set(keys or ())
            self._auth.configure_curve_callback(domain, self)  # pyzmq looks providers up by domain
            sock.zap_domain = domain.encode()

    def serve_pipe(self, sock: zmq.Socket, sid: bytes, owner_key: bytes | None) -> None:
        """Make ``sock``, a pipe of stream ``sid`` (call before bind), admit its owner and nobody else:
        with keys, a CURVE client with the runtime owner's key ``owner_key`` (none if it is None);
        without, a PLAIN client whose password is ``sid`` (``pipe_client``). A refused peer never
        completes the handshake, so a PUSH never counts it among the peers it sends to."""
        if self.keys is not None:
            domain = PIPE_DOMAIN + (owner_key or b"").decode()
            sock.curve_secretkey = self.keys.secret
            sock.curve_publickey = self.keys.public
            sock.curve_server = True
            if domain not in self._auth.credentials_providers:  # one entry per owner key
                self._auth.configure_curve_callback(domain, self)
        else:
            domain = PIPE_DOMAIN + sid.hex()
            sock.plain_server = True
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


def pipe_client(sock: zmq.Socket, sid: bytes, keys: KeyPair | None, server_key: bytes | None) -> None:
    """Make ``sock`` able to connect to the daemon's pipe of stream ``sid`` (call before connect):
    a CURVE client of ``server_key`` if the daemon has one, else a PLAIN client proving ``sid``."""
    if keys is not None and server_key is not None:
        connect_with(sock, keys, server_key)
    else:
        sock.plain_username = PIPE_USER
        sock.plain_password = sid.hex().encode()


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
