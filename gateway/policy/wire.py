"""The stored form of the policy (docs/contract.md §7) <-> the snapshot types.

``*_from_dict`` / ``*_to_dict`` convert one record, :func:`build_snapshot` turns what the store
read into a :class:`~gateway.policy.model.Snapshot` (deny lists stay stored JSON until consulted,
:class:`LazyEntries`), and :func:`policy_document` is the ``GET /admin/v1/policy`` shape.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import orjson

from gateway.policy.model import (
    ApiKey,
    Entry,
    Licence,
    Model,
    ModelState,
    ScreeningLike,
    Snapshot,
    Step,
    resolve_codes,
)
from gateway.policy.names import (
    COUNTRY_GROUPS,
    DENY_COUNTRIES,
    GROUP_PREFIX,
    IP_RANGES,
    LAZY_LISTS,
    LICENCES,
    LIST_NAMES,
)
from gateway.policy.validate import (
    PolicyValidationError,
    check_list,
    optional_instant,
    parse_instant,
    region_code,
    stage_name,
)

# How a shadow entry reads in the stored JSON (the store writes compact JSON with orjson). Inside a
# JSON string the quotes would be escaped, so no reason or source text can look like it. A stored
# entry spelled otherwise is read as enforced, which for a deny list errs on the closed side.
_SHADOW_MARK = b'"enforce":false'


def _shadow_keys(raw: Mapping[Any, Any]) -> frozenset[Any]:
    """The keys of ``raw``'s shadow entries. Stored bytes are searched joined first, in one pass
    that costs about as much as copying them, and one by one only when that finds one."""
    values = raw.values()
    if isinstance(next(iter(values), None), bytes | bytearray) and _SHADOW_MARK not in b"\n".join(values):
        return frozenset()
    return frozenset(key for key, value in raw.items() if _is_shadow(value))


def _is_shadow(value: Any) -> bool:
    if isinstance(value, bytes | bytearray):
        return _SHADOW_MARK in value
    return isinstance(value, Mapping) and value.get("enforce") is False


class LazyEntries(Mapping[str, "Entry"]):
    """A deny list kept as stored JSON until a decision first consults an entry.

    Deny lists can hold hundreds of thousands of entries, of which a decision looks
    up one or two; parsing them all on every reload would cost most of a reload.
    A stored entry that cannot be read still denies (fail closed).

    Shadow entries (``"enforce": false``) are found by one byte search per stored value when the
    list is built whole, then kept up to date entry by entry. A view with ``hide`` (the enforced
    list) leaves them out; the view without (the shadow snapshot's) holds them. Both views share
    the stored values and the entries parsed so far.
    """

    __slots__ = ("_encoded", "_hide", "_list", "_parsed", "_raw", "_shadow")

    def __init__(
        self,
        list_name: str,
        raw: Mapping[str, bytes | Mapping[str, Any]] | Mapping[bytes, bytes],
        *,
        shadow: frozenset[Any] | None = None,
        hide: bool = False,
    ) -> None:
        self._list = list_name
        self._raw: Mapping[Any, Any] = raw
        # Keys may stay as Redis returned them (bytes): decoding 100,000 keys is a fifth of a reload,
        # while encoding the one or two a decision looks up costs nothing.
        self._encoded = isinstance(next(iter(raw), ""), bytes)
        self._parsed: dict[str, Entry] = {}
        if shadow is None:
            shadow = _shadow_keys(raw)
        self._shadow: frozenset[Any] = shadow  # raw keys of the shadow entries
        self._hide = hide and bool(shadow)

    @property
    def shadow_count(self) -> int:
        """How many of the stored entries are shadow entries (hidden or not)."""
        return len(self._shadow)

    def enforced(self) -> LazyEntries:
        """The view a decision enforces: without the shadow entries (this list itself when it has none)."""
        if self._hide or not self._shadow:
            return self
        view = LazyEntries(self._list, self._raw, shadow=self._shadow, hide=True)
        view._parsed = self._parsed
        return view

    def group_keys(self) -> list[str]:
        """The keys that name a country group (``@E:1``), as text."""
        mark: Any = _GROUP_MARK if self._encoded else GROUP_PREFIX
        keys = [key for key in self._raw if key[:1] == mark and not (self._hide and key in self._shadow)]
        return [key.decode("utf-8", "surrogatepass") if self._encoded else key for key in keys]

    def _raw_key(self, key: str) -> Any:
        return key.encode("utf-8", "surrogatepass") if self._encoded else key

    def __getitem__(self, key: str) -> Entry:
        entry = self._parsed.get(key)
        if entry is None or self._hide:
            raw_key = self._raw_key(key)
            if self._hide and raw_key in self._shadow:
                raise KeyError(key)
            if entry is None:
                entry = self._parsed[key] = self._parse(key, self._raw[raw_key])
        return entry

    def get(self, key: str, default: Any = None) -> Any:
        # Every decision asks for a key or two, and usually one the list does not hold: answered here
        # in one step (what ``key in self`` and ``self[key]`` would answer, without their calls).
        if not isinstance(key, str):
            return default
        entry = self._parsed.get(key)
        if entry is not None and not self._hide:
            return entry
        raw_key = key.encode("utf-8", "surrogatepass") if self._encoded else key
        if raw_key not in self._raw or (self._hide and raw_key in self._shadow):
            return default
        if entry is None:
            entry = self._parsed[key] = self._parse(key, self._raw[raw_key])
        return entry

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        raw_key = self._raw_key(key)
        return raw_key in self._raw and not (self._hide and raw_key in self._shadow)

    def __len__(self) -> int:
        return len(self._raw) - (len(self._shadow) if self._hide else 0)

    def __iter__(self) -> Iterator[str]:
        keys: Iterator[Any] = iter(self._raw)
        if self._hide:
            shadow = self._shadow
            keys = (key for key in keys if key not in shadow)
        if self._encoded:
            return (key.decode("utf-8", "surrogatepass") for key in keys)
        return keys

    def patched(self, changes: Mapping[Any, Any]) -> LazyEntries:
        """A copy with ``changes`` applied (entry key -> stored value, None to delete), shadow entries
        included (not hidden); entries already parsed and not changed stay parsed."""
        raw = dict(self._raw)
        parsed = dict(self._parsed)
        shadow = set(self._shadow)
        for key, value in changes.items():
            text = key.decode("utf-8", "surrogatepass") if isinstance(key, bytes) else key
            raw_key = self._raw_key(text) if raw else key
            parsed.pop(text, None)
            shadow.discard(raw_key)
            if value is None:
                raw.pop(raw_key, None)
            else:
                raw[raw_key] = value
                if _is_shadow(value):
                    shadow.add(raw_key)
        patched = LazyEntries(self._list, raw, shadow=frozenset(shadow))
        patched._parsed = parsed
        return patched

    def _parse(self, key: str, value: bytes | Mapping[str, Any]) -> Entry:
        try:
            data = orjson.loads(value) if isinstance(value, bytes | bytearray) else value
            if not isinstance(data, Mapping):
                raise PolicyValidationError(f"lists.{self._list}.{key}", "is not an object")
            return entry_from_dict(self._list, key, data)
        except (orjson.JSONDecodeError, PolicyValidationError):
            return Entry(key, "unreadable stored entry (applied: fail closed)", "", "", "", None, None, None)


# --------------------------------------------------------------------------- stored dicts <-> types


def entry_from_dict(list_name: str, key: str, d: Mapping[str, Any]) -> Entry:
    """A stored entry -> :class:`Entry`; a value that cannot be read raises PolicyValidationError.

    Runs once per entry on every snapshot reload (hundreds of thousands of times), so the
    common case (no expiry, not an ip-range) does no parsing beyond the dict lookups.
    """
    expires = d.get("expires_at")
    if expires is None:
        expires_at = expires_ts = None
    else:
        expires_at, expires_ts = optional_instant(expires, f"lists.{list_name}.{key}.expires_at")
    country = None
    if list_name == IP_RANGES:
        country = region_code(d.get("country"), f"lists.{list_name}.{key}.country")
    countries = org = models = None
    if list_name in (COUNTRY_GROUPS, LICENCES):
        countries = _codes(d.get("countries"), f"lists.{list_name}.{key}.countries")
    if list_name == LICENCES:
        org = str(d.get("org") or "")
        models = tuple(str(name) for name in d.get("models") or ())
    return Entry(
        key,
        str(d.get("reason") or ""),
        str(d.get("source") or ""),
        str(d.get("added_by") or ""),
        str(d.get("added_at") or ""),
        expires_at,
        expires_ts,
        country,
        # Only an explicit false makes a shadow entry: a damaged flag is enforced.
        d.get("enforce", True) is not False,
        countries,
        org,
        models,
    )


def _codes(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise PolicyValidationError(where, "must be a list of country codes")
    return tuple(str(code).upper() if str(code)[:1] != GROUP_PREFIX else str(code) for code in value)


def entry_to_dict(e: Entry) -> dict[str, Any]:
    d: dict[str, Any] = {
        "reason": e.reason,
        "source": e.source,
        "added_by": e.added_by,
        "added_at": e.added_at,
        "expires_at": e.expires_at,
    }
    if e.country is not None:
        d["country"] = e.country
    if e.org is not None:
        d["org"] = e.org
    if e.models is not None:
        d["models"] = list(e.models)
    if e.countries is not None:
        d["countries"] = list(e.countries)
    if not e.enforce:
        d["enforce"] = False
    return d


def model_from_dict(name: str, d: Mapping[str, Any]) -> Model:
    where = f"models.{name}"
    stage = stage_name(d.get("stage"), f"{where}.stage")
    steps = []
    for i, step in enumerate(d.get("timeline") or ()):
        path = f"{where}.timeline[{i}]"
        if not isinstance(step, Mapping):
            raise PolicyValidationError(path, "must be an object with at and the fields it sets")
        at_iso, at_ts = parse_instant(step.get("at"), f"{path}.at")
        step_allowed = step.get("allowed_countries")
        suspended = step.get("export_suspended")
        steps.append(
            Step(
                at_ts,
                at_iso,
                stage_name(step["stage"], f"{path}.stage") if step.get("stage") is not None else None,
                # Anything but an explicit false suspends: a damaged flag fails closed.
                None if "export_suspended" not in step else suspended is not False,
                None if step_allowed is None else _codes(step_allowed, f"{path}.allowed_countries"),
                "allowed_countries" in step,
            )
        )
    steps.sort(key=lambda step: step.at_ts)
    allowed = d.get("allowed_countries")
    shadow = d.get("shadow")
    return Model(
        name=name,
        stage=stage,
        timeline=tuple(steps),
        allowed_countries=None if allowed is None else frozenset(_codes(allowed, f"{where}.allowed_countries")),
        # Anything but an explicit false suspends: a damaged flag fails closed.
        export_suspended=d.get("export_suspended", False) is not False,
        shadow=model_from_dict(name, _without_shadow(shadow)) if isinstance(shadow, Mapping) else None,
    )


def _without_shadow(d: Mapping[str, Any]) -> Mapping[str, Any]:
    # A shadow holds no shadow of its own.
    return {key: value for key, value in d.items() if key != "shadow"} if "shadow" in d else d


def step_to_dict(step: Step) -> dict[str, Any]:
    """A timeline entry as stored: ``at`` and only the fields it names."""
    d: dict[str, Any] = {"at": step.at_iso}
    if step.stage is not None:
        d["stage"] = step.stage
    if step.export_suspended is not None:
        d["export_suspended"] = step.export_suspended
    if step.names_allowed:
        d["allowed_countries"] = None if step.allowed_countries is None else sorted(step.allowed_countries)
    return d


def model_to_dict(m: Model) -> dict[str, Any]:
    d: dict[str, Any] = {
        "stage": m.stage,
        "timeline": [step_to_dict(step) for step in m.timeline],
        "allowed_countries": None if m.allowed_countries is None else sorted(m.allowed_countries),
        "export_suspended": m.export_suspended,
    }
    if m.shadow is not None:
        d["shadow"] = model_to_dict(m.shadow)
    return d


def state_to_dict(state: ModelState) -> dict[str, Any]:
    """A model's state at one instant, country groups resolved (``models get``'s ``current``)."""
    allowed = state.allowed_countries
    return {
        "stage": state.stage,
        "export_suspended": state.export_suspended,
        "allowed_countries": None if allowed is None else sorted(allowed),
    }


def api_key_from_dict(key_id: str, d: Mapping[str, Any]) -> ApiKey:
    where = f"api_keys.{key_id}"
    expires_at, expires_ts = optional_instant(d.get("expires_at"), f"{where}.expires_at")
    for name in ("hash", "subject", "org", "country", "tier"):
        if not isinstance(d.get(name), str) or not d[name]:
            raise PolicyValidationError(f"{where}.{name}", "is required")
    org_name = d.get("org_name")
    return ApiKey(
        id=key_id,
        key_hash=d["hash"],
        subject=d["subject"],
        org=d["org"],
        org_name=None if org_name is None else str(org_name),
        country=str(d["country"]).upper(),
        tier=d["tier"],
        expires_at=expires_at,
        expires_ts=expires_ts,
        created_at=str(d.get("created_at") or ""),
        created_by=str(d.get("created_by") or ""),
    )


def api_key_to_dict(k: ApiKey) -> dict[str, Any]:
    return {
        "hash": k.key_hash,
        "subject": k.subject,
        "org": k.org,
        "org_name": k.org_name,
        "country": k.country,
        "tier": k.tier,
        "expires_at": k.expires_at,
        "created_at": k.created_at,
        "created_by": k.created_by,
    }


def build_snapshot(
    *,
    version: int,
    generation: str,
    loaded_at: float,
    lists: Mapping[str, Mapping[str, Mapping[str, Any]]],
    models: Mapping[str, Mapping[str, Any]],
    api_keys: Mapping[str, Mapping[str, Any]],
    screening: ScreeningLike | None = None,
    reuse: Snapshot | None = None,
    unchanged: Collection[str] = (),
    deltas: Mapping[str, Mapping[Any, Any]] | None = None,
) -> Snapshot:
    """Stored dicts -> an immutable :class:`Snapshot`; a list left out is empty.

    Parts named in ``unchanged`` (list names, ``"models"``, ``"apikeys"``) are taken from ``reuse``
    as they are, already parsed: a change to one list does not rebuild the others. Lists in
    ``deltas`` are ``reuse``'s with those entries changed (entry key -> stored value, None: deleted).

    The snapshot enforces no shadow entry (``"enforce": false``) and no model's shadow. When the
    policy holds any, ``Snapshot.shadow`` is the policy as it would be with them enforced (shadow
    entries in, models in their shadow state), built from the same parsed parts.
    """
    deltas = deltas or {}
    if (unchanged or deltas) and reuse is None:
        raise ValueError("unchanged parts need a snapshot to reuse")
    for list_name in (*lists, *deltas):
        check_list(list_name)
    # The lists with their shadow entries are the shadow snapshot's, or the snapshot's own when
    # it had none.
    whole = None if reuse is None else (reuse.shadow or reuse)
    all_lists: dict[str, Mapping[str, Entry]] = {}
    typed_lists: dict[str, Mapping[str, Entry]] = {}
    for name in LIST_NAMES:
        if reuse is not None and whole is not None and name in unchanged:
            all_lists[name], typed_lists[name] = whole.lists[name], reuse.lists[name]
        else:
            base = whole.lists[name] if whole is not None and name in deltas else None
            all_lists[name] = _typed_list(name, lists.get(name, {}), base, deltas.get(name))
            typed_lists[name] = _enforced_list(all_lists[name])
    if reuse is not None and "apikeys" in unchanged:
        keys: Mapping[str, ApiKey] = reuse.api_keys
    else:
        built = {}
        for key_id, d in api_keys.items():
            key = api_key_from_dict(key_id, d)
            built[key.key_hash] = key
        keys = MappingProxyType(built)
    models_unchanged = reuse is not None and "models" in unchanged
    typed_models: Mapping[str, Model] = (
        reuse.models
        if reuse is not None and models_unchanged
        else MappingProxyType({name: model_from_dict(name, d) for name, d in models.items()})
    )
    # Country groups are resolved here, once per version, so a decision looks codes up directly.
    groups_unchanged = COUNTRY_GROUPS in unchanged
    if reuse is not None and groups_unchanged and all(name in unchanged for name in (DENY_COUNTRIES, LICENCES)):
        resolved = _Resolved(reuse.groups, reuse.group_denied, reuse.licences)
    else:
        resolved = _resolve(typed_lists)
    if not (models_unchanged and groups_unchanged):
        typed_models = _resolve_models(typed_models, resolved.groups)
    ip_ranges, ip_expire_at = _ip_ranges(typed_lists[IP_RANGES], loaded_at)
    next_change_at = _next_change(typed_models.values(), loaded_at)
    shadow = None
    shadow_lists = any(typed_lists[name] is not all_lists[name] for name in LIST_NAMES)
    if shadow_lists or any(model.shadow is not None for model in typed_models.values()):
        shadow_ip_ranges, shadow_expire_at = ip_ranges, ip_expire_at
        if typed_lists[IP_RANGES] is not all_lists[IP_RANGES]:
            shadow_ip_ranges, shadow_expire_at = _ip_ranges(all_lists[IP_RANGES], loaded_at)
        shadow_resolved = _resolve(all_lists) if shadow_lists else resolved
        shadow_models = MappingProxyType(
            {name: (model.shadow or model).resolved(shadow_resolved.groups) for name, model in typed_models.items()}
        )
        shadow_next = _next_change(shadow_models.values(), loaded_at)
        shadow = Snapshot(
            version=version,
            generation=generation,
            loaded_at=loaded_at,
            lists=MappingProxyType(all_lists),
            models=shadow_models,
            api_keys=keys,
            screening=screening,
            ip_ranges=shadow_ip_ranges,
            ip_ranges_expire_at=shadow_expire_at,
            groups=shadow_resolved.groups,
            group_denied=shadow_resolved.group_denied,
            licences=shadow_resolved.licences,
            next_change_at=shadow_next,
        )
        # The watcher rebuilds when the first expiry or scheduled change of either passes.
        ip_expire_at = min(ip_expire_at, shadow_expire_at)
        next_change_at = min(next_change_at, shadow_next)
    return Snapshot(
        version=version,
        generation=generation,
        loaded_at=loaded_at,
        lists=MappingProxyType(typed_lists),
        models=typed_models,
        api_keys=keys,
        screening=screening,
        ip_ranges=ip_ranges,
        ip_ranges_expire_at=ip_expire_at,
        groups=resolved.groups,
        group_denied=resolved.group_denied,
        licences=resolved.licences,
        next_change_at=next_change_at,
        shadow=shadow,
    )


class _Resolved(NamedTuple):
    groups: Mapping[str, frozenset[str]]
    group_denied: Mapping[str, tuple[Entry, ...]]
    licences: Mapping[str, tuple[Licence, ...]]


def _resolve(lists: Mapping[str, Mapping[str, Entry]]) -> _Resolved:
    """The country groups, the deny-countries entries that name one (by member code) and the licences
    (by org, countries resolved) of ``lists``."""
    groups = {key: frozenset(entry.countries or ()) for key, entry in lists[COUNTRY_GROUPS].items()}
    denied: dict[str, tuple[Entry, ...]] = {}
    deny = lists[DENY_COUNTRIES]
    for key in group_keys(deny):
        entry = deny[key]
        members = groups.get(key[1:])
        # A group the policy lacks: the entry denies everyone rather than no one (fail closed).
        for code in ("*",) if members is None else members:
            denied[code] = (*denied.get(code, ()), entry)
    licences: dict[str, tuple[Licence, ...]] = {}
    for key, entry in lists[LICENCES].items():
        if entry.org:
            licence = Licence(key, frozenset(entry.models or ()), resolve_codes(entry.countries or (), groups), entry)
            licences[entry.org] = (*licences.get(entry.org, ()), licence)
    return _Resolved(MappingProxyType(groups), MappingProxyType(denied), MappingProxyType(licences))


_GROUP_MARK = GROUP_PREFIX.encode()


def group_keys(deny: Mapping[str, Entry]) -> list[str]:
    """The keys of ``deny`` that name a group; the stored keys are searched without decoding them all."""
    if isinstance(deny, LazyEntries):
        return deny.group_keys()
    return [key for key in deny if key[:1] == GROUP_PREFIX]


def _resolve_models(models: Mapping[str, Model], groups: Mapping[str, frozenset[str]]) -> Mapping[str, Model]:
    if not any(
        model.uses_groups or (model.shadow is not None and model.shadow.uses_groups) for model in models.values()
    ):
        return models
    return MappingProxyType({name: model.resolved(groups) for name, model in models.items()})


def _next_change(models: Iterable[Model], now: float) -> float:
    """The first timeline ``at`` after ``now`` among ``models``."""
    return min((step.at_ts for model in models for step in model.timeline if step.at_ts > now), default=math.inf)


def _typed_list(
    name: str,
    stored: Mapping[str, Any],
    base: Mapping[str, Entry] | None,
    delta: Mapping[Any, Any] | None,
) -> Mapping[str, Entry]:
    """A list with its shadow entries: ``base`` (a snapshot's, shadow entries included) with ``delta``
    applied, or else built from ``stored``."""
    # Built here rather than per entry: entry_from_dict trusts name from LIST_NAMES.
    if base is not None and delta is not None:
        if isinstance(base, LazyEntries):
            return base.patched(delta)
        patched = dict(base)
        for key, d in delta.items():
            if d is None:
                patched.pop(key, None)
            else:
                patched[key] = entry_from_dict(name, key, d)
        return MappingProxyType(patched)
    if name in LAZY_LISTS:
        return LazyEntries(name, stored)
    return MappingProxyType({key: entry_from_dict(name, key, d) for key, d in stored.items()})


def _enforced_list(entries: Mapping[str, Entry]) -> Mapping[str, Entry]:
    """``entries`` without its shadow entries (``entries`` itself when it holds none)."""
    if isinstance(entries, LazyEntries):
        return entries.enforced()
    if all(entry.enforce for entry in entries.values()):
        return entries
    return MappingProxyType({key: entry for key, entry in entries.items() if entry.enforce})


def _ip_ranges(entries: Mapping[str, Entry], now: float) -> tuple[Mapping[str, str], float]:
    """The ip-ranges CIDR -> country map active at ``now``, and when the first of them expires."""
    active = [entry for entry in entries.values() if entry.country is not None and entry.active(now)]
    ranges = {entry.key: entry.country for entry in active if entry.country is not None}
    expiries = [entry.expires_ts for entry in active if entry.expires_ts is not None]
    return MappingProxyType(ranges), min(expiries, default=math.inf)


def policy_document(snapshot: Snapshot) -> dict[str, Any]:
    """The §7 ``GET /admin/v1/policy`` shape, without ``screening`` (the screening module adds it);
    shadow entries and model shadows included, as stored."""
    whole = snapshot.shadow or snapshot
    return {
        "version": snapshot.version,
        "lists": {name: {key: entry_to_dict(e) for key, e in sorted(whole.lists[name].items())} for name in LIST_NAMES},
        "models": {name: model_to_dict(m) for name, m in sorted(snapshot.models.items())},
        "api_keys": {k.id: api_key_to_dict(k) for k in sorted(snapshot.api_keys.values(), key=lambda k: k.id)},
    }


def references_view(snapshot: Snapshot | None) -> dict[str, Any]:
    """What a write's references are checked against (:func:`~gateway.policy.validate.document_references`):
    a policy document of the parts that name or are named, shadow entries included, from ``snapshot``."""
    if snapshot is None:
        return {}
    whole = snapshot.shadow or snapshot
    return {
        "lists": {
            COUNTRY_GROUPS: {key: entry_to_dict(e) for key, e in whole.lists[COUNTRY_GROUPS].items()},
            DENY_COUNTRIES: {key: {} for key in group_keys(whole.lists[DENY_COUNTRIES])},
            LICENCES: {key: entry_to_dict(e) for key, e in whole.lists[LICENCES].items()},
        },
        "models": {name: model_to_dict(m) for name, m in snapshot.models.items()},
    }


def model_schedule(name: str, stored: Mapping[str, Any], snapshot: Snapshot | None, now: float) -> dict[str, Any]:
    """``models get``'s view of time: the model's ``current`` state (its timeline applied, country
    groups resolved) and its ``next_change`` (the next timeline entry, or null)."""
    try:
        model = model_from_dict(name, stored)
    except PolicyValidationError:
        return {}
    model = model.resolved(snapshot.groups if snapshot is not None else {})
    upcoming = model.next_change(now)
    return {
        "current": state_to_dict(model.state(now)),
        "next_change": None if upcoming is None else step_to_dict(upcoming),
    }
