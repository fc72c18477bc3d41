"""Console sign-in sessions: a random cookie value, stored in Redis under its SHA-256 (gateway/storage),
with the actor it signed in as, its CSRF token and its absolute end.

The cookie is ``HttpOnly`` and ``SameSite=Strict``, and ``Secure`` whenever the browser reached us
over TLS. A session ends at sign-out, after ``IDLE_S`` without a page, and ``MAX_AGE_S`` after sign-in
whatever happens; all three are enforced by Redis and by the record, never by the cookie alone.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..storage.console_sessions import ConsoleSessions

COOKIE = "gw_console"
# Before sign-in: the sign-in form's CSRF token, kept in a cookie of its own (double submit).
SIGNIN_COOKIE = "gw_console_signin"
MAX_AGE_S = 8 * 3600
IDLE_S = 30 * 60
COOKIE_PATH = "/console"


def digest_of(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    actor: str
    csrf: str
    created_at: float
    ends_at: float
    digest: str

    def csrf_ok(self, sent: str | None) -> bool:
        return bool(sent) and hmac.compare_digest(self.csrf.encode(), (sent or "").encode("utf-8", "replace"))


SESSION_KEY: web.RequestKey[ConsoleSession] = web.RequestKey("console_session", ConsoleSession)


class SessionStore:
    """Sessions over the store; ``clock`` is the wall clock (epoch seconds)."""

    def __init__(self, store: ConsoleSessions, *, clock: Any = time.time) -> None:
        self.store = store
        self.clock = clock

    async def create(self, actor: str) -> tuple[str, ConsoleSession]:
        """A new session for ``actor``: the cookie value (shown to the browser only) and the session."""
        value = secrets.token_urlsafe(32)
        now = self.clock()
        csrf, ends = secrets.token_urlsafe(32), now + MAX_AGE_S
        session = ConsoleSession(actor=actor, csrf=csrf, created_at=now, ends_at=ends, digest=digest_of(value))
        record = {"actor": actor, "csrf": session.csrf, "created_at": now, "ends_at": session.ends_at}
        await self.store.create_console_session(session.digest, record, min(IDLE_S, MAX_AGE_S))
        return value, session

    async def find(self, value: str | None) -> ConsoleSession | None:
        """The live session a cookie value names, its idle limit renewed; None when there is none."""
        if not value or len(value) > 200:
            return None
        digest = digest_of(value)
        now = self.clock()
        record = await self.store.console_session(digest, renew_s=IDLE_S)
        if record is None:
            return None
        ends_at = float(record.get("ends_at", 0))
        if now >= ends_at:
            await self.store.end_console_session(digest)
            return None
        return ConsoleSession(
            actor=str(record["actor"]),
            csrf=str(record["csrf"]),
            created_at=float(record.get("created_at", 0)),
            ends_at=ends_at,
            digest=digest,
        )

    async def end(self, session: ConsoleSession) -> None:
        await self.store.end_console_session(session.digest)


def set_cookie(response: web.StreamResponse, name: str, value: str, *, secure: bool, max_age: int) -> None:
    response.set_cookie(name, value, path=COOKIE_PATH, httponly=True, samesite="Strict", secure=secure, max_age=max_age)


def clear_cookie(response: web.StreamResponse, name: str, *, secure: bool) -> None:
    response.del_cookie(name, path=COOKIE_PATH, httponly=True, samesite="Strict", secure=secure)
