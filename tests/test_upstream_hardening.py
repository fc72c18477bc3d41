"""A hostile model server (docs/hardening.md 18), under both aiohttp HTTP parsers (the client side parses responses).

The upstream here is a raw asyncio socket server of this module's own: it answers each path with bytes
no real HTTP library would send, counts what it was asked, and keeps connections alive so that leftover
bytes could reach the next request if the gateway let them. Whatever it sends, the caller gets either a
well-formed relay of it or the contract's 502; never a 500, never the hostile bytes raw, never a
followed redirect, never a decompressed body.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest

from gateway.redis_server import RedisServer, free_port

from .support.gateway_process import GatewayProcess, gateway_config, seed_policy
from .support.rawhttp import ProtocolViolation, RawConnection, RawResponse, ResponseParser, request
from .support.servers import read_request, serve_in_thread
from .support.tokens import hs_token

PARSERS = {"llhttp": {}, "python": {"AIOHTTP_NO_EXTENSIONS": "1"}}
CHAT = b'{"model": "gpt-mock", "messages": []}'
PARTNER = hs_token("upstream-hardening", tier="partner")  # a token budget: usage is read from responses
INTERNAL = hs_token("upstream-hardening-internal", tier="internal")  # no token budget
BOMB_PLAIN_BYTES = 200 * 1024 * 1024
BOMB = gzip.compress(b"\0" * BOMB_PLAIN_BYTES, compresslevel=6)

Action = bytes | Callable[[asyncio.StreamWriter], Awaitable[bool]]  # an async action returns "keep alive?"


def ok(body: bytes = b"ok", *headers: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def with_header(line: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 2\r\n\r\nok"


async def _chunk_then_garbage(writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"zz\r\nnot a chunk\r\n0\r\n\r\n")
    await writer.drain()
    return False


async def _short_body(writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\nonly ten b")
    await writer.drain()
    await asyncio.sleep(0.05)
    return False


async def _sse_cut(writer: asyncio.StreamWriter) -> bool:
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'10\r\ndata: {"n": 1}\n\n\r\n'
    )
    await writer.drain()
    await asyncio.sleep(0.05)
    return False  # cut without the last chunk


async def _half_head(writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
    await writer.drain()
    return False


async def _nothing(_writer: asyncio.StreamWriter) -> bool:
    return False


RESPONSES: dict[str, Action] = {
    # control characters in the head
    "/cr-in-value": with_header(b"X-Evil: a\rb"),
    "/nul-in-value": with_header(b"X-Evil: a\x00b"),
    "/soh-in-value": with_header(b"X-Evil: a\x01b"),
    "/esc-in-value": with_header(b"X-Evil: \x1b[31mred\x1b[0m"),
    "/del-in-value": with_header(b"X-Evil: a\x7fb"),
    "/vt-in-value": with_header(b"X-Evil: a\x0bb"),
    "/ctl-in-name": with_header(b"X-E\x01vil: a"),
    "/ctl-in-reason": b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok",
    "/space-in-name": with_header(b"X Evil: a"),
    # tolerated line endings and folding: relayed only as clean CRLF lines
    "/bare-lf": b"HTTP/1.1 200 OK\nX-A: b\nContent-Length: 2\n\nok",
    "/obs-fold": b"HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\nContent-Length: 2\r\n\r\nok",
    # framing
    "/bad-first-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "/chunk-then-garbage": _chunk_then_garbage,
    "/short-body": _short_body,
    "/sse-cut": _sse_cut,
    "/conflicting-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\nok"
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmugg",
    "/cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "/negative-length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nok",
    "/extra-after": ok(b"ok") + ok(b"smuggled"),
    # statuses
    "/status-101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nRAW",
    "/status-999": b"HTTP/1.1 999 Private\r\nContent-Length: 2\r\n\r\nok",
    "/status-103": b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + ok(b"after hints"),
    "/status-http2": b"HTTP/2 200 OK\r\nContent-Length: 2\r\n\r\nok",
    # ends early, garbage, overflow
    "/nothing": _nothing,
    "/half-head": _half_head,
    "/garbage": b"HELLO THERE\r\n\r\n",
    "/header-overflow": with_header(b"X-Big: " + b"a" * 100_000),
    "/too-many-headers": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(1000))
    + b"Content-Length: 2\r\n\r\nok",
    "/status-line-overflow": b"HTTP/1.1 200 " + b"O" * 100_000 + b"\r\nContent-Length: 2\r\n\r\nok",
    # redirects and compression
    "/redirect": b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
    "/redirect-303": b"HTTP/1.1 303 See Other\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
    "/gzip": ok(BOMB, b"Content-Type: application/json", b"Content-Encoding: gzip"),
    "/gzip-chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(BOMB):x}".encode() + b"\r\n" + BOMB + b"\r\n0\r\n\r\n"
    ),
}


@dataclass
class HostileUpstream:
    """Answers each path with ``RESPONSES[path]``; counts requests and connections; keeps connections alive."""

    port: int = field(default_factory=free_port)
    responses: dict[str, Action] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    heads: list[bytes] = field(default_factory=list)
    connections: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        self.counts.clear()
        self.heads.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await read_request(reader)
                path = head.split(b" ", 2)[1].decode().split("?")[0]
                self.counts[path] += 1
                self.heads.append(head)
                action = self.responses.get(path, ok(b"normal"))
                if isinstance(action, bytes):
                    writer.write(action)
                    await writer.drain()
                elif not await action(writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def start(self) -> HostileUpstream:
        self._loop, _server, self._thread = serve_in_thread(
            self._serve, self.port, name="hostile-upstream", limit=1 << 20
        )
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileUpstream]:
    server = HostileUpstream(responses=dict(RESPONSES)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def decoy() -> Iterator[HostileUpstream]:
    """Where an absolute redirect points: it must never be contacted."""
    server = HostileUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_redis() -> Iterator[str]:
    with RedisServer() as server:
        seed_policy(server.url)
        yield server.url


@pytest.fixture(scope="module", params=list(PARSERS))
def gw(
    request: pytest.FixtureRequest, module_redis: str, hostile: HostileUpstream, decoy: HostileUpstream
) -> Iterator[GatewayProcess]:
    hostile.responses["/redirect-absolute"] = (
        f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {decoy.url}/stolen\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    config = gateway_config(hostile.url, upstream={"read_timeout_s": 2, "connect_timeout_s": 1})
    gateway = GatewayProcess(config, redis_url=module_redis, env=PARSERS[request.param])
    yield gateway.start()
    gateway.stop()


@pytest.fixture
def clean(hostile: HostileUpstream, decoy: HostileUpstream) -> HostileUpstream:
    hostile.reset()
    decoy.reset()
    decoy.connections = 0
    return hostile


def call(
    gw: GatewayProcess,
    path: str,
    *,
    token: str = PARTNER,
    method: str = "POST",
    headers: list[tuple[str, str]] | None = None,
) -> tuple[list[RawResponse], bool, bytes]:
    """One request with ``Connection: close``: the whole responses, whether the gateway closed, the raw bytes."""
    data = request(
        method,
        path,
        [
            ("Authorization", f"Bearer {token}"),
            ("Content-Type", "application/json"),
            ("Connection", "close"),
            *(headers or []),
        ],
        CHAT if method == "POST" else b"",
    )
    with RawConnection(int(gw.config["listen"]["port"])) as conn:
        conn.send(data)
        deadline = time.monotonic() + 8
        try:
            while conn._fill(deadline):
                pass
        except TimeoutError:
            pass
        raw, closed = bytes(conn.parser.buffer), conn.eof
    parser = ResponseParser()
    parser.feed(raw)
    responses: list[RawResponse] = []
    while True:
        try:
            response = parser.next(eof=True)
        except ProtocolViolation:
            break
        if response is None:
            break
        responses.append(response)
    return responses, closed, raw


def assert_502(responses: list[RawResponse], raw: bytes) -> None:
    assert [r.status for r in responses] == [502], raw[:300]
    response = responses[0]
    body = response.json()
    assert body["error"]["type"] == "upstream_error"
    assert body["error"]["code"] == "upstream_unreachable"
    assert body["error"]["request_id"] == response.header("X-Request-Id")
    assert response.header("X-Gateway-Reason") == "upstream_unreachable"


def assert_clean_head(raw: bytes) -> None:
    """Every line of the head ends in CRLF and holds no control character but HTAB."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.count(b"\n") == head.count(b"\r\n") and head.count(b"\r") == head.count(b"\r\n"), head
    assert not any((b < 0x20 and b not in (0x09, 0x0A, 0x0D)) or b == 0x7F for b in head), head


