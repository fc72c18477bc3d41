"""The forwarder's upstream client (gateway/upstream_client.py) against raw loopback servers.

Each server here is an asyncio TCP server in the test's own loop that answers with exact bytes and
records what it was sent and how many connections it saw, so pooling, framing, limits and timeouts
are checked on the wire. (The hostile answers a gateway must never relay are in
test_upstream_hardening.py, through a real gateway process.)
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from multidict import CIMultiDict

from gateway.upstream_client import (
    MAX_HEAD_BYTES,
    UpstreamConnectError,
    UpstreamPayloadError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeoutError,
    origin,
)

from .support.topology import make_tls_files

Answer = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # request head -> keep the connection?


def ok(body: bytes = b"ok", *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(h + b"\r\n" for h in extra)
    return head + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


def send(data: bytes, keep: bool = True) -> Answer:
    async def answer(_head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        await writer.drain()
        return keep

    return answer


@dataclass
class RawServer:
    """Answers every request with ``answer``; records request heads, connections and those open at once."""

    answer: Answer
    heads: list[bytes] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    closed_by_client: int = 0
    server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        head += await reader.readexactly(int(line.split(b":")[1]))
                self.heads.append(head)
                if not await self.answer(head, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client += 1
        finally:
            self.open_now -= 1
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Answer], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(answer: Answer) -> RawServer:
        raw = RawServer(answer)
        raw.server = await asyncio.start_server(raw._serve, "127.0.0.1", 0)
        servers.append(raw)
        return raw

    yield start
    for raw in servers:
        assert raw.server is not None
        raw.server.close()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    upstream = UpstreamPool(limit=10, connect_timeout_s=1.0, read_timeout_s=1.0)
    yield upstream
    await upstream.close()


async def body_of(response: UpstreamResponse) -> bytes:
    chunks = [chunk async for chunk in response.content.iter_any()]
    response.release()
    return b"".join(chunks)


async def get(pool: UpstreamPool, url: str, method: str = "GET", body: bytes = b"", **headers: str) -> bytes:
    response = await pool.request(origin(url), method, "/x?a=1", CIMultiDict(headers), body)
    return await body_of(response)


async def test_requests_share_one_kept_alive_connection(
    serve: Callable[[Answer], Awaitable[RawServer]], pool: UpstreamPool
) -> None:
    raw = await serve(send(ok(b"hello")))
    for _ in range(5):
        assert await get(pool, raw.url) == b"hello"
    assert raw.connections == 1
    assert len(raw.heads) == 5


async def test_the_request_is_exactly_the_line_host_fields_length_and_body(
    serve: Callable[[Answer], Awaitable[RawServer]], pool: UpstreamPool
) -> None:
    raw = await serve(send(ok()))
    port = raw.url.rsplit(":", 1)[1]
    await get(pool, raw.url, "POST", b'{"a":1}', **{"X-One": "1", "Content-Type": "application/json"})
    await get(pool, raw.url, "POST")  # an empty POST still says its length
    await get(pool, raw.url, "GET")  # an empty GET does not
    assert (
        raw.heads[0]
        == (
            f"POST /x?a=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-One: 1\r\nContent-Type: application/json\r\n"
            'Content-Length: 7\r\n\r\n{"a":1}'
        ).encode()
    )
    assert raw.heads[1].endswith(b"\r\nContent-Length: 0\r\n\r\n")
    assert b"content-length" not in raw.heads[2].lower()


async def test_a_base_url_with_a_path_prefixes_every_target(
    serve: Callable[[Answer], Awaitable[RawServer]], pool: UpstreamPool
) -> None:
    raw = await serve(send(ok()))
    await get(pool, raw.url + "/openai")
    assert raw.heads[0].startswith(b"GET /openai/x?a=1 HTTP/1.1\r\n")


async def test_a_line_break_in_a_field_is_refused_before_anything_is_sent(
    serve: Callable[[Answer], Awaitable[RawServer]], pool: UpstreamPool
) -> None:
    raw = await serve(send(ok()))
    for value in ("a\r\nX-Injected: 1", "a\rb", "a\nb"):
        with pytest.raises(UpstreamProtocolError):
            await get(pool, raw.url, **{"X-Value": value})
    assert raw.heads == [] and raw.connections == 0


async def test_never_more_connections_than_the_limit(serve: Callable[[Answer], Awaitable[RawServer]]) -> None:
    async def slow(_head: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)
        writer.write(ok(b"slow"))
        return True

    raw = await serve(slow)
    limited = UpstreamPool(limit=2, connect_timeout_s=1.0, read_timeout_s=2.0)
    try:
        bodies = await asyncio.gather(*(get(limited, raw.url) for _ in range(8)))
    finally:
        await limited.close()
    assert bodies == [b"slow"] * 8
    assert raw.most_open <= 2 and raw.connections == 2


async def test_an_idle_connection_to_one_server_gives_its_place_to_another(
    serve: Callable[[Answer], Awaitable[RawServer]],
) -> None:
    first, second = await serve(send(ok(b"one"))), await serve(send(ok(b"two")))
    single = UpstreamPool(limit=1, connect_timeout_s=1.0, read_timeout_s=1.0)
    try:
        assert await get(single, first.url) == b"one"  # its connection now idles in the pool
        assert await asyncio.wait_for(get(single, second.url), 2) == b"two"
        assert await asyncio.wait_for(get(single, first.url), 2) == b"one"
    finally:
        await single.close()
    assert first.connections == 2 and second.connections == 1


async def test_a_head_answer_ends_at_its_head_and_the_connection_is_reused(
    serve: Callable[[Answer], Awaitable[RawServer]], pool: UpstreamPool
) -> None:
    raw = await serve(send(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"))
    for _ in range(2):
        response = await pool.request(origin(raw.url), "HEAD", "/", CIMultiDict(), b"")
        assert response.status == 200 and response.content_length == 1234
        assert await asyncio.wait_for(body_of(response), 1) == b""
    assert raw.connections == 1


async def test_a_body_framed_by_the_close_ends_with_it_and_is_not_reused(
    serve: Callable[[Answer], Awaitable[RawServer]], pool: UpstreamPool
) -> None:
    raw = await serve(send(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", keep=False))
    assert await get(pool, raw.url) == b"until the end"
    assert await get(pool, raw.url) == b"until the end"
    assert raw.connections == 2


async def test_a_chunked_body_arrives_in_order(
    serve: Callable[[Answer], Awaitable[RawServer]], pool: UpstreamPool
) -> None:
    async def chunked(_head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"one ", b"two ", b"three"):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        return True

    raw = await serve(chunked)
    assert await get(pool, raw.url) == b"one two three"
    assert await get(pool, raw.url) == b"one two three"
    assert raw.connections == 1


async def test_silence_before_the_head_and_within_the_body_is_a_timeout(
    serve: Callable[[Answer], Awaitable[RawServer]],
) -> None:
    async def silent(head: bytes, writer: asyncio.StreamWriter) -> bool:
        if b"/mid" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await asyncio.sleep(3)
        return False

    raw = await serve(silent)
    quick = UpstreamPool(limit=4, connect_timeout_s=1.0, read_timeout_s=0.3)
    try:
        with pytest.raises(UpstreamTimeoutError):
            await quick.request(origin(raw.url), "GET", "/head", CIMultiDict(), b"")
        response = await quick.request(origin(raw.url), "GET", "/mid", CIMultiDict(), b"")
        chunks = []
        with pytest.raises(TimeoutError):
            async for chunk in response.content.iter_any():
                chunks.append(chunk)
        response.release()
        assert chunks == [b"half"]
    finally:
        await quick.close()


async def test_a_body_cut_short_is_an_error_not_an_end(
    serve: Callable[[Answer], Awaitable[RawServer]], pool: UpstreamPool
) -> None:
    raw = await serve(send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b", keep=False))
    response = await pool.request(origin(raw.url), "GET", "/", CIMultiDict(), b"")
    with pytest.raises(UpstreamPayloadError):
        await body_of(response)


async def test_bytes_after_an_answer_never_reach_the_next_request(
    serve: Callable[[Answer], Awaitable[RawServer]], pool: UpstreamPool
) -> None:
    async def smuggle(head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(ok(b"first") + ok(b"smuggled") if b"/first" in head else ok(b"second"))
        return True

    raw = await serve(smuggle)
    first = await pool.request(origin(raw.url), "GET", "/first", CIMultiDict(), b"")
    assert await body_of(first) == b"first"
    second = await pool.request(origin(raw.url), "GET", "/second", CIMultiDict(), b"")
    assert await body_of(second) == b"second"
    assert raw.connections == 2


async def test_interim_answers_are_skipped(serve: Callable[[Answer], Awaitable[RawServer]], pool: UpstreamPool) -> None:
    raw = await serve(send(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(b"final", b"X-Final: 1")))
    response = await pool.request(origin(raw.url), "GET", "/", CIMultiDict(), b"")
    assert response.status == 200 and response.headers["X-Final"] == "1" and "Link" not in response.headers
    assert await body_of(response) == b"final"


async def test_an_endless_head_is_refused_within_its_bound(
    serve: Callable[[Answer], Awaitable[RawServer]], pool: UpstreamPool
) -> None:
    async def endless(_head: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(MAX_HEAD_BYTES // 1000 + 10):
            writer.write(b"X-%d: %s\r\n" % (i % 100, b"v" * 990))
            await writer.drain()
            await asyncio.sleep(0)
        await asyncio.sleep(1)
        return False

    raw = await serve(endless)
    with pytest.raises(UpstreamProtocolError):
        await pool.request(origin(raw.url), "GET", "/", CIMultiDict(), b"")


async def test_a_cancelled_request_closes_its_connection(pool: UpstreamPool) -> None:
    asked = asyncio.Event()
    ended = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        asked.set()
        if await reader.read() == b"":  # no answer is sent: the client's close is the only event
            ended.set()
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        task = asyncio.create_task(pool.request(origin(f"http://127.0.0.1:{port}"), "GET", "/", CIMultiDict(), b""))
        await asyncio.wait_for(asked.wait(), 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(ended.wait(), 2)  # the model server sees the request end
    finally:
        server.close()


async def test_a_connection_the_server_closed_while_idle_is_not_used(
    serve: Callable[[Answer], Awaitable[RawServer]], pool: UpstreamPool
) -> None:
    raw = await serve(send(ok(b"x"), keep=True))
    assert await get(pool, raw.url) == b"x"
    assert raw.server is not None
    # The server drops its side of the idle connection; the next request opens a new one.
    raw.answer = send(ok(b"y"), keep=False)
    assert await get(pool, raw.url) == b"y"  # still on the kept connection, which then closes
    await asyncio.sleep(0.05)
    assert await get(pool, raw.url) == b"y"
    assert raw.connections == 2


async def test_nothing_listening_is_a_connect_error(pool: UpstreamPool) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(UpstreamConnectError):
        await pool.request(origin(f"http://127.0.0.1:{port}"), "GET", "/", CIMultiDict(), b"")


async def test_https_upstreams_are_verified(
    tmp_path: Path, pool: UpstreamPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model server whose certificate no trusted authority signed is never talked to; one that is is."""
    tls = make_tls_files(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.server_cert, tls.server_key)
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(ok(b"over tls"))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=context)
    url = f"https://localhost:{server.sockets[0].getsockname()[1]}"
    try:
        with pytest.raises(UpstreamConnectError):
            await pool.request(origin(url), "GET", "/", CIMultiDict(), b"")
        assert seen == []
        # The same server, its authority now trusted (the default context reads SSL_CERT_FILE).
        monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))
        trusting = UpstreamPool(limit=2, connect_timeout_s=1.0, read_timeout_s=1.0)
        try:
            assert await get(trusting, url) == b"over tls"
        finally:
            await trusting.close()
        assert len(seen) == 1 and seen[0].startswith(b"GET /x?a=1 HTTP/1.1\r\nHost: localhost:")
    finally:
        server.close()


