"""Keeps this process's policy snapshot current: pub/sub wake-ups plus a short version poll.

The poll confirms the version every ``poll_interval_s``; the time of the last
confirmation is what staleness is measured from. A Redis that answers but holds
no version key means "no policy" and drops the snapshot at once (fail closed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .policy.model import Snapshot
from .policy.wire import build_snapshot
from .screening import ScreeningIndex
from .settings import Settings
from .storage.clients import StoreUnavailable
from .storage.keys import POLICY_PARTS
from .storage.policy_store import KnownRevisions
from .storage.store import Store

log = logging.getLogger("gateway.watcher")

# How long close() waits for the poll and listen tasks after cancelling them.
CLOSE_WAIT_S = 5.0


class PolicyWatcher:
    """Owns the current :class:`Snapshot`; swapped in one assignment, read without locks."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.monotonic = monotonic
        self.snapshot: Snapshot | None = None
        self._known: KnownRevisions | None = None  # the part revisions ``snapshot`` was built from
        self._refreshing = asyncio.Lock()
        self.confirmed_at: float | None = None  # monotonic time of the last confirmed version
        self.max_staleness_s = settings.policy.max_staleness_s
        self.poll_interval_s = settings.policy.poll_interval_s
        self.last_reload_s: float = 0.0
        self.on_change: list[Callable[[Snapshot | None], None]] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._closing = False
        self._screening: tuple[int, str, ScreeningIndex | None] = (-1, "", None)

    @property
    def version(self) -> int:
        snapshot = self.snapshot
        return snapshot.version if snapshot is not None else 0

    def stale(self) -> bool:
        """True when no policy may be vouched for: never loaded, gone, or unconfirmed too long."""
        if self.snapshot is None or self.confirmed_at is None:
            return True
        return self.monotonic() - self.confirmed_at > self.max_staleness_s

    def age_s(self) -> float:
        if self.confirmed_at is None:
            return float("inf")
        return self.monotonic() - self.confirmed_at

    async def start(self) -> None:
        try:
            await self.refresh()
        except StoreUnavailable as exc:
            log.warning("policy not loaded at start: %s", exc)
        self._tasks = [
            asyncio.create_task(self._poll_loop(), name="policy-poll"),
            asyncio.create_task(self._listen_loop(), name="policy-listen"),
        ]

    async def close(self) -> None:
        # A cancel can be swallowed: redis-py's pub/sub may drop one that lands while it subscribes,
        # and one landing with a timer's expiry can be read as that timeout. So the loops also stop
        # on a flag, and the tasks are cancelled again until they end (bounded: close never hangs).
        self._closing = True
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_WAIT_S
        pending = set(self._tasks)
        while pending and loop.time() < deadline:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.05)
        if pending:
            log.warning(
                "policy tasks still running %.0f s after close: %s",
                CLOSE_WAIT_S,
                ", ".join(task.get_name() for task in pending),
            )
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.debug("policy task %s ended with %r", task.get_name(), task.exception())
        self._tasks = []

    def wake(self) -> None:
        self._wake.set()

    async def refresh(self) -> None:
        """Confirm the version; reload the snapshot when version or generation moved."""
        # One at a time (the poll and an admin write may both ask): a slower, older reload must
        # never swap in over a newer one.
        async with self._refreshing:
            await self._refresh()

    async def _refresh(self) -> None:
        version, generation = await self.store.read_version()
        if version is None:
            if self.snapshot is not None:
                log.error("redis holds no policy: failing closed until it is restored")
            self._swap(None)
            self.confirmed_at = None
            return
        current = self.snapshot
        if current is None or current.version != version or current.generation != generation:
            await self._reload()
            return
        self.confirmed_at = self.monotonic()
        now = self.clock()
        if current.ip_ranges_expire_at <= now or current.next_change_at <= now:
            # An ip-ranges override expired, or a model's timeline reached its next entry: the snapshot
            # is built again from the same version, so the override stops applying now rather than at
            # the next change, and the requests in flight are decided again under the model's new state
            # (decide() itself reads each model's state at the request's time, cached nowhere).
            self._swap(
                build_snapshot(
                    version=current.version,
                    generation=current.generation,
                    loaded_at=self.clock(),
                    lists={},
                    models={},
                    api_keys={},
                    screening=current.screening,
                    reuse=current,
                    unchanged=POLICY_PARTS,
                )
            )

    async def _reload(self) -> None:
        started = time.perf_counter()
        current = self.snapshot
        # Only what changed since the current snapshot is read and rebuilt: whole parts, or single
        # entries of a list.
        data = await self.store.load_policy(self._known if current is not None else None)
        if data is None:
            self._swap(None)
            self.confirmed_at = None
            return
        screening = await self._screening_index(data.screening_rev, data.generation)
        snapshot = build_snapshot(
            version=data.version,
            generation=data.generation,
            loaded_at=self.clock(),
            lists=data.lists,
            models=data.models,
            api_keys=data.api_keys,
            screening=screening,
            reuse=current if data.unchanged or data.deltas else None,
            unchanged=data.unchanged,
            deltas=data.deltas,
        )
        self._known = KnownRevisions(data.generation, data.revs) if data.revs else None
        self._swap(snapshot)
        self.confirmed_at = self.monotonic()
        self.last_reload_s = time.perf_counter() - started
        log.info("policy version %s loaded in %.1f ms", data.version, self.last_reload_s * 1000)

    async def _screening_index(self, rev: int, generation: str) -> ScreeningIndex | None:
        # The screening list is large and changes rarely: rebuild only when its revision moved.
        cached_rev, cached_generation, index = self._screening
        if cached_rev == rev and cached_generation == generation:
            return index
        entries = await self.store.load_screening() if rev else []
        cfg = self.settings.screening
        index = (
            ScreeningIndex(
                entries,
                block_threshold=cfg.block_threshold,
                review_threshold=cfg.review_threshold,
                cache_size=cfg.cache_size,
            )
            if entries
            else None
        )
        self._screening = (rev, generation, index)
        return index

    def _swap(self, snapshot: Snapshot | None) -> None:
        if snapshot is None:
            self._known = None
        changed = snapshot is not self.snapshot
        self.snapshot = snapshot
        if changed:
            for callback in self.on_change:
                callback(snapshot)

    async def _poll_loop(self) -> None:
        while not self._closing:
            try:
                async with asyncio.timeout(self.poll_interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.refresh()
            except StoreUnavailable as exc:
                log.debug("policy poll failed: %s", exc)
            except Exception:  # a bad document must not kill the watcher
                log.exception("policy reload failed; keeping version %s", self.version)

    async def _listen_loop(self) -> None:
        while not self._closing:
            try:
                await self.store.listen(self.wake)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("policy channel dropped: %s", exc)
            await asyncio.sleep(0.5)