CONTROL_PATHS = [
    "/cr-in-value",
    "/nul-in-value",
    "/soh-in-value",
    "/esc-in-value",
    "/del-in-value",
    "/vt-in-value",
    "/ctl-in-name",
    "/ctl-in-reason",
    "/space-in-name",
]


@pytest.mark.parametrize("path", CONTROL_PATHS)
def test_control_characters_in_the_response_head_are_never_relayed(
    gw: GatewayProcess, clean: HostileUpstream, path: str
) -> None:
    responses, _, raw = call(gw, path)
    assert_502(responses, raw)
    assert_clean_head(raw)
    assert b"Evil" not in raw and b"\x1b" not in raw
    assert clean.counts[path] == 1


@pytest.mark.parametrize("path", ["/bare-lf", "/obs-fold"])
def test_lenient_line_endings_are_relayed_only_as_clean_lines(
    gw: GatewayProcess, clean: HostileUpstream, path: str
) -> None:
    responses, _, raw = call(gw, path)
    assert_clean_head(raw)
    assert [r.status for r in responses] in ([200], [502])
    if responses[0].status == 200:
        assert responses[0].body == b"ok"
        assert responses[0].header("X-A") in ("b", "b c")
    assert clean.counts[path] == 1


@pytest.mark.parametrize(
    "path",
    [
        "/bad-first-chunk",
        "/conflicting-lengths",
        "/cl-and-te",
        "/negative-length",
        "/status-101",
        "/status-999",
        "/status-http2",
        "/nothing",
        "/half-head",
        "/garbage",
        "/header-overflow",
        "/too-many-headers",
        "/status-line-overflow",
    ],
)
def test_unusable_responses_are_502_with_the_contract_body(
    gw: GatewayProcess, clean: HostileUpstream, path: str
) -> None:
    responses, _, raw = call(gw, path)
    assert_502(responses, raw)
    assert_clean_head(raw)
    assert b"smugg" not in raw and b"RAW" not in raw
    assert clean.counts[path] == 1  # a POST is never retried


