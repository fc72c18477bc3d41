"""The streaming proxy core through a running gateway process, a real Redis and a loopback upstream."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator

import aiohttp
import orjson
import pytest
import yaml
from yarl import URL

from gateway.redis_server import RedisServer, free_port

from .support.gateway_process import ROOT, GatewayProcess, gateway_config, seed_policy
from .support.tokens import auth, hs_token
from .support.upstream import Upstream

MODEL = {"model": "gpt-mock"}  # every proxied request names its model (a GET or HEAD to /v1/models need not)


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        seed_policy(server.url)
        yield server


@pytest.fixture(scope="module")
def gateway(module_redis: RedisServer, upstream: Upstream) -> Iterator[GatewayProcess]:
    config = gateway_config(upstream.url, limits={"max_body_bytes": 4096}, upstream={"read_timeout_s": 1})
    process = GatewayProcess(config, redis_url=module_redis.url).start()
    yield process
    process.stop()


async def test_method_path_query_and_body_pass_unchanged(gateway: GatewayProcess, clean_upstream: Upstream) -> None:
    body = b'{"model": "gpt-mock", "x": "\xc3\xa9 \\u0000 raw"}'
    async with aiohttp.ClientSession() as client:
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            url = URL(gateway.url + "/v1/some/path%20x?a=1&b=%2F&a=2", encoded=True)
            async with client.request(
                method, url, data=body, headers={**auth(), "Content-Type": "application/json"}
            ) as r:
                assert r.status == 200, await r.text()
        async with client.get(gateway.url + "/v1/models?limit=5", headers=auth()) as r:
            assert r.status == 200
    methods = [seen.method for seen in clean_upstream.seen]
    assert methods == ["POST", "PUT", "PATCH", "DELETE", "GET"]
    for seen in clean_upstream.seen[:4]:
        assert seen.raw_path == "/v1/some/path%20x?a=1&b=%2F&a=2"
        assert seen.body == body
    assert clean_upstream.seen[4].raw_path == "/v1/models?limit=5"
    assert clean_upstream.seen[4].body == b""


async def test_hop_by_hop_headers_dropped_both_ways(gateway: GatewayProcess, clean_upstream: Upstream) -> None:
    headers = {
        **auth(),
        "Connection": "keep-alive, X-Caller-Hop, X-Forwarded-For",
        "X-Caller-Hop": "secret",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic abc",
        "X-Gateway-Subject": "mallory",
        "X-Gateway-Tier": "internal",
        "X-Kept": "yes",
        "X-Forwarded-For": "6.6.6.6",
    }
    async with aiohttp.ClientSession() as client, client.get(gateway.url + "/v1/models", headers=headers) as r:
        assert r.status == 200
        assert r.headers.get("X-Upstream") == "yes"
        for dropped in ("X-Secret-Hop", "Keep-Alive", "Proxy-Authenticate"):
            assert dropped not in r.headers
        assert r.headers["X-Request-Id"]
    seen = dict((k.lower(), v) for k, v in clean_upstream.seen[0].headers)
    names = [k.lower() for k, _ in clean_upstream.seen[0].headers]
    for dropped in ("x-caller-hop", "keep-alive", "te", "proxy-authorization", "authorization"):
        assert dropped not in seen, dropped
    assert seen["x-kept"] == "yes"
    assert seen["x-gateway-subject"] == "alice" and names.count("x-gateway-subject") == 1
    assert seen["x-gateway-tier"] == "partner" and names.count("x-gateway-tier") == 1
    assert seen["x-gateway-org"] == "acme"
    # The caller is not a trusted proxy: its X-Forwarded-For is replaced, and "Connection: X-Forwarded-For"
    # did not strip the gateway's own.
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"


async def test_request_id_kept_when_valid_and_replaced_when_not(
    gateway: GatewayProcess, clean_upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.get(gateway.url + "/v1/models", headers={**auth(), "X-Request-Id": "abc.DEF-1_2"}) as r:
            assert r.headers["X-Request-Id"] == "abc.DEF-1_2"
        async with client.get(gateway.url + "/v1/models", headers={**auth(), "X-Request-Id": "bad id!"}) as r:
            assert r.headers["X-Request-Id"] != "bad id!"
            generated = r.headers["X-Request-Id"]
    first = {k.lower(): v for k, v in clean_upstream.seen[0].headers}
    second = {k.lower(): v for k, v in clean_upstream.seen[1].headers}
    assert first["x-request-id"] == "abc.DEF-1_2"
    assert second["x-request-id"] == generated


async def test_sse_first_event_arrives_before_upstream_finishes(
    gateway: GatewayProcess, clean_upstream: Upstream
) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.post(gateway.url + "/v1/stream", headers=auth(), json={"model": "gpt-mock"}) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
        # The upstream is still holding the rest of the stream until we release it.
        assert first == b'data: {"n": 1}\n\n'
        assert not clean_upstream.release.is_set()
        clean_upstream.release.set()
        rest = await asyncio.wait_for(r.content.read(), 5)
    assert b'data: {"n": 2}' in rest and rest.endswith(b"data: [DONE]\n\n")


async def test_caller_disconnect_cancels_upstream(gateway: GatewayProcess, clean_upstream: Upstream) -> None:
    client = aiohttp.ClientSession()
    response = await client.post(gateway.url + "/v1/stream", headers=auth(), json={"model": "gpt-mock"})
    await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
    response.close()  # drops the connection mid-stream
    await client.close()
    assert await asyncio.to_thread(clean_upstream.disconnected.wait, 5)


async def test_chunked_response_relayed(gateway: GatewayProcess, clean_upstream: Upstream) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.post(gateway.url + "/chunked", headers=auth(), json=MODEL) as r,
    ):
        assert r.status == 200
        assert await r.read() == b"part0;part1;part2;part3;part4;"


async def _expect_error(response: aiohttp.ClientResponse, status: int, code: str, error_type: str) -> None:
    assert response.status == status, await response.text()
    body = orjson.loads(await response.read())
    assert body["error"]["code"] == code
    assert body["error"]["type"] == error_type
    assert body["error"]["request_id"] == response.headers["X-Request-Id"]
    assert body["error"]["message"]
    assert response.headers["X-Gateway-Reason"] == code
    assert int(response.headers["X-Gateway-Policy-Version"]) >= 1


async def test_body_over_limit_is_413_declared_or_streamed(gateway: GatewayProcess, clean_upstream: Upstream) -> None:
    big = b"x" * 5000

    async def chunks():  # no Content-Length: counted while streaming
        for i in range(0, len(big), 500):
            yield big[i : i + 500]

    async with aiohttp.ClientSession() as client:
        async with client.post(gateway.url + "/v1/chat/completions", data=big, headers=auth()) as r:
            await _expect_error(r, 413, "request_too_large", "invalid_request_error")
        async with client.post(gateway.url + "/v1/chat/completions", data=chunks(), headers=auth()) as r:
            await _expect_error(r, 413, "request_too_large", "invalid_request_error")
    assert clean_upstream.seen == []


async def test_upstream_unreachable_is_502(module_redis: RedisServer) -> None:
    config = gateway_config(f"http://127.0.0.1:{free_port()}")
    process = GatewayProcess(config, redis_url=module_redis.url).start()
    try:
        async with aiohttp.ClientSession() as client, client.get(process.url + "/v1/models", headers=auth()) as r:
            await _expect_error(r, 502, "upstream_unreachable", "upstream_error")
    finally:
        process.stop()


async def test_upstream_silent_is_504_before_start(gateway: GatewayProcess, clean_upstream: Upstream) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.post(gateway.url + "/stall?s=4", headers=auth(), json=MODEL) as r,
    ):
        await _expect_error(r, 504, "upstream_timeout", "upstream_error")


async def test_upstream_silent_mid_stream_ends_with_sse_error_event(
    gateway: GatewayProcess, clean_upstream: Upstream
) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.post(gateway.url + "/stall-mid-stream?s=4", json=MODEL, headers=auth()) as r,
    ):
        assert r.status == 200
        text = (await asyncio.wait_for(r.read(), 10)).decode()
    assert text.startswith('data: {"n": 1}\n\n')
    assert "event: error\ndata: " in text
    error = orjson.loads(text.split("event: error\ndata: ", 1)[1].strip())
    assert error["error"]["code"] == "upstream_timeout"


async def test_slow_header_sender_is_cut(module_redis: RedisServer, upstream: Upstream) -> None:
    config = gateway_config(upstream.url, limits={"header_read_timeout_s": 1})
    process = GatewayProcess(config, redis_url=module_redis.url).start()
    try:
        port = config["listen"]["port"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(10):  # keep dribbling: one header byte per 0.3 s
            try:
                writer.write(b"X")
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.3)
            if reader.at_eof():
                break
        closed = await asyncio.wait_for(reader.read(), 3)
        assert closed == b""  # the server closed without answering the half-sent request
        assert loop.time() - started < 3.5
        writer.close()
        # Meanwhile a normal caller is served.
        async with aiohttp.ClientSession() as client, client.get(process.url + "/v1/models", headers=auth()) as r:
            assert r.status == 200
    finally:
        process.stop()


def test_bad_config_exits_2_naming_the_key(tmp_path: pytest.TempPathFactory) -> None:
    cases = {
        "listen.hostt": {"upstream": {"url": "http://127.0.0.1:1"}, "listen": {"hostt": "x"}},
        "listen.port": {"upstream": {"url": "http://127.0.0.1:1"}, "listen": {"port": -1}},
        "upstream.url": {"upstream": {}},
        "upstream.read_timeout_s": {"upstream": {"url": "http://x", "read_timeout_s": "soon"}},
        "tiers.public.stages": {"upstream": {"url": "http://x"}, "tiers": {"public": {"stages": ["beta"]}}},
    }
    for key, config in cases.items():
        path = tmp_path / "bad.yaml"  # type: ignore[operator]
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, (key, result.stderr)
        assert key in result.stderr, (key, result.stderr)
        assert "Traceback" not in result.stderr


def test_environment_override_names_the_key(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "ok.yaml"  # type: ignore[operator]
    path.write_text(yaml.safe_dump({"upstream": {"url": "http://127.0.0.1:1"}}))
    env = {"GATEWAY_LISTEN__PORT": "not-a-port", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 2
    assert "listen.port" in result.stderr


async def test_sigterm_finishes_in_flight_requests_and_stops_accepting(
    module_redis: RedisServer, upstream: Upstream
) -> None:
    # A request in flight when SIGTERM arrives is answered; new connections are refused; the process
    # exits 0. A request longer than limits.shutdown_grace_s is cut at that bound.
    import signal
    import time

    config = gateway_config(upstream.url, limits={"shutdown_grace_s": 2}, upstream={"read_timeout_s": 10})
    process = GatewayProcess(config, redis_url=module_redis.url).start()
    assert process.proc is not None
    try:
        async with aiohttp.ClientSession() as client:
            finishing = asyncio.ensure_future(client.post(process.url + "/stall?s=1", headers=auth(), json=MODEL))
            cut = asyncio.ensure_future(client.post(process.url + "/stall?s=8", headers=auth(), json=MODEL))
            await asyncio.sleep(0.4)  # both are at the upstream
            started = time.monotonic()
            process.proc.send_signal(signal.SIGTERM)
            response = await finishing
            assert response.status == 200 and await response.text() == "late"
            await asyncio.sleep(0.2)
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as fresh:
                    await fresh.get(process.url + "/v1/models", headers=auth())
            with pytest.raises(aiohttp.ClientError):
                late = await cut
                await late.read()
            assert process.proc.wait(10) == 0
            assert time.monotonic() - started < 2 + 5  # the grace, plus closing clients and the audit flush
    finally:
        process.stop()


async def test_two_workers_serve_from_both_processes(module_redis: RedisServer, upstream: Upstream) -> None:
    config = gateway_config(upstream.url)
    process = GatewayProcess(config, redis_url=module_redis.url, workers=2).start()
    try:
        pids: set[int] = set()
        statuses: list[int] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20  # the second worker may still be starting on a busy machine
        while loop.time() < deadline:
            # A new connection each time, so the kernel spreads them over both listeners.
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as client:
                async with client.get(process.admin_url + "/healthz") as r:
                    pids.add((await r.json())["pid"])
                # A subject of its own each time: this test is about workers, not rate limits.
                async with client.get(process.url + "/v1/models", headers=auth(hs_token(f"w{len(statuses)}"))) as r:
                    statuses.append(r.status)
            if len(pids) >= 2 and len(statuses) >= 20:
                break
        assert len(pids) == 2
        assert set(statuses) == {200}
    finally:
        assert process.stop() == 0


def test_unused_port_helper_is_free() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
