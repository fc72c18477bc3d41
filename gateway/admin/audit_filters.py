"""The filters of ``GET /admin/v1/audit`` (and ``gateway audit tail``): parsed, checked, applied.

``subject``, ``org``, ``model`` and ``code`` match a record's field exactly (``code=`` with an
empty value: allowed requests); ``since`` (inclusive) and ``until`` (exclusive) are ISO-8601
instants (a time without a zone is UTC) compared with the record's ``time``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from ..errors import invalid

TEXT_FILTERS = ("subject", "org", "model", "code")


def _instant(raw: str, field: str) -> datetime:
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise invalid(field, "must be an ISO-8601 time, e.g. 2025-03-01T00:00:00Z") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class AuditFilter:
    fields: tuple[tuple[str, str], ...] = ()
    since: datetime | None = None
    until: datetime | None = None

    @property
    def since_ms(self) -> int | None:
        return None if self.since is None else int(self.since.timestamp() * 1000)

    @property
    def until_ms(self) -> int | None:
        return None if self.until is None else int(self.until.timestamp() * 1000)

    def __call__(self, record: dict[str, Any]) -> bool:
        for name, wanted in self.fields:
            value = record.get(name)
            if (value or "") != wanted:
                return False
        if self.since is not None or self.until is not None:
            try:
                when = datetime.fromisoformat(str(record.get("time")))
            except ValueError:
                return False
            if self.since is not None and when < self.since:
                return False
            if self.until is not None and when >= self.until:
                return False
        return True


def audit_filter(request: web.Request) -> AuditFilter:
    return audit_filter_of(request.query)


def audit_filter_of(query: Mapping[str, str]) -> AuditFilter:
    """The filter a query names (the console's audit page builds its query from a form)."""
    fields: list[tuple[str, str]] = []
    for name in TEXT_FILTERS:
        raw = query.get(name)
        if raw is None:
            continue
        if len(raw) > 256 or (name != "code" and not raw):
            raise invalid(name, "must be 1 to 256 characters")
        fields.append((name, raw))
    since = _instant(query["since"], "since") if "since" in query else None
    until = _instant(query["until"], "until") if "until" in query else None
    if since is not None and until is not None and until <= since:
        raise invalid("until", "must be later than since")
    return AuditFilter(tuple(fields), since, until)
