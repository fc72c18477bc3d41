"""Revocation reaches live streams: a policy write through the admin API that refuses a request in flight
ends it within a second (SSE with a last error event, any other response cut), the model server's request
is closed and the audit record says so; requests the write does not refuse keep flowing."""

from __future__ import annotations

import asyncio
import copy
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.redis_server import RedisServer

from .support.gateway_process import ADMIN_TOKEN, BASE_POLICY, GatewayProcess, gateway_config, seed_policy
from .support.tokens import auth, hs_token
from .support.upstream import Upstream
from .support.waiting import wait_until

GENERAL = {"stage": "general", "timeline": [], "allowed_countries": None, "export_suspended": False}
# One model per test: the tests share a gateway and may run in any order.
MODELS = ("frontier-sse", "frontier-chunked", "frontier-waiting", "frontier-entity", "frontier-key", "frontier-unread")
POLICY: dict[str, Any] = copy.deepcopy(BASE_POLICY)
POLICY["models"].update({name: GENERAL for name in MODELS})
ENDED_WITHIN_S = 1.0


@pytest.fixture(scope="module")
def gateway(upstream: Upstream) -> Iterator[GatewayProcess]:
    with RedisServer() as redis:
        seed_policy(redis.url, POLICY)
        # A slow model server must not time out under the streams these tests hold open.
        config = gateway_config(upstream.url, upstream={"read_timeout_s": 30}, audit={"flush_ms": 20})
        gateway = GatewayProcess(config, redis_url=redis.url).start()
        try:
            yield gateway
        finally:
            gateway.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@dataclass
class Stream:
    """A response being read in the background: what arrived, when, and how it ended."""

    response: aiohttp.ClientResponse
    data: bytearray = field(default_factory=bytearray)
    arrivals: list[float] = field(default_factory=list)
    ended_at: float | None = None
    error: BaseException | None = None
    task: asyncio.Task[None] | None = None

    @property
    def request_id(self) -> str:
        return self.response.headers["X-Request-Id"]

    async def _read(self) -> None:
        try:
            async for chunk in self.response.content.iter_any():
                self.data += chunk
                self.arrivals.append(time.monotonic())
        except aiohttp.ClientPayloadError as exc:  # a cut connection
            self.error = exc
        finally:
            self.response.release()
        self.ended_at = time.monotonic()

    def events(self) -> list[bytes]:
        return [event for event in bytes(self.data).split(b"\n\n") if event]

    def arrived_after(self, instant: float) -> int:
        return sum(1 for at in self.arrivals if at > instant)

    async def ended(self, within: float = 5.0) -> float:
        assert self.task is not None
        await asyncio.wait_for(asyncio.shield(self.task), within)
        assert self.ended_at is not None
        return self.ended_at

    async def close(self) -> None:
        self.response.close()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


async def open_stream(
    session: aiohttp.ClientSession,
    gateway: GatewayProcess,
    token: str,
    model: str,
    *,
    request_id: str,
    path: str = "/v1/slow-stream",
) -> Stream:
    """A streaming request whose first event has arrived, read on in the background."""
    response = await session.post(
        gateway.url + path,
        json={"model": model, "stream": True, "messages": []},
        headers={**auth(token), "X-Request-Id": request_id},
    )
    assert response.status == 200, await response.text()
    stream = Stream(response)
    stream.task = asyncio.create_task(stream._read())
    await wait_until(lambda: stream.data, 5.0)
    return stream


