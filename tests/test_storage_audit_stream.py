"""The audit stream (gateway/storage/audit_stream.py): appends idempotent per producer and sequence."""

from __future__ import annotations

import orjson

from gateway.storage.store import Store


async def test_appends_are_idempotent_per_producer_and_sequence(redis_url: str) -> None:
    store = Store.from_url(redis_url, timeout_s=1)
    try:
        records = [(seq, orjson.dumps({"request_id": f"r{seq}"})) for seq in range(1, 9)]
        assert await store.append_audit("p1", records[:5], maxlen=1000) == 5
        assert await store.append_audit("p1", records[2:], maxlen=1000) == 3  # 3..5 seen, 6..8 new
        assert await store.append_audit("p1", records, maxlen=1000) == 0
        assert await store.append_audit("p2", records[:2], maxlen=1000) == 2  # another process
        assert await store.audit_length() == 10
        newest = await store.read_audit(3)
    finally:
        await store.close()
    assert [r["request_id"] for r in newest] == ["r2", "r1", "r8"]
