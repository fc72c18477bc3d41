"""Client IP: the peer, or the right-most untrusted X-Forwarded-For hop behind trusted proxies.

HARDENING case 13 at the unit level.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.network import TrustedProxies, client_ip, normalise_ip

TRUSTED = TrustedProxies(["10.0.0.0/8", "2001:db8:ffff::/48"])
PROXY = "10.0.0.2"
CLIENT = "203.0.113.5"


@pytest.mark.parametrize(("raw", "expected"), [
    ("1.2.3.4", "1.2.3.4"),
    ("  1.2.3.4\t", "1.2.3.4"),
    ("1.2.3.4:5678", "1.2.3.4"),
    ("[2001:db8::1]:443", "2001:db8::1"),
    ("[2001:db8::1]", "2001:db8::1"),
    ("2001:DB8:0:0::1", "2001:db8::1"),
    ("fe80::1%eth0", "fe80::1"),
    ("[fe80::1%25eth0]:80", "fe80::1"),
    ("::ffff:1.2.3.4", "1.2.3.4"),
    ("[::ffff:10.0.0.1]:80", "10.0.0.1"),
])
def test_addresses_are_normalised(raw: str, expected: str) -> None:
    assert normalise_ip(raw) == expected


@pytest.mark.parametrize("raw", [
    "", "unknown", "_hidden", "1.2.3", "01.2.3.4", "1.2.3.4:", "1.2.3.4:http", "1.2.3.4:١٢٣",
    "1.2.3.4:1234567", "[2001:db8::1", "[2001:db8::1]x", "[2001:db8::1]:", "1.2.3.4 5.6.7.8",
    "<script>", "1.2.3.4/24", "999.1.1.1", "localhost",
])
def test_garbage_is_not_an_address(raw: str) -> None:
    assert normalise_ip(raw) is None


def test_trusted_proxies_contains_v4_v6_and_mapped_addresses() -> None:
    assert TRUSTED.contains("10.9.8.7")
    assert TRUSTED.contains("::ffff:10.9.8.7")
    assert TRUSTED.contains("2001:db8:ffff:1::1")
    assert not TRUSTED.contains("11.0.0.1")
    assert not TRUSTED.contains("2001:db8:fffe::1")
    assert not TRUSTED.contains("garbage")
    assert not TrustedProxies([]).contains("10.0.0.1")


def test_peer_classification_is_cached() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    first = proxies.classify_peer(PROXY)
    assert first == ("10.0.0.2", True)
    assert proxies.classify_peer(PROXY) is first


def test_untrusted_peers_xff_is_ignored() -> None:
    assert client_ip("198.51.100.7", ["1.1.1.1"], TRUSTED) == "198.51.100.7"
    assert client_ip("198.51.100.7", [CLIENT, PROXY], TRUSTED) == "198.51.100.7"


def test_no_trusted_proxies_means_the_peer_always() -> None:
    assert client_ip(PROXY, [CLIENT], TrustedProxies([])) == PROXY


def test_trusted_chain_resolves_the_rightmost_untrusted_hop() -> None:
    assert client_ip(PROXY, [f"{CLIENT}, 10.0.0.1"], TRUSTED) == CLIENT
    assert client_ip(PROXY, [f"{CLIENT}, 10.0.0.1, 10.0.0.7"], TRUSTED) == CLIENT
    assert client_ip("2001:db8:ffff::9", [f"{CLIENT}"], TRUSTED) == CLIENT


@pytest.mark.parametrize("spoofed", ["6.6.6.6", "127.0.0.1", "10.0.0.1", "2001:db8::66", "1.1.1.1, 8.8.8.8"])
def test_spoofed_leftmost_entries_change_nothing(spoofed: str) -> None:
    assert client_ip(PROXY, [f"{spoofed}, {CLIENT}, 10.0.0.1"], TRUSTED) == CLIENT


@pytest.mark.parametrize("headers", [
    ["6.6.6.6", f"{CLIENT}, 10.0.0.1"],
    [f"6.6.6.6, {CLIENT}", "10.0.0.1"],
    ["6.6.6.6", CLIENT, "10.0.0.1"],
    ["6.6.6.6", CLIENT, ""],
])
def test_several_xff_headers_are_one_list_in_order(headers: list[str]) -> None:
    assert client_ip(PROXY, headers, TRUSTED) == CLIENT


def test_all_hops_trusted_gives_the_leftmost_trusted() -> None:
    assert client_ip(PROXY, ["10.0.0.5, 10.0.0.1"], TRUSTED) == "10.0.0.5"
    assert client_ip(PROXY, [], TRUSTED) == PROXY


@pytest.mark.parametrize(("xff", "expected"), [
    (f"{CLIENT}, garbage, 10.0.0.1", "10.0.0.1"),
    (f"{CLIENT}, garbage", PROXY),
    ("<script>alert(1)</script>", PROXY),
    (f"{CLIENT}, 1.2.3.4:http", PROXY),
    (f"{CLIENT}, unknown, 10.0.0.1, 10.0.0.3", "10.0.0.1"),
])
def test_garbage_stops_the_walk_at_the_last_valid_hop(xff: str, expected: str) -> None:
    assert client_ip(PROXY, [xff], TRUSTED) == expected


def test_empty_list_elements_are_skipped() -> None:
    assert client_ip(PROXY, [f"{CLIENT}, , 10.0.0.1,"], TRUSTED) == CLIENT


def test_ports_brackets_and_zones_in_xff_are_stripped() -> None:
    assert client_ip(PROXY, ["[2001:db8::5]:443, 10.0.0.1:8080"], TRUSTED) == "2001:db8::5"
    assert client_ip(PROXY, [f"{CLIENT}:5678"], TRUSTED) == CLIENT
    assert client_ip(PROXY, ["::ffff:203.0.113.5"], TRUSTED) == CLIENT


def test_mapped_peers_are_normalised() -> None:
    assert client_ip("::ffff:198.51.100.7", [CLIENT], TRUSTED) == "198.51.100.7"
    assert client_ip("::ffff:10.0.0.2", [CLIENT], TRUSTED) == CLIENT


def test_unknown_peer_walks_xff_and_only_then_gives_empty() -> None:
    assert client_ip(None, [f"{CLIENT}, 10.0.0.1"], TRUSTED) == CLIENT
    assert client_ip("", [CLIENT], TRUSTED) == CLIENT
    assert client_ip(None, [], TRUSTED) == ""
    assert client_ip(None, ["garbage"], TRUSTED) == ""
    assert client_ip(None, ["10.0.0.1"], TRUSTED) == "10.0.0.1"


_entry = st.one_of(
    st.sampled_from([CLIENT, "10.0.0.1", "10.0.0.9", "6.6.6.6", "2001:db8::1", "[2001:db8::2]:1", "", " "]),
    st.text(max_size=12),
)


@given(peer=st.sampled_from([PROXY, "198.51.100.7", "::ffff:10.0.0.3", None]),
       headers=st.lists(st.lists(_entry, max_size=5).map(", ".join), max_size=3))
def test_result_is_always_an_address_never_garbage(peer: str | None, headers: list[str]) -> None:
    result = client_ip(peer, headers, TRUSTED)
    if result:
        assert str(ipaddress.ip_address(result)) == result
    else:
        assert peer is None
    if peer == "198.51.100.7":
        assert result == peer
