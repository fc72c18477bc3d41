"""What the admin handlers are given: the few runtime components they use, built once by the wiring."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from ..geo import GeoResolver
from ..policy.decide import Rules
from ..policy.model import Snapshot
from ..settings import Admin, ScreeningSettings
from ..storage.store import Store


class PolicyView(Protocol):
    """The process's enforced policy as the admin API reads it (the policy watcher is one)."""

    @property
    def snapshot(self) -> Snapshot | None: ...

    @property
    def version(self) -> int: ...

    def stale(self) -> bool: ...

    async def refresh(self) -> None: ...


@dataclass(frozen=True, slots=True)
class AdminContext:
    """Exactly what the ``/admin/v1`` handlers and middlewares use; nothing reaches the whole runtime."""

    store: Store  # reads and the one write path; Redis is the authority
    policy: PolicyView  # the snapshot the public listener enforces (decide, screening search, warnings)
    geo: GeoResolver
    clock: Callable[[], float]
    rules: Rules
    tiers: tuple[str, ...]
    screening: ScreeningSettings
    admin: Admin  # token_env and tokens_file: who may call
    environ: Mapping[str, str]  # where the admin token is read from


ADMIN_CONTEXT_KEY: web.AppKey[AdminContext] = web.AppKey("admin_context", AdminContext)
