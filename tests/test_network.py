"""Client IP: the peer, or the right-most untrusted X-Forwarded-For hop behind trusted proxies.

Hardening case 13 at the unit level, and finding 9 of the second review: a hop the gateway must read
that is not an address in canonical form is refused, never skipped for the proxy's own address.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.network import TrustedProxies, UnreadableHop, client_chain, normalise_ip, parse_hop

TRUSTED = TrustedProxies(["10.0.0.0/8", "2001:db8:ffff::/48"])


def client_ip(peer: str | None, xff: list[str], trusted: TrustedProxies) -> str:
    return client_chain(peer, xff, trusted)[0]


PROXY = "10.0.0.2"
CLIENT = "203.0.113.5"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
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
    ],
)
def test_addresses_are_normalised(raw: str, expected: str) -> None:
    assert normalise_ip(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "unknown",
        "_hidden",
        "1.2.3",
        "01.2.3.4",
        "1.2.3.4:",
        "1.2.3.4:http",
        "1.2.3.4:١٢٣",
        "1.2.3.4:1234567",
        "[2001:db8::1",
        "[2001:db8::1]x",
        "[2001:db8::1]:",
        "1.2.3.4 5.6.7.8",
        "<script>",
        "1.2.3.4/24",
        "999.1.1.1",
        "localhost",
    ],
)
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


@pytest.mark.parametrize(
    "headers",
    [
        ["6.6.6.6", f"{CLIENT}, 10.0.0.1"],
        [f"6.6.6.6, {CLIENT}", "10.0.0.1"],
        ["6.6.6.6", CLIENT, "10.0.0.1"],
        ["6.6.6.6", CLIENT, ""],
    ],
)
def test_several_xff_headers_are_one_list_in_order(headers: list[str]) -> None:
    assert client_ip(PROXY, headers, TRUSTED) == CLIENT


def test_all_hops_trusted_gives_the_leftmost_trusted() -> None:
    assert client_ip(PROXY, ["10.0.0.5, 10.0.0.1"], TRUSTED) == "10.0.0.5"
    assert client_ip(PROXY, [], TRUSTED) == PROXY


@pytest.mark.parametrize(
    "xff",
    [
        f"{CLIENT}, garbage, 10.0.0.1",
        f"{CLIENT}, garbage",
        "<script>alert(1)</script>",
        f"{CLIENT}, 1.2.3.4:http",
        f"{CLIENT}, unknown, 10.0.0.1, 10.0.0.3",
        "198.51.100.007",  # octal to inet_aton, decimal to others
        "3325256711",  # 198.51.100.7 to inet_aton
        "0xc6.0x33.0x64.7",
        "198.51.100.7:8080",  # a port: not an address
        "[2001:db8::5]:443",
        "[2001:db8::5]",
        "fe80::1%eth0",
        "::ffff:",
    ],
)
def test_an_unreadable_hop_that_must_be_read_is_refused(xff: str) -> None:
    """Finding 9: never a fallback to the last readable hop or the proxy's own address."""
    with pytest.raises(UnreadableHop):
        client_chain(PROXY, [xff], TRUSTED)
    with pytest.raises(UnreadableHop):
        client_chain(None, [xff], TRUSTED)


def test_garbage_left_of_the_first_untrusted_hop_is_never_read() -> None:
    assert client_chain(PROXY, [f"garbage, 198.51.100.007, {CLIENT}, 10.0.0.1"], TRUSTED) == (
        CLIENT,
        f"{CLIENT}, 10.0.0.1, {PROXY}",
    )
    # An untrusted peer's header is never read at all.
    assert client_chain("198.51.100.7", ["garbage"], TRUSTED) == ("198.51.100.7", "198.51.100.7")


def test_empty_list_elements_are_skipped() -> None:
    assert client_ip(PROXY, [f"{CLIENT}, , 10.0.0.1,"], TRUSTED) == CLIENT


def test_canonical_hops_in_any_letter_case_and_mapped_forms() -> None:
    assert client_ip(PROXY, ["2001:DB8::5, 10.0.0.1"], TRUSTED) == "2001:db8::5"
    assert client_ip(PROXY, [f" {CLIENT}\t"], TRUSTED) == CLIENT
    assert client_ip(PROXY, ["::ffff:203.0.113.5"], TRUSTED) == CLIENT
    assert parse_hop("198.51.100.7") is not None and parse_hop("01.2.3.4") is None


def test_the_forwarded_chain_is_what_the_gateway_vouches_for() -> None:
    assert client_chain(PROXY, [f"6.6.6.6, {CLIENT}", "10.0.0.1"], TRUSTED) == (CLIENT, f"{CLIENT}, 10.0.0.1, {PROXY}")
    assert client_chain(PROXY, [], TRUSTED) == (PROXY, PROXY)
    assert client_chain("::ffff:10.0.0.2", [CLIENT], TRUSTED) == (CLIENT, f"{CLIENT}, {PROXY}")


def test_mapped_peers_are_normalised() -> None:
    assert client_ip("::ffff:198.51.100.7", [CLIENT], TRUSTED) == "198.51.100.7"
    assert client_ip("::ffff:10.0.0.2", [CLIENT], TRUSTED) == CLIENT


def test_unknown_peer_walks_xff_and_only_then_gives_empty() -> None:
    assert client_ip(None, [f"{CLIENT}, 10.0.0.1"], TRUSTED) == CLIENT
    assert client_ip("", [CLIENT], TRUSTED) == CLIENT
    assert client_ip(None, [], TRUSTED) == ""
    assert client_ip(None, ["10.0.0.1"], TRUSTED) == "10.0.0.1"


_entry = st.one_of(
    st.sampled_from([CLIENT, "10.0.0.1", "10.0.0.9", "6.6.6.6", "2001:db8::1", "[2001:db8::2]:1", "", " "]),
    st.text(max_size=12),
)


@given(
    peer=st.sampled_from([PROXY, "198.51.100.7", "::ffff:10.0.0.3", None]),
    headers=st.lists(st.lists(_entry, max_size=5).map(", ".join), max_size=3),
)
def test_result_is_always_an_address_never_garbage(peer: str | None, headers: list[str]) -> None:
    try:
        result = client_ip(peer, headers, TRUSTED)
    except UnreadableHop:
        assert peer is None or TRUSTED.contains(peer)
        return
    if result:
        assert str(ipaddress.ip_address(result)) == result
    else:
        assert peer is None
    if peer == "198.51.100.7":
        assert result == peer
