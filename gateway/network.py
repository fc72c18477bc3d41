"""The client's IP address: the peer, or the right-most untrusted X-Forwarded-For hop behind trusted proxies.

``X-Forwarded-For`` is believed only as far as a chain of trusted proxies
vouches for it: everything left of the first untrusted hop is the caller's
own say and changes nothing. A hop the gateway must read and cannot is an
error, never a reason to fall back to another address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_PEER_CACHE_SIZE = 10_000


def parse_ip(text: str) -> IPAddress | None:
    """An address from a peer or XFF entry, or None for garbage.

    Accepts ``1.2.3.4:5678``, ``[2001:db8::1]:443`` and ``fe80::1%eth0``;
    IPv4-mapped IPv6 (``::ffff:1.2.3.4``) becomes the IPv4 address.
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not _is_port_suffix(text[end + 1 :], allow_empty=True):
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text, _, port = text.partition(":")
        if not _is_port_suffix(":" + port, allow_empty=False):
            return None
    text = text.split("%", 1)[0]  # the zone names a local interface: meaningless here
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port_suffix(suffix: str, *, allow_empty: bool) -> bool:
    if not suffix:
        return allow_empty
    port = suffix[1:]
    return suffix[0] == ":" and port.isascii() and port.isdigit() and len(port) <= 5


def normalise_ip(text: str) -> str | None:
    address = parse_ip(text)
    return None if address is None else str(address)


class TrustedProxies:
    """The proxies whose ``X-Forwarded-For`` the gateway believes."""

    def __init__(self, cidrs: Sequence[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)
        # raw peer string -> (normalised address or None, trusted); peers repeat, so this
        # makes the common case one dict lookup.
        self._peers: dict[str, tuple[str | None, bool]] = {}

    def __bool__(self) -> bool:
        return bool(self._networks)

    def contains(self, ip: str) -> bool:
        return self.classify_peer(ip)[1]

    def classify_peer(self, peer: str) -> tuple[str | None, bool]:
        """(normalised address, trusted) for a transport peer, cached."""
        found = self._peers.get(peer)
        if found is None:
            found = self.classify(peer)
            if len(self._peers) >= _PEER_CACHE_SIZE:
                self._peers.clear()  # bounded; a refill costs one parse per peer
            self._peers[peer] = found
        return found

    def classify(self, text: str) -> tuple[str | None, bool]:
        """(normalised address, trusted) without caching."""
        address = parse_ip(text)
        if address is None:
            return None, False
        return str(address), self.holds(address)

    def holds(self, address: IPAddress) -> bool:
        return any(address in network for network in self._networks)


class UnreadableHop(ValueError):
    """An ``X-Forwarded-For`` hop the gateway must read is not an IP address in canonical form."""


def parse_hop(text: str) -> IPAddress | None:
    """One ``X-Forwarded-For`` element read strictly, or None.

    Only an IPv4 address in dotted decimal (four parts, no leading zeros: ``198.51.100.007`` is octal
    to some parsers and decimal to others, ``3325256711`` an address to ``inet_aton`` only) or an
    IPv6 address (no zone, brackets or port) is an address here. IPv4-mapped IPv6 is the IPv4
    address. Spaces and tabs around an element belong to the list syntax.
    """
    text = text.strip(" \t")
    if not text.isascii():
        return None
    try:
        if ":" not in text:
            return ipaddress.IPv4Address(text)
        if "%" in text or "[" in text:
            return None
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return None
    mapped = address.ipv4_mapped
    return mapped if mapped is not None else address


def client_chain(peer: str | None, xff_values: Sequence[str], trusted: TrustedProxies) -> tuple[str, str]:
    """(the caller's address, the ``X-Forwarded-For`` to send upstream); "" only when nothing is known.

    Behind trusted proxies the hops are read right to left up to and including the first untrusted
    one (docs/contract.md §3); each of them must be an address (:func:`parse_hop`), else
    :class:`UnreadableHop`: falling back to the proxy's own address would let a caller escape the
    rules on its real one. What lies left of that hop is the caller's own say and is neither read
    nor sent on: the upstream learns exactly the chain the gateway vouches for, caller first, so
    one that reads the left-most entry reads the address that was decided on.

    A peer of None or "" (a unix socket: only local processes connect) is treated like a trusted
    proxy; a peer the transport names but that is no address is its own word, used as it is.
    """
    vouched: list[str] = []
    if peer:
        address, peer_trusted = trusted.classify_peer(peer)
        if address is None:
            return peer, peer
        if not peer_trusted or not xff_values:
            return address, address  # the common case: one cached lookup
        vouched.append(address)
    elif not xff_values:
        return "", ""
    hops = xff_values[0] if len(xff_values) == 1 else ",".join(xff_values)
    for entry in reversed(hops.split(",")):
        if not entry.strip(" \t"):
            continue  # empty list elements are allowed by the list syntax (RFC 9110 §5.6.1)
        parsed = parse_hop(entry)
        if parsed is None:
            raise UnreadableHop("an X-Forwarded-For hop is not an IP address in canonical form")
        vouched.append(str(parsed))
        if not trusted.holds(parsed):
            break
    if not vouched:
        return "", ""
    return vouched[-1], ", ".join(reversed(vouched))
