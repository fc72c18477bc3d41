"""Loading a policy file (YAML, the admin API's document shape) into a Redis that holds none."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .policy import PolicyValidationError, validate_policy_document
from .store import Store, policy_ops

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("gateway.bootstrap")


def read_policy_file(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise PolicyValidationError("(document)", f"{path} must hold a mapping")
    return data


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


async def import_policy(store: Store, document: dict[str, Any], *, actor: str,
                        tiers: list[str] | tuple[str, ...]) -> int:
    """Validate and import a whole-policy document atomically; returns the new version."""
    validated = validate_policy_document(document, actor=actor, now_iso=now_iso(), tiers=tiers)
    version, _change = await store.write(policy_ops(validated), actor=actor, now_iso=now_iso(),
                                         target="policy", import_whole=True)
    return version


async def import_policy_file_if_missing(gateway: Gateway, path: Path) -> None:
    """``serve --bootstrap-policy``: seed an empty Redis (development and embedded mode)."""
    store = gateway.store
    assert store is not None
    if await store.policy_exists():
        log.info("redis already holds a policy; %s not imported", path)
        return
    version = await import_policy(store, read_policy_file(path), actor="bootstrap",
                                  tiers=tuple(gateway.settings.tiers))
    log.info("policy imported from %s", path, extra={"policy_version": version})
    if gateway.watcher is not None:
        await gateway.watcher.refresh()
