"""The client's IP address: the peer, or the right-most untrusted X-Forwarded-For hop behind trusted proxies.

``X-Forwarded-For`` is believed only as far as a chain of trusted proxies
vouches for it: everything left of the first untrusted hop is the caller's
own say and changes nothing.
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
        if end < 0 or not _is_port_suffix(text[end + 1:], allow_empty=True):
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
        """(normalised address, trusted) without caching: for caller-supplied XFF entries."""
        address = parse_ip(text)
        if address is None:
            return None, False
        trusted = any(address in network for network in self._networks)
        return str(address), trusted


def client_ip(peer: str | None, xff_values: Sequence[str], trusted: TrustedProxies) -> str:
    """The caller's address as far as trusted proxies vouch for it; "" only when nothing is known.

    A peer of None or "" (a unix socket: only local processes connect) is
    treated like a trusted proxy.
    """
    last_valid: str | None = None
    if peer:
        last_valid, peer_trusted = trusted.classify_peer(peer)
        if last_valid is None:
            return peer  # the transport's own word, not caller-supplied
        if not peer_trusted:
            return last_valid
    if not xff_values:
        return last_valid or ""
    for entry in reversed(",".join(xff_values).split(",")):
        if not entry.strip():
            continue  # empty list elements are allowed by the list syntax (RFC 9110 §5.6.1)
        address, hop_trusted = trusted.classify(entry)
        if address is None:
            break  # garbage: nothing left of it can be vouched for
        if not hop_trusted:
            return address
        last_valid = address
    return last_valid or ""
