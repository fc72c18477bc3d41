"""Loading a policy file (YAML, the admin API's document shape) into a Redis that holds none.

A restore must carry every part of the policy (docs/contract.md §6): ``serve --bootstrap-policy``
with a file that leaves one out fails, naming it, rather than serving a half policy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .policy.names import now_iso
from .policy.validate import (
    PolicyValidationError,
    document_references,
    drop_expired,
    missing_parts,
    validate_policy_document,
)
from .settings import ConfigError
from .storage.ops import PolicyIncomplete, policy_ops
from .storage.store import Store

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("gateway.bootstrap")


def read_policy_file(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise PolicyValidationError("(document)", f"{path} must hold a mapping")
    return data


async def import_policy(
    store: Store, document: dict[str, Any], *, actor: str, tiers: list[str] | tuple[str, ...], fill_missing: bool = True
) -> int:
    """Validate and import a whole-policy document atomically; returns the new version.

    ``fill_missing`` writes the parts the document leaves out as empty, for seeding a test or
    benchmark Redis from a short document; a restore passes False, and the store then refuses
    a document that leaves a part out (:class:`PolicyIncomplete`).
    """
    validated = validate_policy_document(document, actor=actor, now_iso=now_iso(), tiers=tiers)
    validated, _warnings = drop_expired(validated, time.time())
    # Into an empty Redis: every @GROUP and licence model must be defined by the document itself.
    document_references(validated, {})
    if fill_missing:
        lists = validated.setdefault("lists", {})
        for part in missing_parts(validated):
            if part.startswith("lists."):
                lists[part.removeprefix("lists.")] = {}
            else:
                validated[part] = {"entries": []} if part == "screening" else {}
    version, _change = await store.write(
        policy_ops(validated), actor=actor, now_iso=now_iso(), target="policy", import_whole=True
    )
    return version


def check_policy_file(path: Path, tiers: list[str] | tuple[str, ...]) -> None:
    """``serve --bootstrap-policy``, before anything starts: the file must read, validate and carry
    every section, else :class:`ConfigError` naming what is wrong (the command exits 2)."""
    try:
        validated = validate_policy_document(read_policy_file(path), actor="bootstrap", now_iso=now_iso(), tiers=tiers)
    except (PolicyValidationError, OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"--bootstrap-policy {path}: {exc}") from None
    missing = missing_parts(validated)
    if missing:
        raise ConfigError(_incomplete(path, missing))
    try:
        document_references(validated, {})
    except PolicyValidationError as exc:
        raise ConfigError(f"--bootstrap-policy {path}: {exc}") from None


def _incomplete(path: Path, missing: Sequence[str]) -> str:
    return (
        f"--bootstrap-policy {path}: a policy loaded into an empty Redis must carry every section; "
        f"missing: {', '.join(missing)} (write an empty one as empty, e.g. partners: {{}}, "
        "api_keys: {}, screening: {entries: []}); nothing was imported"
    )


async def import_policy_file_if_missing(runtime: Runtime, path: Path) -> None:
    """``serve --bootstrap-policy``: seed an empty Redis (development and embedded mode)."""
    store = runtime.store
    if await store.policy_exists():
        log.info("redis already holds a policy; %s not imported", path)
        return
    try:
        version = await import_policy(
            store, read_policy_file(path), actor="bootstrap", tiers=tuple(runtime.settings.tiers), fill_missing=False
        )
    except PolicyIncomplete as exc:
        # check_policy_file refused this before start; here only if the file changed since.
        log.error(_incomplete(path, exc.missing))
        raise ConfigError(_incomplete(path, exc.missing)) from None
    log.info("policy imported from %s", path, extra={"policy_version": version})
    await runtime.watcher.refresh()