def test_interim_responses_are_consumed_and_the_final_one_relayed(gw: GatewayProcess, clean: HostileUpstream) -> None:
    responses, _, raw = call(gw, "/status-103")
    assert [r.status for r in responses] == [200]
    assert responses[0].body == b"after hints"
    assert b"103" not in raw.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("path", ["/chunk-then-garbage", "/short-body"])
def test_a_response_broken_after_it_started_is_cut_not_completed(
    gw: GatewayProcess, clean: HostileUpstream, path: str
) -> None:
    """The status line is out: the only honest signal left is an incomplete message and a closed connection."""
    responses, closed, raw = call(gw, path)
    assert closed
    assert responses == [], "the caller must not be able to read a complete message"
    assert raw.startswith(b"HTTP/1.1 200 ")
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"Content-Length: 100" in head:
        assert len(body) < 100
    else:
        assert b"Transfer-Encoding: chunked" in head and not body.endswith(b"0\r\n\r\n")
    assert b"not a chunk" not in raw
    assert clean.counts[path] == 1


def test_a_stream_broken_mid_way_ends_with_an_sse_error_event(gw: GatewayProcess, clean: HostileUpstream) -> None:
    responses, _, _ = call(gw, "/sse-cut")
    assert [r.status for r in responses] == [200]
    text = responses[0].body.decode()
    assert text.startswith('data: {"n": 1}\n\n')
    assert "event: error\ndata: " in text
    import json

    error = json.loads(text.split("event: error\ndata: ", 1)[1].strip())
    assert error["error"]["code"] == "upstream_unreachable"


