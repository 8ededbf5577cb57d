"""Where a webhook may go: public addresses only, unless the host or its network is allowlisted.

One rule for both checks: the API's at submission (`api/webhook_targets.py`) and the worker's at delivery
(`worker/webhooks.py`), which resolves the name again since what it points to may have changed. A literal address
is checked as it is; a name by every address it resolves to. Loopback, private, link-local, shared, reserved,
multicast and unspecified addresses (127.0.0.1, ::1, 10/8, 172.16/12, 192.168/16, 169.254/16, fc00::/7, 0.0.0.0,
...) are refused unless `ATELIER_WEBHOOK_ALLOW_PRIVATE` names the host or a network holding the address.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str], Iterable[str]]


class TargetRefused(ValueError):
    """The callback URL's host is, or resolves to, an address webhooks may not reach."""


class TargetUnresolved(ValueError):
    """The callback URL's host name does not resolve (at delivery this may pass: it is retried)."""


@dataclass(frozen=True)
class Allowlist:
    """Hosts and networks webhooks may reach although they are not public."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Allowlist:
        """`ATELIER_WEBHOOK_ALLOW_PRIVATE`: comma-separated host names, addresses and CIDRs."""
        hosts: set[str] = set()
        networks: list[Network] = []
        for entry in (part.strip() for part in text.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                hosts.add(_normal(entry))
        return cls(frozenset(hosts), tuple(networks))

    def admits(self, address: Address) -> bool:
        return any(address in network for network in self.networks)


def public(address: Address) -> bool:
    """Whether `address` is on the public internet (an IPv4-mapped IPv6 address is judged as its IPv4 one)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def resolve(host: str) -> list[str]:
    """The addresses `host` resolves to (socket.getaddrinfo); raises OSError when it does not resolve."""
    return [str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]


def check_target(url: str, allow: Allowlist, resolver: Resolver = resolve) -> None:
    """Raise TargetRefused unless every address of the URL's host is public or allowlisted (or the host itself is);
    TargetUnresolved when the name resolves to nothing."""
    host = _normal(urlsplit(url).hostname or "")
    if not host:
        raise TargetRefused("the URL has no host")
    if host in allow.hosts:
        return
    literal = _literal(host)
    for address in [literal] if literal is not None else _resolved(host, resolver):
        if not public(address) and not allow.admits(address):
            where = "" if literal is not None else f" resolves to {address}, which"
            raise TargetRefused(f"host {host!r}{where} is not a public address (webhooks go to public addresses only)")


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _resolved(host: str, resolver: Resolver) -> list[Address]:
    """What the name resolves to (never empty)."""
    try:
        addresses = [ipaddress.ip_address(found) for found in resolver(host)]
    except (OSError, UnicodeError, ValueError):
        addresses = []
    if not addresses:
        raise TargetUnresolved(f"host {host!r} does not resolve")
    return addresses


def _normal(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()
