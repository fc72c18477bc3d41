"""IP address -> (country, subdivision): the operator's ``ip-ranges`` first, then a MaxMind-format database.

Codes are upper-case ISO 3166-1 alpha-2 countries and ISO 3166-2
subdivisions ("UA-43"). Addresses that are not on the public internet
(loopback, private, link-local) have no country.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import maxminddb

from .network import IPAddress, parse_ip
from .settings import ConfigError, Network

log = logging.getLogger(__name__)

Codes = tuple[str | None, str | None]
NO_COUNTRY: Codes = (None, None)

_COUNTRY = re.compile(r"[A-Z]{2}")
_SUBDIVISION_PART = re.compile(r"[A-Z0-9]{1,3}")
_CODE = re.compile(r"([A-Z]{2})(-[A-Z0-9]{1,3})?")
_LOCAL_NETWORKS = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
        "ff00::/8",
    )
)
_INDEX_SLOTS = 4  # snapshots are swapped whole; a few slots cover old and new during a swap


def is_local(address: IPAddress) -> bool:
    """True for addresses no geolocation database can place."""
    return any(address in network for network in _LOCAL_NETWORKS)


def split_code(code: Any) -> Codes | None:
    """("UA", "UA-43") for "ua-43", ("RU", None) for "RU"; None when not a code."""
    if not isinstance(code, str):
        return None
    match = _CODE.fullmatch(code.upper())
    if match is None:
        return None
    return match.group(1), match.group(0) if match.group(2) else None


class _RangeIndex:
    """Longest-prefix match over CIDR -> code: one dict per prefix length present, longest first."""

    def __init__(self, ranges: Mapping[str, str]) -> None:
        tables: dict[tuple[int, int], dict[int, Codes]] = {}
        for cidr, code in ranges.items():
            codes = split_code(code)
            network = _network(cidr)
            if codes is None or network is None:
                log.warning("ip-ranges: ignoring entry %r -> %r", cidr, code)
                continue
            shift = network.max_prefixlen - network.prefixlen
            table = tables.setdefault((network.version, network.prefixlen), {})
            table[int(network.network_address) >> shift] = codes
        self._tables = {
            version: [(bits - plen, table) for (v, plen), table in sorted(tables.items(), reverse=True) if v == version]
            for version, bits in ((4, 32), (6, 128))
        }

    def find(self, address: IPAddress) -> Codes | None:
        number = int(address)
        for shift, table in self._tables[address.version]:
            codes = table.get(number >> shift)
            if codes is not None:
                return codes
        return None


def _network(cidr: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if not isinstance(cidr, str):
        return None
    try:
        return ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError:
        return None


def _iso_code(node: Any, shape: re.Pattern[str]) -> str | None:
    code = node.get("iso_code") if isinstance(node, dict) else None
    if not isinstance(code, str):
        return None
    code = code.upper()
    return code if shape.fullmatch(code) else None


def codes_from_record(record: Any) -> Codes:
    """Country and subdivision from a GeoIP2/GeoLite2 Country or City record."""
    if not isinstance(record, dict):
        return NO_COUNTRY
    # "country" is where the address is used; "registered_country" is where its owner
    # is registered, which says nothing about the caller, so it is not used.
    country = _iso_code(record.get("country"), _COUNTRY)
    if country is None:
        return NO_COUNTRY
    subdivisions = record.get("subdivisions")
    first = subdivisions[0] if isinstance(subdivisions, list) and subdivisions else None
    part = _iso_code(first, _SUBDIVISION_PART)
    return country, f"{country}-{part}" if part else None


class GeoResolver:
    """Resolves addresses to countries; cheap per request (LRU cache, prebuilt range index)."""

    def __init__(self, db_path: Path | None, *, cache_size: int = 65_536) -> None:
        self._reader: Any = _open(db_path) if db_path is not None else None
        self._lookup = functools.lru_cache(maxsize=cache_size)(self._lookup_uncached)
        self._parse = functools.lru_cache(maxsize=cache_size)(parse_ip)
        self._indexes: dict[int, tuple[Mapping[str, str], _RangeIndex]] = {}

    @classmethod
    def from_settings(cls, network: Network) -> GeoResolver:
        return cls(network.geoip_db)

    def lookup(self, ip: str) -> Codes:
        """Country and subdivision from the database alone."""
        return self._lookup(ip)

    def resolve(self, ip: str, ip_ranges: Mapping[str, str]) -> Codes:
        """The operator's ``ip-ranges`` (longest prefix) win; else the database."""
        if ip_ranges:
            address = self._parse(ip)
            if address is not None:
                codes = self._index(ip_ranges).find(address)
                if codes is not None:
                    return codes
        return self._lookup(ip)

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        self._lookup.cache_clear()
        self._indexes.clear()

    def _index(self, ip_ranges: Mapping[str, str]) -> _RangeIndex:
        # Keyed by id() with the mapping itself held, so an id is never reused while cached.
        slot = self._indexes.get(id(ip_ranges))
        if slot is not None and slot[0] is ip_ranges:
            return slot[1]
        index = _RangeIndex(ip_ranges)
        if len(self._indexes) >= _INDEX_SLOTS:
            self._indexes.clear()
        self._indexes[id(ip_ranges)] = (ip_ranges, index)
        return index

    def _lookup_uncached(self, ip: str) -> Codes:
        address = self._parse(ip)
        if address is None or self._reader is None or is_local(address):
            return NO_COUNTRY
        try:
            record = self._reader.get(address)
        except (ValueError, maxminddb.InvalidDatabaseError):
            return NO_COUNTRY  # e.g. an IPv6 address against an IPv4-only database
        return codes_from_record(record)


def _open(db_path: Path) -> Any:
    try:
        return maxminddb.open_database(str(db_path), maxminddb.MODE_AUTO)
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
        raise ConfigError(f"network.geoip_db: cannot open {db_path}: {exc}") from None
