"""Operator console sessions in Redis, so any gateway process serves a signed-in operator.

A session is stored under the SHA-256 of its cookie value (a copy of Redis never holds a usable
cookie), as JSON with the actor, its CSRF token and its absolute expiry; the key's TTL is the
session's idle limit, renewed on use but never past the absolute expiry.
"""

from __future__ import annotations

from typing import Any

import orjson

from .clients import RedisAccess
from .keys import console_session_key


class ConsoleSessions(RedisAccess):
    """Create, read (renewing the idle limit), and end console sessions."""

    async def create_console_session(self, digest: str, record: dict[str, Any], ttl_s: int) -> None:
        key = console_session_key(digest)
        await self._bounded(
            "console", self.client.set(key, orjson.dumps(record), ex=max(ttl_s, 1)), self.policy_timeout_s
        )

    async def console_session(self, digest: str, *, renew_s: int) -> dict[str, Any] | None:
        """The session stored for ``digest``, its TTL set to ``renew_s`` (when above 0), or None."""
        key = console_session_key(digest)

        async def run() -> Any:
            pipe = self.client.pipeline(transaction=True)
            pipe.get(key)
            if renew_s > 0:
                pipe.expire(key, renew_s, xx=True)
            return await pipe.execute()

        raw = (await self._bounded("console", run(), self.policy_timeout_s))[0]
        if raw is None:
            return None
        found = orjson.loads(raw)
        return found if isinstance(found, dict) else None

    async def end_console_session(self, digest: str) -> None:
        await self._bounded("console", self.client.delete(console_session_key(digest)), self.policy_timeout_s)
