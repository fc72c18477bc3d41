"""The :class:`Store` the rest of the gateway uses: policy, audit stream and scripts over one Redis."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from typing import Any

from .archive_stream import ArchiveStream
from .audit_search import AuditSearch
from .audit_stream import AuditStream
from .change_requests import ChangeRequestStore
from .clients import build_client
from .console_sessions import ConsoleSessions
from .wire import RespConnection

# The URL forms a lean RESP connection can serve (it speaks to one server; Sentinel and
# Cluster need redis-py's discovery and routing).
WIRE_SCHEMES = ("redis://", "rediss://", "unix://")


class Store(ChangeRequestStore, AuditStream, AuditSearch, ArchiveStream, ConsoleSessions):
    """Async access to the gateway's Redis; every call is bounded by a deadline.

    Its parts share one client, one set of deadlines and one failure count
    (:class:`~gateway.storage.clients.RedisAccess`), so they are combined as bases rather than
    held as members: each part's methods read as they did.
    """

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float,
        password: str | None = None,
        tls: Mapping[str, Any] | None = None,
        policy_timeout_s: float = 2.0,
        lean_wire: bool = False,
        ssl_context: Callable[[], ssl.SSLContext] | None = None,
        audit_shards: int = 1,
    ) -> Store:
        """A store on ``redis://``, ``rediss://``, ``unix://``, Sentinel or Cluster URLs (see README).

        ``lean_wire``: send the hot path's script calls over a lean RESP connection the store owns
        (standalone URLs only; see :mod:`gateway.storage.scripts`). ``ssl_context`` makes its TLS
        context for ``rediss://``. ``audit_shards``: ``audit.shards``, the shards this store's audit
        appends spread over (each producer to one) and its reads merge (at least).
        """
        wire = None
        if lean_wire and url.startswith(WIRE_SCHEMES):
            context = ssl_context() if ssl_context is not None and url.startswith("rediss://") else None
            wire = RespConnection(url, deadline_s=timeout_s, password=password, ssl_context=context)
        store = cls(
            build_client(url, password=password, tls=tls),
            timeout_s=timeout_s,
            policy_timeout_s=policy_timeout_s,
            wire=wire,
        )
        store.audit_shards = audit_shards
        return store