@pytest.mark.parametrize(
    ("path", "status", "location"),
    [("/redirect", 302, "/elsewhere"), ("/redirect-303", 303, "/elsewhere"), ("/redirect-absolute", 307, None)],
)
def test_redirects_are_relayed_as_is_and_never_followed(
    gw: GatewayProcess, clean: HostileUpstream, decoy: HostileUpstream, path: str, status: int, location: str | None
) -> None:
    responses, _, _ = call(gw, path)
    assert [r.status for r in responses] == [status]
    assert responses[0].header("Location") == (location or f"{decoy.url}/stolen")
    time.sleep(0.2)
    assert dict(clean.counts) == {path: 1}  # /elsewhere never asked for
    assert decoy.connections == 0


def _rss_kib(gw: GatewayProcess) -> int:
    assert gw.proc is not None
    with open(f"/proc/{gw.proc.pid}/status") as status:  # closed on the early return (ResourceWarning)
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("path", ["/gzip", "/gzip-chunked"])
def test_gzip_bomb_is_relayed_compressed_byte_for_byte(gw: GatewayProcess, clean: HostileUpstream, path: str) -> None:
    before = _rss_kib(gw)
    for token in (PARTNER, INTERNAL):  # with and without a token budget (usage capture on or off)
        responses, _, _ = call(gw, path, token=token, headers=[("Accept-Encoding", "gzip")])
        assert [r.status for r in responses] == [200]
        assert responses[0].header("Content-Encoding") == "gzip"
        assert responses[0].body == BOMB  # the upstream's bytes, not decompressed, not re-encoded
    growth_mib = (_rss_kib(gw) - before) / 1024
    assert growth_mib < 32, f"gateway RSS grew {growth_mib:.0f} MiB on a {BOMB_PLAIN_BYTES >> 20} MiB bomb"
    assert clean.counts[path] == 2


def test_token_budgets_ask_the_upstream_for_an_uncompressed_answer(gw: GatewayProcess, clean: HostileUpstream) -> None:
    """Usage is read from the response as it passes; a compressed one would hide it from the budget."""
    for token, expected in ((PARTNER, b"accept-encoding: identity"), (INTERNAL, b"accept-encoding: gzip, br")):
        clean.reset()
        call(gw, "/plain", token=token, headers=[("Accept-Encoding", "gzip, br")])
        head = clean.heads[0].lower()
        assert head.count(b"accept-encoding:") == 1
        assert expected in head, head


def test_leftover_bytes_after_a_response_never_reach_another_caller(gw: GatewayProcess, clean: HostileUpstream) -> None:
    bodies = []
    for path in ("/extra-after", "/normal", "/normal", "/conflicting-lengths", "/normal", "/normal"):
        responses, _, _ = call(gw, path)
        bodies.append(responses[0].body if responses else None)
    assert bodies[0] == b"ok" and bodies[1:3] == [b"normal", b"normal"] and bodies[4:] == [b"normal", b"normal"]
    assert not any(b and b"smugg" in b for b in bodies)


def test_the_gateway_never_failed_unhandled(gw: GatewayProcess) -> None:
    """Nothing above made the gateway answer 500 (an unhandled error is logged before any 500)."""
    assert "unhandled error" not in gw.log_path.read_text(errors="replace")
