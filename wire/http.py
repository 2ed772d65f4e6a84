"""HTTP heads and outbound addresses checked: pure functions the daemon and the client share.

A guest can forge whatever its bootstrap reads from a Request or Response (by patching
``Headers.prototype[Symbol.iterator]``, a getter, ...), so every head that comes from a guest is
checked again outside it, in the daemon (the guest's fetch is refused, its dispatch fails) and in
the client (before a header reaches a callback, an upstream socket or an end client):

- a method and a header name are RFC 9110 tokens (no spaces, so no ``Transfer-Encoding : chunked``);
- a header value has no NUL, CR or LF and no leading or trailing space or tab (the fetch
  standard's definition of a header value: what a real ``Headers`` object can hold);
- a URL and a status text hold no control characters (a request line or status line cannot be
  split).

``FetchPolicy`` decides which upstreams ``client.forward_fetch`` may reach: by default only public
unicast addresses, never a cloud metadata service; allow-lists for hosts, schemes and ports. The
client applies it to every URL (each redirect hop) and to the address it actually connects to.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00\r\n]|^[ \t]|[ \t]$")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_STATUS_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

#: Methods the fetch standard forbids: no upstream is asked to tunnel or echo for a guest.
FORBIDDEN_METHODS = frozenset({"CONNECT", "TRACE", "TRACK"})


class HeadError(ValueError):
    """A request or response head that must not reach a socket (the message says which part)."""


def _show(text: str) -> str:
    return repr(text[:80] + ("…" if len(text) > 80 else ""))


def is_token(text: object) -> bool:
    """Whether ``text`` is an RFC 9110 token (a method, a header name)."""
    return isinstance(text, str) and _TOKEN.fullmatch(text) is not None


def check_method(method: object) -> str:
    if not is_token(method):
        raise HeadError(f"invalid method {_show(str(method))}: not an RFC 9110 token")
    assert isinstance(method, str)
    return method


def check_url(url: object) -> str:
    """A URL with no whitespace or control characters (a serialized URL percent-encodes them)."""
    if not isinstance(url, str) or not url or _CONTROL.search(url):
        raise HeadError(f"invalid URL {_show(str(url))}: empty, or holds whitespace or control characters")
    return url


def check_status_text(text: object) -> str:
    """An RFC 9112 reason phrase: tab, space and visible characters only."""
    if not isinstance(text, str) or _STATUS_CONTROL.search(text):
        raise HeadError(f"invalid status text {_show(str(text))}: holds control characters")
    return text


def check_header(name: object, value: object) -> None:
    if not is_token(name):
        raise HeadError(f"invalid header name {_show(str(name))}: not an RFC 9110 token")
    if not isinstance(value, str) or _BAD_VALUE.search(value):
        raise HeadError(
            f"invalid header value for {name}: {_show(str(value))} holds NUL, CR or LF, "
            "or starts or ends with whitespace"
        )


def valid_header(name: object, value: object) -> bool:
    return is_token(name) and isinstance(value, str) and _BAD_VALUE.search(value) is None


def valid_status_text(text: str) -> str:
    """``text`` if it is a valid reason phrase, else "" (for what an upstream server sent)."""
    return "" if _STATUS_CONTROL.search(text) else text


def check_headers(pairs: Iterable[tuple[object, object]]) -> None:
    for name, value in pairs:
        check_header(name, value)


def check_request_head(method: object, url: object, headers: Iterable[tuple[object, object]]) -> None:
    check_method(method)
    check_url(url)
    check_headers(headers)


def check_response_head(status_text: object, headers: Iterable[tuple[object, object]]) -> None:
    check_status_text(status_text)
    check_headers(headers)


# ---- outbound addresses ---------------------------------------------------------------------------

#: Cloud metadata services (AWS, ECS, GCP, Azure, Alibaba, Oracle, OpenStack...): denied even with
#: ``allow_private=True``; only an explicit ``allow_private=["169.254.169.254"]`` entry reaches one.
METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.169.253", "169.254.170.2", "169.254.170.23", "fd00:ec2::254",
              "fd00:ec2::23", "100.100.100.200", "168.63.129.16", "192.0.0.192")
)  # fmt: skip
#: Prefix of NAT64 addresses (RFC 6052): the IPv4 address they carry is the one checked.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def embedded_v4(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one stands for (mapped, NAT64, 6to4, Teredo), else ``ip``."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip.teredo is not None:
            return ip.teredo[1]
    return ip


def address_class(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address ("loopback", "private", ..., "cloud metadata"),
    or None when it is one."""
    for a in dict.fromkeys((embedded_v4(ip), ip)):
        if a in METADATA:
            return "cloud metadata"
        if a.is_loopback:
            return "loopback"
        if a.is_link_local:
            return "link-local"
        if a.is_multicast:
            return "multicast"
        if a.is_unspecified:
            return "unspecified"
        if a.is_private:
            return "private"
        if a.is_reserved or not a.is_global:
            return "reserved"
    return None


