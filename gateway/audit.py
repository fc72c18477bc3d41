"""The audit trail: one record per decision, batched off the hot path into a Redis stream."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson

from .settings import AuditSettings
from .store import Store, StoreUnavailable

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("gateway.audit")


class AuditLog:
    """A bounded in-memory queue drained every ``flush_ms`` to the audit stream."""

    def __init__(self, store: Store, settings: AuditSettings, *, metrics: Metrics) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self._queue: deque[bytes] = deque()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._drain_loop(), name="audit-drain")

    def record(self, fields: dict[str, Any]) -> None:
        self._queue.append(orjson.dumps(fields))

    async def flush(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), 1000))]
            try:
                await self.store.append_audit(batch, maxlen=self.settings.stream_maxlen)
            except StoreUnavailable:
                self._queue.extendleft(reversed(batch))
                raise

    async def _drain_loop(self) -> None:
        interval = self.settings.flush_ms / 1000
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush()
            except StoreUnavailable as exc:
                log.warning("audit flush failed: %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            await self.flush()
        except StoreUnavailable:
            log.error("audit records not flushed at shutdown: %d", len(self._queue))