class Admin:
    def __init__(self, session: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
        self.session, self.base = session, gateway.admin_url

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(
            method, self.base + path, json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as response:
            answer = orjson.loads(await response.read())
            assert response.status == 200, answer
            return answer

    async def audit_record(self, request_id: str) -> dict[str, Any]:
        found: dict[str, Any] = {}

        async def recorded() -> bool:
            for record in (await self.call("GET", "/admin/v1/audit?limit=200"))["records"]:
                if record["request_id"] == request_id:
                    found.update(record)
                    return True
            return False

        await wait_until(recorded, 5.0)
        return found

    async def revoked_count(self, code: str) -> float:
        async with self.session.get(self.base + "/metrics") as response:
            text = await response.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "gateway_revoked_requests_total" and sample.labels == {"code": code}:
                    return sample.value
        raise AssertionError(f"gateway_revoked_requests_total{{code={code!r}}} not exposed")


async def write_and_time(write: Callable[[], Awaitable[Any]]) -> float:
    """Make the policy write; the instant it was sent."""
    sent = time.monotonic()
    await write()
    return sent


async def assert_sse_revoked(
    stream: Stream, sent: float, code: str, status: int, admin: Admin, upstream: Upstream
) -> dict[str, Any]:
    """``stream`` ended within a second of the write, with a last error event carrying ``code``; the model
    server saw its request closed; the audit record says it was revoked. Returns the error body."""
    ended = await stream.ended()
    assert ended - sent < ENDED_WITHIN_S, f"ended {ended - sent:.3f} s after the write"
    assert stream.error is None  # ended cleanly: the last event, then the end of the stream
    *flowed, last = stream.events()
    assert flowed and all(event.startswith(b"data: {") for event in flowed)
    name, data = last.split(b"\n", 1)
    assert name == b"event: error", last
    assert data.startswith(b"data: ")
    body = orjson.loads(data[len(b"data: ") :])
    assert set(body["error"]) == {"message", "type", "code", "request_id"}
    assert body["error"]["code"] == code
    assert body["error"]["request_id"] == stream.request_id
    await wait_until(lambda: stream.request_id in upstream.cut_off, 2.0)
    record = await admin.audit_record(stream.request_id)
    assert record["revoked"] is True
    assert (record["decision"], record["code"], record["status"], record["upstream_status"]) == (
        "block",
        code,
        status,
        200,
    )
    return body


async def assert_still_flowing(streams: list[Stream], since: float) -> None:
    """Each of ``streams`` keeps receiving events after ``since`` and never got an error event."""
    await asyncio.sleep(0.6)
    for stream in streams:
        assert stream.ended_at is None, stream.events()[-1:]
        assert stream.arrived_after(since) >= 3
        assert all(not event.startswith(b"event: error") for event in stream.events())
        await stream.close()


async def test_export_suspension_ends_a_live_sse_stream_abroad_and_spares_the_others(
    gateway: GatewayProcess, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    admin = Admin(session, gateway)
    before = await admin.revoked_count("export_suspended")
    abroad = hs_token("carol", country="FR")
    revoked = await open_stream(session, gateway, abroad, "frontier-sse", request_id="revoke-sse-abroad")
    at_home = await open_stream(
        session, gateway, hs_token("dave", country="US"), "frontier-sse", request_id="revoke-sse-home"
    )
    other_model = await open_stream(session, gateway, abroad, "gpt-mock", request_id="revoke-sse-other-model")
    sent = await write_and_time(
        lambda: admin.call("PATCH", "/admin/v1/models/frontier-sse", {"export_suspended": True})
    )
    body = await assert_sse_revoked(revoked, sent, "export_suspended", 200, admin, upstream)
    assert "FR" in body["error"]["message"]
    assert body["error"]["type"]
    await assert_still_flowing([at_home, other_model], sent)
    assert await admin.revoked_count("export_suspended") == before + 1


async def test_denying_the_callers_entity_ends_its_live_stream(
    gateway: GatewayProcess, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    admin = Admin(session, gateway)
    denied = await open_stream(
        session, gateway, hs_token("erin", org="rev-org"), "frontier-entity", request_id="revoke-entity"
    )
    other_org = await open_stream(
        session, gateway, hs_token("frank", org="fine-org"), "frontier-entity", request_id="revoke-entity-other"
    )
    sent = await write_and_time(
        lambda: admin.call("PUT", "/admin/v1/lists/deny-entities/rev-org", {"reason": "test", "source": "test"})
    )
    await assert_sse_revoked(denied, sent, "entity_denied", 200, admin, upstream)
    await assert_still_flowing([other_org], sent)


async def test_revoking_an_api_key_ends_the_stream_it_opened(
    gateway: GatewayProcess, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    admin = Admin(session, gateway)
    issued = await admin.call(
        "POST", "/admin/v1/api-keys", {"subject": "svc-rev", "org": "acme", "country": "US", "tier": "partner"}
    )
    other = await admin.call(
        "POST", "/admin/v1/api-keys", {"subject": "svc-kept", "org": "acme", "country": "US", "tier": "partner"}
    )

    async def key_works() -> bool:
        async with session.get(gateway.url + "/v1/models", headers=auth(issued["key"])) as response:
            return response.status == 200

    await wait_until(key_works, 5.0)
    with_key = await open_stream(session, gateway, issued["key"], "frontier-key", request_id="revoke-key")
    other_key = await open_stream(session, gateway, other["key"], "frontier-key", request_id="revoke-key-other")
    with_jwt = await open_stream(session, gateway, hs_token("gina"), "frontier-key", request_id="revoke-key-jwt")
    sent = await write_and_time(lambda: admin.call("DELETE", f"/admin/v1/api-keys/{issued['id']}"))
    await assert_sse_revoked(with_key, sent, "unauthenticated", 200, admin, upstream)
    record = await admin.audit_record(with_key.request_id)
    assert record["key_id"] == issued["id"]
    await assert_still_flowing([other_key, with_jwt], sent)


async def test_a_revoked_chunked_response_is_cut(
    gateway: GatewayProcess, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    admin = Admin(session, gateway)
    stream = await open_stream(
        session,
        gateway,
        hs_token("hank", country="FR"),
        "frontier-chunked",
        request_id="revoke-chunked",
        path="/v1/slow-chunked",
    )
    sent = await write_and_time(
        lambda: admin.call("PATCH", "/admin/v1/models/frontier-chunked", {"export_suspended": True})
    )
    ended = await stream.ended()
    assert ended - sent < ENDED_WITHIN_S
    assert isinstance(stream.error, aiohttp.ClientPayloadError)  # cut: the chunked body never ended
    assert bytes(stream.data).startswith(b"part0;") and b"event:" not in stream.data
    await wait_until(lambda: "revoke-chunked" in upstream.cut_off, 2.0)
    record = await admin.audit_record("revoke-chunked")
    assert (record["revoked"], record["decision"], record["code"], record["status"]) == (
        True,
        "block",
        "export_suspended",
        200,
    )


async def test_a_request_revoked_before_its_response_began_is_refused(
    gateway: GatewayProcess, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    admin = Admin(session, gateway)

    async def ask() -> tuple[int, dict[str, Any], float]:
        async with session.post(
            gateway.url + "/v1/slow-stream?wait=20",
            json={"model": "frontier-waiting", "messages": []},
            headers={**auth(hs_token("ivy", country="FR")), "X-Request-Id": "revoke-waiting"},
        ) as response:
            return response.status, orjson.loads(await response.read()), time.monotonic()

    asking = asyncio.create_task(ask())
    await wait_until(lambda: "revoke-waiting" in {seen_id(seen) for seen in upstream.seen}, 5.0)
    sent = await write_and_time(
        lambda: admin.call("PATCH", "/admin/v1/models/frontier-waiting", {"export_suspended": True})
    )
    status, body, answered = await asyncio.wait_for(asking, 5.0)
    assert answered - sent < ENDED_WITHIN_S
    assert (status, body["error"]["code"], body["error"]["request_id"]) == (451, "export_suspended", "revoke-waiting")
    await wait_until(lambda: "revoke-waiting" in upstream.cut_off, 2.0)
    record = await admin.audit_record("revoke-waiting")
    assert (record["revoked"], record["decision"], record["code"], record["status"]) == (
        True,
        "block",
        "export_suspended",
        451,
    )
    assert record["upstream_status"] is None


async def test_a_revoked_stream_whose_caller_stopped_reading_is_cut(
    gateway: GatewayProcess, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    """A caller that reads nothing fills the buffers, so the last event cannot be written: the connection is
    cut instead, still within the second, and the request still ends as revoked."""
    admin = Admin(session, gateway)
    body = orjson.dumps({"model": "frontier-unread", "stream": True, "messages": []})
    head = (
        f"POST /v1/slow-stream?every=0.001&pad=16384&events=100000 HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {hs_token('jill', country='FR')}\r\nX-Request-Id: revoke-unread\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", gateway.config["listen"]["port"]))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.sendall(head + body)
        # Never read: the gateway's writes to this caller back up once the buffers are full.
        await wait_until(lambda: "revoke-unread" in {seen_id(seen) for seen in upstream.seen}, 5.0)
        await asyncio.sleep(0.5)
        sent = await write_and_time(
            lambda: admin.call("PATCH", "/admin/v1/models/frontier-unread", {"export_suspended": True})
        )
        record = await admin.audit_record("revoke-unread")
        assert time.monotonic() - sent < ENDED_WITHIN_S + 0.5  # ended within the second (plus the audit flush)
        assert (record["revoked"], record["decision"], record["code"], record["status"]) == (
            True,
            "block",
            "export_suspended",
            200,
        )
        await wait_until(lambda: "revoke-unread" in upstream.cut_off, 2.0)
    finally:
        sock.close()


def seen_id(seen: Any) -> str:
    return next((value for name, value in seen.headers if name.lower() == "x-request-id"), "")
