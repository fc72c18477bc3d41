"""Where the caller is, through running gateway processes: X-Forwarded-For, ip-ranges and GeoIP (docs/hardening.md 13).

The test client connects from 127.0.0.1. Three module-scoped gateways share one Redis of this
module's own: ``plain`` trusts no proxy; ``trusted`` trusts 127.0.0.1 and has a small City-shaped
.mmdb; ``strict`` is ``trusted`` with ``network.require_ip_country: true``.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from gateway.redis_server import RedisServer

from .support.gateway_process import BASE_POLICY, GatewayProcess, gateway_config, seed_policy
from .support.tokens import hs_token
from .support.upstream import Seen, Upstream

IR_ADDRESS = "198.51.100.7"  # ip-ranges -> IR (denied)
US_ADDRESS = "203.0.113.9"  # ip-ranges -> US
UA43_ADDRESS = "192.0.2.10"  # mmdb -> UA, subdivision UA-43 (denied)
UA30_ADDRESS = "192.0.2.70"  # mmdb -> UA, subdivision UA-30
RU_ADDRESS = "192.0.2.130"  # mmdb -> RU (denied)
RU_BUT_US_ADDRESS = "192.0.2.170"  # mmdb -> RU, ip-ranges -> US
UA30_BUT_IR_ADDRESS = "192.0.2.100"  # mmdb -> UA-30, ip-ranges -> IR
NOWHERE_ADDRESS = "192.0.2.200"  # in neither
IR_V6_ADDRESS = "2001:db8:66::7"  # ip-ranges -> IR
US_ONLY = "us-only"


def range_entry(country: str) -> dict[str, Any]:
    return {"reason": "test range", "source": "test", "country": country}


def network_policy() -> dict[str, Any]:
    document = copy.deepcopy(BASE_POLICY)
    document["lists"]["deny-countries"] = {
        "IR": {"reason": "test embargo", "source": "test"},
        "RU": {"reason": "test embargo", "source": "test"},
        "UA-43": {"reason": "test embargo of a region", "source": "test"},
    }
    document["lists"]["ip-ranges"] = {
        "198.51.100.0/24": range_entry("IR"),
        "203.0.113.0/24": range_entry("US"),
        "192.0.2.160/27": range_entry("US"),
        "192.0.2.96/27": range_entry("IR"),
        "2001:db8:66::/48": range_entry("IR"),
    }
    document["models"][US_ONLY] = {
        "stage": "general",
        "timeline": [],
        "allowed_countries": ["US"],
        "export_suspended": False,
    }
    return document


def write_city_mmdb(path: Path) -> Path:
    records = {
        "192.0.2.0/26": {
            "country": {"iso_code": "UA", "names": {"en": "Ukraine"}},
            "subdivisions": [{"iso_code": "43", "names": {"en": "Crimea"}}],
        },
        "192.0.2.64/26": {
            "country": {"iso_code": "UA", "names": {"en": "Ukraine"}},
            "subdivisions": [{"iso_code": "30", "names": {"en": "Kyiv"}}],
        },
        "192.0.2.128/26": {"country": {"iso_code": "RU", "names": {"en": "Russia"}}},
    }
    writer = MMDBWriter(ip_version=6, database_type="GeoIP2-City", ipv4_compatible=True)
    for cidr, record in records.items():
        writer.insert_network(IPSet([cidr]), record)
    writer.to_db_file(str(path))
    return path


# --- module fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_redis() -> Iterator[str]:
    with RedisServer() as server:
        seed_policy(server.url, network_policy())
        yield server.url


@pytest.fixture(scope="module")
def mmdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_city_mmdb(tmp_path_factory.mktemp("geoip") / "city.mmdb")


def _gateway(redis_url: str, upstream: Upstream, **network: Any) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(gateway_config(upstream.url, network=network), redis_url=redis_url)
    yield gateway.start()
    gateway.stop()


@pytest.fixture(scope="module")
def plain(module_redis: str, upstream: Upstream) -> Iterator[GatewayProcess]:
    yield from _gateway(module_redis, upstream, trusted_proxies=[])


@pytest.fixture(scope="module")
def trusted(module_redis: str, upstream: Upstream, mmdb: Path) -> Iterator[GatewayProcess]:
    yield from _gateway(
        module_redis, upstream, trusted_proxies=["127.0.0.1/32"], geoip_db=str(mmdb), require_ip_country=False
    )


@pytest.fixture(scope="module")
def strict(module_redis: str, upstream: Upstream, mmdb: Path) -> Iterator[GatewayProcess]:
    yield from _gateway(
        module_redis, upstream, trusted_proxies=["127.0.0.1/32"], geoip_db=str(mmdb), require_ip_country=True
    )


# --- requests --------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Any
    body: Any
    request_id: str

    @property
    def code(self) -> str | None:
        return self.body["error"]["code"] if isinstance(self.body, dict) and "error" in self.body else None

    @property
    def message(self) -> str:
        return self.body["error"]["message"] if self.code else ""


async def call(
    client: aiohttp.ClientSession,
    gateway: GatewayProcess,
    *xff: str,
    country: str | None = "US",
    model: str = "gpt-mock",
) -> Reply:
    """POST a chat completion as a fresh subject with ``country`` claimed, one X-Forwarded-For per ``xff``."""
    request_id = f"rid-{uuid.uuid4().hex}"
    token = hs_token(f"user-{uuid.uuid4().hex[:12]}", country=country)
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("X-Request-Id", request_id),
        *(("X-Forwarded-For", value) for value in xff),
    ]
    async with client.post(
        gateway.url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
    ) as response:
        raw = await response.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw
        return Reply(response.status, response.headers, body, request_id)


def seen_for(upstream: Upstream, reply: Reply) -> list[Seen]:
    return [
        seen
        for seen in upstream.seen
        if any(k.lower() == "x-request-id" and v == reply.request_id for k, v in seen.headers)
    ]


def forwarded_for(upstream: Upstream, reply: Reply) -> list[str]:
    """The X-Forwarded-For values the upstream received with this (proxied) request."""
    assert reply.status == 200, (reply.status, reply.body)
    seen = seen_for(upstream, reply)
    assert len(seen) == 1
    return [value for key, value in seen[0].headers if key.lower() == "x-forwarded-for"]


def assert_blocked(reply: Reply, upstream: Upstream, status: int, code: str, place: str | None = None) -> None:
    assert (reply.status, reply.code) == (status, code), (reply.status, reply.body)
    assert reply.headers["X-Gateway-Reason"] == code
    if place is not None:
        assert place in reply.message, reply.message
    assert seen_for(upstream, reply) == []


# --- X-Forwarded-For -----------------------------------------------------------------------------------


async def test_xff_from_an_untrusted_peer_is_ignored(
    plain: GatewayProcess, trusted: GatewayProcess, clean_upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as client:
        # The same request is blocked where 127.0.0.1 is a trusted proxy, so the header does name IR...
        assert_blocked(await call(client, trusted, IR_ADDRESS), clean_upstream, 451, "country_denied", "IR")
        # ...and changes nothing where the peer is not trusted: the client is the peer itself.
        for xff in ([IR_ADDRESS], [f"{IR_ADDRESS}, {IR_ADDRESS}"], [IR_ADDRESS, UA43_ADDRESS], [RU_ADDRESS]):
            reply = await call(client, plain, *xff)
            assert reply.status == 200, (xff, reply.status, reply.body)
            # The upstream learns the address the gateway decided on, not the caller's say.
            assert forwarded_for(clean_upstream, reply) == ["127.0.0.1"]
        seen = seen_for(clean_upstream, reply)[0]
        assert [v for k, v in seen.headers if k.lower() == "x-forwarded-proto"] == ["http"]


async def test_xff_from_a_trusted_peer_decides_the_country(trusted: GatewayProcess, clean_upstream: Upstream) -> None:
    async with aiohttp.ClientSession() as client:
        assert_blocked(await call(client, trusted, IR_ADDRESS), clean_upstream, 451, "country_denied", "IR")
        assert_blocked(await call(client, trusted, IR_V6_ADDRESS), clean_upstream, 451, "country_denied", "IR")
        reply = await call(client, trusted, US_ADDRESS)
        assert forwarded_for(clean_upstream, reply) == [f"{US_ADDRESS}, 127.0.0.1"]
        reply = await call(client, trusted)  # no XFF: the trusted proxy is the client; loopback has no country
        assert forwarded_for(clean_upstream, reply) == ["127.0.0.1"]


async def test_spoofed_leftmost_xff_uses_the_rightmost_untrusted_hop(
    trusted: GatewayProcess, clean_upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as client:
        reply = await call(client, trusted, f"{IR_ADDRESS}, {US_ADDRESS}")
        assert reply.status == 200, reply.body
        # The caller's own say (left of the first untrusted hop) is not sent on: an upstream that reads the
        # left-most entry reads the address that was decided on.
        assert forwarded_for(clean_upstream, reply) == [f"{US_ADDRESS}, 127.0.0.1"]
        assert_blocked(
            await call(client, trusted, f"{US_ADDRESS}, {IR_ADDRESS}"), clean_upstream, 451, "country_denied", "IR"
        )
        # Trusted hops in the chain are skipped on the way to the first untrusted one.
        assert_blocked(
            await call(client, trusted, f"{US_ADDRESS}, {IR_ADDRESS}, 127.0.0.1, 127.0.0.1"),
            clean_upstream,
            451,
            "country_denied",
            "IR",
        )
        reply = await call(client, trusted, f"{IR_ADDRESS}, {US_ADDRESS}, 127.0.0.1")
        assert reply.status == 200, reply.body


async def test_several_xff_headers_are_one_list(
    plain: GatewayProcess, trusted: GatewayProcess, clean_upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as client:
        reply = await call(client, trusted, IR_ADDRESS, US_ADDRESS)
        assert reply.status == 200, reply.body
        assert forwarded_for(clean_upstream, reply) == [f"{US_ADDRESS}, 127.0.0.1"]
        assert_blocked(await call(client, trusted, US_ADDRESS, IR_ADDRESS), clean_upstream, 451, "country_denied", "IR")
        assert_blocked(
            await call(client, trusted, US_ADDRESS, f"{US_ADDRESS}, {IR_ADDRESS}", ""),
            clean_upstream,
            451,
            "country_denied",
            "IR",
        )
        reply = await call(client, plain, US_ADDRESS, IR_ADDRESS)
        assert forwarded_for(clean_upstream, reply) == ["127.0.0.1"]


GARBAGE = [
    "not-an-ip",
    "unknown",
    "_hidden",
    "999.999.999.999",
    "198.51.100.7:99999",
    "[2001:db8::1",
    "2001:db8::1]",
    "1.2.3.4/24",
    "198.51.100.7 203.0.113.9",
    "0x7f.0.0.1",
    ",,,",
    " , ",
    "",
    "a" * 4000,
    "%00",
    "fe80::1%",
    "-1",
    "1.2.3",
    "::ffff:",
    "[]",
    "\t",
    "198.51.100.7;203.0.113.9",
    "for=198.51.100.7",
    "<script>",
    "1" * 60,
]


async def test_garbage_xff_entries_never_fail_the_gateway(
    trusted: GatewayProcess, strict: GatewayProcess, clean_upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as client:
        for garbage in GARBAGE:
            for xff in ([garbage], [f"{IR_ADDRESS}, {garbage}"], [garbage, garbage]):
                reply = await call(client, trusted, *xff)
                if garbage.replace(",", "").strip(" \t"):
                    assert (reply.status, reply.code) == (400, "invalid_request"), (xff, reply.status, reply.body)
                else:  # only empty list elements, which the list syntax allows: as if absent
                    assert reply.status in (200, 451), (xff, reply.status, reply.body)
            # Garbage left of the right-most hop does not hide that hop.
            assert_blocked(
                await call(client, trusted, f"{garbage}, {IR_ADDRESS}"), clean_upstream, 451, "country_denied", "IR"
            )
            assert_blocked(
                await call(client, trusted, garbage, IR_ADDRESS), clean_upstream, 451, "country_denied", "IR"
            )
        # Other canonical spellings of the IR address are that address...
        for spelling in (f"::ffff:{IR_ADDRESS}", f" {IR_ADDRESS} ", "2001:DB8:66::1"):
            assert_blocked(await call(client, trusted, spelling), clean_upstream, 451, "country_denied", "IR")
        # ...and forms that are no address, or that parsers read differently, are refused.
        for spelling in (f"{IR_ADDRESS}:8080", "[2001:db8:66::1]:443", "198.51.100.007", "3325256711"):
            assert_blocked(await call(client, trusted, spelling), clean_upstream, 400, "invalid_request")
        # Where no country can be vouched for, require_ip_country still fails a country-bound model.
        reply = await call(client, strict, model=US_ONLY)
        assert_blocked(reply, clean_upstream, 451, "export_restricted")


async def test_an_unreadable_rightmost_hop_is_refused_never_the_proxys_address(
    trusted: GatewayProcess, clean_upstream: Upstream
) -> None:
    """Finding 9: behind a trusted proxy, an unreadable right-most hop used to fall back to the proxy's own
    (loopback, countryless) address and escape the IP-country rules; ``us-only`` was served to an IR caller."""
    async with aiohttp.ClientSession() as client:
        for hop in ("garbage", "198.51.100.007", "3325256711", "198.51.100.7:443", "0xc6.0x33.0x64.0x7"):
            for xff in ([hop], [f"{IR_ADDRESS}, {hop}"], [f"{hop}, 127.0.0.1"]):
                reply = await call(client, trusted, *xff, model=US_ONLY)
                assert_blocked(reply, clean_upstream, 400, "invalid_request")
                assert hop not in reply.message
    assert clean_upstream.seen == []


# --- GeoIP and ip-ranges ------------------------------------------------------------------------------------


async def test_geoip_subdivision_is_denied_but_not_the_rest_of_the_country(
    trusted: GatewayProcess, clean_upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as client:
        assert_blocked(await call(client, trusted, UA43_ADDRESS), clean_upstream, 451, "country_denied", "UA-43")
        assert_blocked(
            await call(client, trusted, UA43_ADDRESS, country="UA"), clean_upstream, 451, "country_denied", "UA-43"
        )
        reply = await call(client, trusted, UA30_ADDRESS)
        assert reply.status == 200, reply.body
        reply = await call(client, trusted, UA30_ADDRESS, country="UA")
        assert reply.status == 200, reply.body
        # A subdivision claim is denied just as a subdivision address is.
        assert_blocked(await call(client, trusted, country="UA-43"), clean_upstream, 451, "country_denied", "UA-43")


async def test_ip_ranges_override_the_geoip_database(trusted: GatewayProcess, clean_upstream: Upstream) -> None:
    async with aiohttp.ClientSession() as client:
        assert_blocked(await call(client, trusted, RU_ADDRESS), clean_upstream, 451, "country_denied", "RU")
        # The database says RU, the operator's range says US: US it is, even for a US-only model.
        for model in ("gpt-mock", US_ONLY):
            reply = await call(client, trusted, RU_BUT_US_ADDRESS, model=model)
            assert reply.status == 200, (model, reply.body)
        # The database says UA-30, the operator's range says IR.
        reply = await call(client, trusted, UA30_BUT_IR_ADDRESS)
        assert_blocked(reply, clean_upstream, 451, "country_denied", "IR")
        assert "UA" not in reply.message


async def test_require_ip_country_fails_country_bound_models_for_unplaced_addresses(
    trusted: GatewayProcess, strict: GatewayProcess, clean_upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as client:
        for xff in ([NOWHERE_ADDRESS], []):  # an address the database lacks; loopback
            assert_blocked(await call(client, strict, *xff, model=US_ONLY), clean_upstream, 451, "export_restricted")
            reply = await call(client, trusted, *xff, model=US_ONLY)
            assert reply.status == 200, (xff, reply.body)
            # A model without allowed_countries is not country-bound: it passes either way.
            reply = await call(client, strict, *xff)
            assert reply.status == 200, (xff, reply.body)
        # An address that is placed inside the allowed countries passes on both.
        for gateway in (trusted, strict):
            reply = await call(client, gateway, US_ADDRESS, model=US_ONLY)
            assert reply.status == 200, reply.body


async def test_claim_and_ip_country_each_count_and_the_stricter_wins(
    trusted: GatewayProcess, clean_upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as client:
        # Claim US, address in a denied country.
        assert_blocked(
            await call(client, trusted, RU_ADDRESS, country="US"), clean_upstream, 451, "country_denied", "RU"
        )
        assert_blocked(
            await call(client, trusted, IR_ADDRESS, country="US", model=US_ONLY),
            clean_upstream,
            451,
            "country_denied",
            "IR",
        )
        # Claim in a denied country, address US.
        assert_blocked(
            await call(client, trusted, US_ADDRESS, country="IR"), clean_upstream, 451, "country_denied", "IR"
        )
        # Claim US, address outside a US-only model's countries (but not denied).
        assert_blocked(
            await call(client, trusted, UA30_ADDRESS, country="US", model=US_ONLY),
            clean_upstream,
            451,
            "export_restricted",
            "UA-30",
        )
        # Claim outside, address US.
        assert_blocked(
            await call(client, trusted, US_ADDRESS, country="DE", model=US_ONLY),
            clean_upstream,
            451,
            "export_restricted",
            "DE",
        )
        # Both US.
        reply = await call(client, trusted, US_ADDRESS, country="US", model=US_ONLY)
        assert reply.status == 200, reply.body


async def test_policy_change_to_ip_ranges_applies_without_restart(
    trusted: GatewayProcess, module_redis: str, clean_upstream: Upstream
) -> None:
    document = network_policy()
    document["lists"]["ip-ranges"]["192.0.2.192/26"] = range_entry("IR")
    async with aiohttp.ClientSession() as client:
        assert (await call(client, trusted, NOWHERE_ADDRESS)).status == 200
        seed_policy(module_redis, document)
        try:
            deadline = time.monotonic() + 1.0
            # Until a request is refused before it reaches the upstream. A 200 is the old version; a
            # refusal the upstream saw was admitted under the old version and ended by the new one
            # while it was in flight (a revocation).
            while (reply := await call(client, trusted, NOWHERE_ADDRESS)).status == 200 or seen_for(
                clean_upstream, reply
            ):
                assert time.monotonic() < deadline, "new ip-ranges entry not enforced within 1 s"
            assert_blocked(reply, clean_upstream, 451, "country_denied", "IR")
        finally:
            seed_policy(module_redis, network_policy())
            deadline = time.monotonic() + 3.0
            while (await call(client, trusted, NOWHERE_ADDRESS)).status != 200:
                assert time.monotonic() < deadline, "restored policy not enforced"