NGINX_SITE = """
server {
    listen 127.0.0.1:{port};
    keepalive_requests 10000;
    location = /status { stub_status; }
    location = /big.json { root {dir}; default_type application/json; }
    location = /gz/big.json { alias {dir}/big.json; default_type application/json;
                              gzip on; gzip_types application/json; gzip_min_length 1; }
    location = /echo {
        return 200 "$request_method $request_uri host=$http_host length=$content_length x=$http_x_one\\n";
    }
}
"""


def _accepted(status: bytes) -> int:
    """Connections nginx accepted, from its stub_status page."""
    return int(status.split(b"\n")[2].split()[0])


async def test_a_real_nginx_as_the_model_server(pool: UpstreamPool) -> None:
    """Framing as an independent HTTP server writes it: lengths, HEAD, chunked gzip, keep-alive reuse."""
    import gzip as gzip_module

    from .support.dataplanes import running_nginx_site

    with running_nginx_site(NGINX_SITE) as (port, directory):
        document = b'{"data": [' + b",".join(b'{"id": "model-%d"}' % i for i in range(8000)) + b"]}"
        (directory / "big.json").write_bytes(document)
        base = origin(f"http://127.0.0.1:{port}")

        async def ask(method: str, target: str, body: bytes = b"", **headers: str) -> UpstreamResponse:
            return await pool.request(base, method, target, CIMultiDict(headers), body)

        before = _accepted(await body_of(await ask("GET", "/status")))
        for _ in range(5):
            response = await ask("GET", "/big.json")
            assert response.status == 200 and response.content_length == len(document)
            assert await body_of(response) == document
        head = await ask("HEAD", "/big.json")
        assert head.content_length == len(document)
        assert await asyncio.wait_for(body_of(head), 2) == b""
        packed = await ask("GET", "/gz/big.json", **{"Accept-Encoding": "gzip"})
        assert packed.headers["Content-Encoding"] == "gzip" and packed.headers["Transfer-Encoding"] == "chunked"
        assert gzip_module.decompress(await body_of(packed)) == document
        echoed = await body_of(await ask("POST", "/echo?a=%2F", b'{"model": "m"}', **{"X-One": "1"}))
        assert echoed == f"POST /echo?a=%2F host=127.0.0.1:{port} length=14 x=1\n".encode()
        after = _accepted(await body_of(await ask("GET", "/status")))
        assert after == before  # every request above rode the one kept-alive connection