class FetchDenied(OSError):
    """forward_fetch refused an upstream; the message names the rule (an OSError so that aiohttp's
    connector passes it through a resolver or socket factory unchanged, as the cause)."""


def _parse_host_port(entry: str) -> tuple[str, int | None]:
    """ "host", "host:port", "[v6]", "[v6]:port", a bare IPv6 address or a CIDR network."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port)
    return entry, None


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def parse_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return None


@dataclass(frozen=True)
class FetchPolicy:
    """Which upstreams a guest's fetch may reach.

    ``allow_private``: False (only public unicast addresses), True (any address but a cloud
    metadata service), or entries ``"IP"``, ``"IP:port"``, ``"[v6]:port"``, ``"CIDR"`` naming the
    non-public addresses (metadata ones included) that are allowed besides the public ones.
    ``allow_hosts``: None (any) or host names (``"api.example.com"``, ``"*.example.com"`` for its
    subdomains), IP addresses and CIDR networks a URL's host must match. ``allow_schemes`` and
    ``allow_ports`` (None: any) restrict the URL too.
    """

    allow_private: bool = False
    private_entries: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None], ...] = ()
    allow_hosts: frozenset[str] | None = None
    allow_schemes: frozenset[str] = field(default_factory=lambda: frozenset({"http", "https"}))
    allow_ports: frozenset[int] | None = None

    @classmethod
    def make(
        cls,
        allow_private: bool | Iterable[str] = False,
        allow_hosts: Iterable[str] | None = None,
        allow_schemes: Iterable[str] = ("http", "https"),
        allow_ports: Iterable[int] | None = None,
    ) -> FetchPolicy:
        entries = []
        if not isinstance(allow_private, bool):
            if isinstance(allow_private, str):
                raise TypeError("allow_private takes True, False or a list of addresses, not a string")
            for entry in allow_private:
                host, port = _parse_host_port(entry)
                net = _network(host)
                if net is None:
                    raise ValueError(f"allow_private entry {entry!r} is not an IP address or network")
                entries.append((net, port))
        hosts = None
        if allow_hosts is not None:
            if isinstance(allow_hosts, str):
                raise TypeError("allow_hosts takes a list of hosts, not a string")
            hosts = frozenset(h.lower().rstrip(".") for h in allow_hosts)
        return cls(
            allow_private=allow_private is True,
            private_entries=tuple(entries),
            allow_hosts=hosts,
            allow_schemes=frozenset(s.lower() for s in allow_schemes),
            allow_ports=None if allow_ports is None else frozenset(int(p) for p in allow_ports),
        )

    def check_url(self, scheme: str, host: str, port: int | None) -> None:
        """Refuse a URL (each redirect hop's) by its scheme, host and port; an IP literal host is
        checked as an address too. A name's addresses are checked when it resolves."""
        scheme, host = scheme.lower(), host.lower().rstrip(".")
        if scheme not in self.allow_schemes:
            allowed = ", ".join(sorted(self.allow_schemes))
            raise FetchDenied(f"fetch denied: scheme {scheme!r} is not allowed (allowed: {allowed})")
        if self.allow_hosts is not None and not self._host_allowed(host):
            raise FetchDenied(f"fetch denied: host {host!r} is not in the allow-list")
        if self.allow_ports is not None and port not in self.allow_ports:
            raise FetchDenied(f"fetch denied: port {port} is not in the allow-list")
        ip = parse_ip(host)
        if ip is not None and port is not None:
            self.check_address(ip, port)

    def _host_allowed(self, host: str) -> bool:
        if host in self.allow_hosts:  # type: ignore[operator]
            return True
        ip = parse_ip(host)
        for entry in self.allow_hosts or ():
            if entry.startswith("*.") and host.endswith(entry[1:]):
                return True
            if ip is not None and "/" in entry and (net := _network(entry)) is not None and ip in net:
                return True
            if ip is not None and parse_ip(entry) == ip:
                return True
        return False

    def address_denied(self, ip: IPAddress, port: int) -> str | None:
        """Why connecting to ``ip``:``port`` is refused (a sentence naming the rule), or None."""
        why = address_class(ip)
        if why is None:
            return None
        for net, p in self.private_entries:
            if (p is None or p == port) and any(a in net for a in (ip, embedded_v4(ip)) if a.version == net.version):
                return None
        if self.allow_private and why != "cloud metadata":
            return None
        if why == "cloud metadata":
            return f"fetch denied: {ip} is a cloud metadata address (list it in allow_private to reach it)"
        return (
            f"fetch denied: {ip} is a {why} address; forward_fetch reaches only public addresses unless "
            "allow_private allows it"
        )

    def check_address(self, ip: IPAddress, port: int) -> None:
        why = self.address_denied(ip, port)
        if why is not None:
            raise FetchDenied(why)
