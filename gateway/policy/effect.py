"""Whether a policy write loosens or tightens (docs/contract.md §7, "Effect of a write").

A write *loosens* when it can turn any block into an allow; every other write *tightens*. The
classification reads a write as the change history records it: ``before`` and ``after`` map each
thing the write touched (``list:<name>#<key>``, ``models#<name>``, ``apikeys#<id>``,
``revoked#<id>``, a whole ``list:<name>``, ``models`` or ``apikeys``, ``screening``) to its value
before and after (None: absent). A write that changes several things loosens if any part does.

Shadow entries (``"enforce": false``) and a model's ``shadow`` are not enforced, so they count as
absent: writing a shadow over a live deny entry loosens, promoting a shadow deny entry tightens,
promoting a shadow partner loosens, and a write to a model's shadow alone tightens (it changes nothing
enforced).

Pure: no I/O and no clock, so it is table-tested (tests/test_policy_effect.py) and can later judge a
proposed write before it is applied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from gateway.policy.names import DENY_COUNTRIES, DENY_ENTITIES, IP_RANGES, LICENCES, PARTNERS, STAGES

Effect = Literal["loosen", "tighten"]
LOOSEN: Effect = "loosen"
TIGHTEN: Effect = "tighten"

# How the change history names what a write touched: the Redis keys without their ``{gw}:`` prefix.
# tests/test_policy_effect.py checks these against gateway.storage.keys, so they cannot drift apart.
LIST_RECORD_PREFIX = "list:"
MODELS_RECORD = "models"
APIKEYS_RECORD = "apikeys"
REVOKED_RECORD = "revoked"
SCREENING_RECORD = "screening"

_DENY_LISTS = frozenset({DENY_COUNTRIES, DENY_ENTITIES})
# The fields a model's timeline step may set; each overrides the model's own from its ``at`` on.
_MODEL_STATE_FIELDS = ("stage", "allowed_countries", "export_suspended")


def classify_change(
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
    *,
    unknown_model: str,
    policy_import: bool = False,
) -> Effect:
    """``"loosen"`` if any part of the write can turn a block into an allow, else ``"tighten"``.

    ``unknown_model`` is the config's ``policy.unknown_model`` ("allow" or "deny"): it decides whether
    a model leaving or entering the registry opens or closes access. ``policy_import`` marks a
    whole-policy import (``PUT /admin/v1/policy``), which always loosens: it can replace anything.
    """
    if policy_import:
        return LOOSEN
    before, after = before or {}, after or {}
    for record in sorted(before.keys() | after.keys()):
        if part_effect(record, before.get(record), after.get(record), unknown_model=unknown_model) == LOOSEN:
            return LOOSEN
    return TIGHTEN


def part_effect(record: str, before: Any, after: Any, *, unknown_model: str) -> Effect:
    """The effect of one touched thing, named as the change history names it."""
    name, sep, _key = record.partition("#")
    if not sep:
        # A whole list, section or the screening list replaced: anything in it may have gone.
        return LOOSEN
    if name.startswith(LIST_RECORD_PREFIX):
        before, after = _enforced_entry(before), _enforced_entry(after)
        if before is None and after is None:
            return TIGHTEN  # shadow entries only, before and after: nothing enforced changed
        return _entry_effect(name.removeprefix(LIST_RECORD_PREFIX), before, after)
    if name == MODELS_RECORD:
        return _model_effect(_live_model(before), _live_model(after), unknown_model=unknown_model)
    if name == APIKEYS_RECORD:
        # Issuing (or rewriting) a key lets a new credential in; removing one (a revocation) does not.
        return LOOSEN if after is not None else TIGHTEN
    if name == REVOKED_RECORD:
        # Keeping a revocation record only ever refuses a key.
        return TIGHTEN
    # Something this module does not know: called loosening, so no safeguard on loosening writes
    # is skipped for it.
    return LOOSEN


def _enforced_entry(entry: Any) -> Any:
    """A stored entry as the enforced policy sees it: a shadow entry (``"enforce": false``) is absent."""
    return None if isinstance(entry, Mapping) and entry.get("enforce") is False else entry


def _live_model(model: Any) -> Any:
    """A stored model as the enforced policy sees it: without its ``shadow``."""
    if isinstance(model, Mapping) and "shadow" in model:
        return {name: value for name, value in model.items() if name != "shadow"}
    return model


def _entry_effect(list_name: str, before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> Effect:
    if list_name == IP_RANGES:
        # An address moved to another country (or to none) can escape any country rule.
        return LOOSEN
    if list_name in _DENY_LISTS:
        # A deny entry blocks while it lasts: removing it or making it end sooner loosens.
        if before is None:
            return TIGHTEN
        if after is None:
            return LOOSEN
        return LOOSEN if _ends_sooner(before, after) else TIGHTEN
    if list_name == PARTNERS:
        # A partner entry allows while it lasts: adding it or making it last longer loosens.
        if after is None:
            return TIGHTEN
        if before is None:
            return LOOSEN
        return LOOSEN if _ends_sooner(after, before) else TIGHTEN
    if list_name == LICENCES:
        # A licence lets callers past row 6: granting one loosens, revoking it tightens, and a change
        # loosens unless it only narrows (same org, fewer models and countries, ending no later).
        if after is None:
            return TIGHTEN
        if before is None:
            return LOOSEN
        return TIGHTEN if _licence_narrows(before, after) else LOOSEN
    # country-groups: a member added widens every allowed set naming the group, one removed shrinks
    # every deny entry naming it; either way loosening. So is a list this module does not know.
    return LOOSEN


def _licence_narrows(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    return (
        before.get("org") == after.get("org")
        and set(_codes(after.get("models"))) <= set(_codes(before.get("models")))
        and set(_codes(after.get("countries"))) <= set(_codes(before.get("countries")))
        and not _ends_sooner(after, before)
    )


def _ends_sooner(first: Mapping[str, Any], second: Mapping[str, Any]) -> bool:
    """True when ``second`` stops applying before ``first`` does (no ``expires_at``: never stops)."""
    first_end, second_end = _instant(first.get("expires_at")), _instant(second.get("expires_at"))
    if second_end is None:
        return False
    return first_end is None or second_end < first_end


def _instant(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _model_effect(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None, *, unknown_model: str) -> Effect:
    if before is None and after is None:
        return TIGHTEN
    if before is None or after is None:
        # An unregistered model follows unknown_model: under "allow" leaving the registry opens it to
        # everyone, under "deny" entering it is what lets anyone use it at all.
        opens = after is None if unknown_model == "allow" else before is None
        return LOOSEN if opens else TIGHTEN
    # Compare the model as it stands at every instant either timeline changes it, and before the
    # first: a timeline step that releases earlier, or further, loosens like a direct change does.
    # Steps in the past count too; judged without a clock, that errs towards "loosen".
    before_steps, after_steps = _timeline(before), _timeline(after)
    instants = sorted({at for at, _step in before_steps} | {at for at, _step in after_steps})
    for instant in (None, *instants):
        if _state_loosens(_state_at(before, before_steps, instant), _state_at(after, after_steps, instant)):
            return LOOSEN
    return TIGHTEN


def _timeline(model: Mapping[str, Any]) -> list[tuple[datetime, Mapping[str, Any]]]:
    steps: Iterable[Any] = model.get("timeline") or ()
    out = [(at, step) for step in steps if isinstance(step, Mapping) and (at := _instant(step.get("at"))) is not None]
    out.sort(key=lambda item: item[0])
    return out


def _state_at(
    model: Mapping[str, Any], steps: Sequence[tuple[datetime, Mapping[str, Any]]], instant: datetime | None
) -> dict[str, Any]:
    """The model's stage, allowed countries and suspension from ``instant`` on (None: before any step)."""
    state = {name: model.get(name) for name in _MODEL_STATE_FIELDS}
    if instant is not None:
        for at, step in steps:
            if at > instant:
                break
            state.update({name: step[name] for name in _MODEL_STATE_FIELDS if name in step})
    return state


def _state_loosens(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    if before.get("export_suspended") and not after.get("export_suspended"):
        return True
    if _stage_rank(after.get("stage")) > _stage_rank(before.get("stage")):
        return True
    return _widens(before.get("allowed_countries"), after.get("allowed_countries"))


def _stage_rank(stage: object) -> int:
    # An unknown stage ranks as the widest, so a change into one counts as loosening.
    return STAGES.index(stage) if stage in STAGES else len(STAGES)


def _widens(before: object, after: object) -> bool:
    """True when ``after`` admits a country ``before`` did not (None: every country)."""
    if after is None:
        return before is not None
    if before is None:
        return False
    return not set(_codes(after)) <= set(_codes(before))


def _codes(value: object) -> list[str]:
    return [code for code in value if isinstance(code, str)] if isinstance(value, list | tuple) else []
