"""IP -> country and subdivision: real .mmdb files written in the test, and the operator's ip-ranges."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from gateway.geo import GeoResolver
from gateway.settings import ConfigError, Network


def write_mmdb(path: Path, records: dict[str, Any], *, database_type: str, ip_version: int = 6) -> Path:
    writer = MMDBWriter(ip_version=ip_version, database_type=database_type, ipv4_compatible=ip_version == 6)
    for cidr, record in records.items():
        writer.insert_network(IPSet([cidr]), record)
    writer.to_db_file(str(path))
    return path


@pytest.fixture
def city_db(tmp_path: Path) -> Path:
    return write_mmdb(
        tmp_path / "city.mmdb",
        {
            "203.0.113.0/24": {
                "country": {"iso_code": "UA", "names": {"en": "Ukraine"}},
                "subdivisions": [{"iso_code": "43", "names": {"en": "Crimea"}}],
                "city": {"names": {"en": "Simferopol"}},
            },
            "198.51.100.0/24": {"country": {"iso_code": "de"}},
            "192.0.2.0/24": {"registered_country": {"iso_code": "US"}},
            "2001:db8:1::/48": {"country": {"iso_code": "JP"}, "subdivisions": [{"iso_code": "13"}, {"iso_code": "X"}]},
            "2001:db8:2::/48": {"country": {"iso_code": "FR"}, "subdivisions": [{"iso_code": "TOOLONG"}]},
            "2001:db8:3::/48": {"country": {"iso_code": "Germany"}},
            "2001:db8:4::/48": "not a record",
            "10.0.0.0/8": {"country": {"iso_code": "RU"}},
            "100.64.0.0/10": {"country": {"iso_code": "RU"}},
        },
        database_type="GeoIP2-City",
    )


@pytest.fixture
def country_db(tmp_path: Path) -> Path:
    return write_mmdb(
        tmp_path / "country.mmdb",
        {
            "203.0.113.0/24": {"continent": {"code": "AS"}, "country": {"iso_code": "IR"}},
        },
        database_type="GeoIP2-Country",
        ip_version=4,
    )


@pytest.fixture
def city(city_db: Path):
    resolver = GeoResolver(city_db)
    yield resolver
    resolver.close()


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("203.0.113.9", ("UA", "UA-43")),
        ("::ffff:203.0.113.9", ("UA", "UA-43")),
        ("198.51.100.1", ("DE", None)),
        ("2001:db8:1::7", ("JP", "JP-13")),
        ("2001:db8:2::7", ("FR", None)),  # malformed subdivision code: the country still counts
        ("2001:db8:3::7", (None, None)),  # not an ISO code
        ("2001:db8:4::7", (None, None)),  # not a record
        ("192.0.2.1", (None, None)),  # registered country only: says nothing about the caller
        ("8.8.8.8", (None, None)),  # not in the database
    ],
)
def test_city_database_gives_country_and_subdivision(city: GeoResolver, ip: str, expected: tuple) -> None:
    assert city.lookup(ip) == expected


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "::1",
        "10.1.2.3",
        "100.64.0.1",
        "192.168.1.1",
        "172.16.0.1",
        "169.254.1.1",
        "fe80::1",
        "fd00::1",
        "0.0.0.0",
        "::",
        "not an ip",
        "",
    ],
)
def test_local_and_unparseable_addresses_have_no_country(city: GeoResolver, ip: str) -> None:
    assert city.lookup(ip) == (None, None)


def test_country_database_gives_country_only(country_db: Path) -> None:
    resolver = GeoResolver(country_db)
    try:
        assert resolver.lookup("203.0.113.77") == ("IR", None)
        assert resolver.lookup("2001:db8:1::7") == (None, None)  # IPv6 against an IPv4-only database
    finally:
        resolver.close()


def test_no_database_means_no_country_but_ranges_still_apply() -> None:
    resolver = GeoResolver(None)
    assert resolver.lookup("203.0.113.9") == (None, None)
    assert resolver.resolve("203.0.113.9", {"203.0.113.0/24": "KP"}) == ("KP", None)
    resolver.close()


def test_from_settings_opens_the_configured_database(city_db: Path) -> None:
    resolver = GeoResolver.from_settings(Network(geoip_db=city_db))
    assert resolver.lookup("203.0.113.9") == ("UA", "UA-43")
    resolver.close()


def test_unusable_database_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^network\.geoip_db: cannot open"):
        GeoResolver(tmp_path / "missing.mmdb")
    junk = tmp_path / "junk.mmdb"
    junk.write_bytes(b"this is not a maxmind database" * 10)
    with pytest.raises(ConfigError, match=r"^network\.geoip_db: cannot open"):
        GeoResolver(junk)


RANGES = {
    "203.0.113.0/24": "RU",
    "203.0.113.128/25": "ua-43",
    "203.0.113.200/32": "BY",
    "2001:db8::/32": "ir",
    "10.0.0.0/8": "US",
    "not-a-cidr": "RU",
    "198.51.100.0/24": "Russia",
}


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("203.0.113.9", ("RU", None)),  # the operator's list wins over the database's UA-43
        ("203.0.113.130", ("UA", "UA-43")),  # longer prefix wins; a subdivision gives its country too
        ("203.0.113.200", ("BY", None)),  # the longest prefix of all
        ("::ffff:203.0.113.200", ("BY", None)),
        ("2001:db8:1::7", ("IR", None)),
        ("10.1.2.3", ("US", None)),  # operators may place private ranges
        ("198.51.100.1", ("DE", None)),  # an invalid code is ignored: the database answers
        ("8.8.8.8", (None, None)),
        ("garbage", (None, None)),
    ],
)
def test_ip_ranges_override_the_database_by_longest_prefix(city: GeoResolver, ip: str, expected: tuple) -> None:
    assert city.resolve(ip, RANGES) == expected


def test_catch_all_range_loses_to_any_longer_prefix(city: GeoResolver) -> None:
    ranges = {"0.0.0.0/0": "CN", "203.0.113.0/24": "RU", "::/0": "KP"}
    assert city.resolve("8.8.8.8", ranges) == ("CN", None)
    assert city.resolve("203.0.113.9", ranges) == ("RU", None)
    assert city.resolve("2001:db8:1::7", ranges) == ("KP", None)


def test_each_new_snapshot_mapping_is_honoured(city: GeoResolver) -> None:
    # Snapshots are swapped whole; every new mapping must be seen, however many come and go.
    for n in range(12):
        code = ["RU", "BY", "KP", "IR"][n % 4]
        assert city.resolve("203.0.113.9", {"203.0.113.0/24": code}) == (code, None)
    assert city.resolve("203.0.113.9", {}) == ("UA", "UA-43")


def test_lookups_are_cached_and_bounded(city_db: Path) -> None:
    resolver = GeoResolver(city_db, cache_size=2)
    for ip in ("203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.3"):
        assert resolver.lookup(ip) == ("UA", "UA-43")
    info = resolver._lookup.cache_info()
    assert (info.currsize, info.hits) == (2, 1)
    resolver.close()


def test_close_releases_the_database(city_db: Path) -> None:
    resolver = GeoResolver(city_db)
    assert resolver.lookup("203.0.113.9") == ("UA", "UA-43")
    resolver.close()
    assert resolver.lookup("203.0.113.9") == (None, None)
    resolver.close()
