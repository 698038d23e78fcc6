"""Which names the web server answers to: its defence against DNS rebinding.

A page on another site can point its own name at this machine (a second DNS answer of
127.0.0.1, or the machine's LAN address) and then, as far as the browser is concerned, talk to
this server from its own origin: upload photos, read the results. The request still carries the
attacker's name in its ``Host`` header, so the server answers only the names it is meant to be
reached by. An IP address typed into the address bar is never such a trick (rebinding needs a
name the attacker controls), so a server listening on every interface also answers any IP
literal.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Sequence

from ..int_settings import decimal_value

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (so nobody else can reach the server)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    """Whether listening on ``host`` means every interface."""
    return host in ("0.0.0.0", "::", "")


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
    except ValueError:
        return False
    return ":" not in name or name.startswith("[")  # a bare IPv6 address is not a Host header


def split_host(header: str) -> tuple[str, int] | None:
    """``Host`` header → (lower-case name, port; 80 when absent, as browsers leave out the
    scheme's default); None when it is malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, rest = header.partition("]")
        name += bracket
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else ""
    else:
        name, colon, port_text = header.partition(":")
        if colon and not port_text:
            return None
    port = decimal_value(port_text) if port_text else 80
    if not name or port is None:
        return None
    return (name, port) if 0 < port < 65536 else None


def _machine_names() -> set[str]:
    """The names this machine calls itself, which a LAN user may type."""
    names = set()
    for name in (socket.gethostname(), socket.getfqdn()):
        name = name.strip().lower().rstrip(".")
        if name:
            names |= {name, f"{name.split('.')[0]}.local"}
    return names


@dataclass(frozen=True)
class HostPolicy:
    """The names requests must be addressed to. Not the port: a reverse proxy or a container's
    port mapping puts its own port in the header, and the name alone is what tells a rebound
    name from this server's own."""

    names: frozenset[str]
    any_ip_literal: bool = False

    @classmethod
    def for_address(cls, host: str, extra: Sequence[str] = ()) -> "HostPolicy":
        """What a server bound to ``host`` answers: the address itself (and, for a loopback
        address, the loopback names); on every interface, also this machine's own names and any
        IP address; and the ``extra`` names the operator allows (``--allow-host``)."""
        names = {name.strip().lower().rstrip(".") for name in extra if name.strip()}
        if is_wildcard(host):
            return cls(frozenset(names | LOOPBACK_NAMES | _machine_names()), any_ip_literal=True)
        try:
            address = ipaddress.ip_address(host.strip("[]"))
            # As browsers write it: "2001:db8:0:0::1" is sent as "[2001:db8::1]".
            names.add(f"[{address.compressed}]" if address.version == 6 else address.compressed)
        except ValueError:
            names.add(host.lower())
        if is_loopback(host):
            names |= LOOPBACK_NAMES
        return cls(frozenset(names))

    def accepts(self, header: str) -> bool:
        """Whether a request with this ``Host`` header is addressed to this server."""
        parsed = split_host(header)
        if parsed is None:
            return False
        name = parsed[0]
        return name in self.names or (self.any_ip_literal and _is_ip_literal(name))
