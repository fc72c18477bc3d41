"""What the admin handlers are given: the few runtime components they use, built once by the wiring."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from ..admission import Admission, PolicyView
from ..policy.decide import Rules
from ..settings import Admin, ScreeningSettings
from ..storage.store import Store


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


ADMIN_CONTEXT_KEY: web.AppKey[AdminContext] = web.AppKey("admin_context", AdminContext)
