"""What the admin handlers are given: the few runtime components they use, built once by the wiring."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from ..admission import Admission, PolicyView
from ..policy.decide import Rules
from ..settings import Admin, ScreeningSettings
from ..storage.ops import PlainOp
from ..storage.store import Store


class ImpactPreviewer(Protocol):
    """Decides the recent audit trail's callers again under the policy as ``ops`` would leave it:
    ``{"callers", "would_block": [...], "would_allow": [...]}``."""

    async def preview(self, ops: Sequence[PlainOp], hours: float) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class AdminContext:
    """Exactly what the ``/admin/v1`` handlers and middlewares use; nothing reaches the whole runtime."""

    store: Store  # reads and the one write path; Redis is the authority
    policy: PolicyView  # the snapshot the public listener enforces (decide, screening search, warnings)
    admission: Admission  # POST /admin/v1/decide: the public path's steps, without the rate step
    rules: Rules
    tiers: tuple[str, ...]
    screening: ScreeningSettings
    admin: Admin  # token_env and tokens_file: who may call
    environ: Mapping[str, str]  # where the admin token is read from
    # POST /admin/v1/impact and each change request's impact; None: no previewer (503, impact null)
    impact: ImpactPreviewer | None = None


ADMIN_CONTEXT_KEY: web.AppKey[AdminContext] = web.AppKey("admin_context", AdminContext)
