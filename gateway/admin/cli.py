"""Operator subcommands of ``gateway`` (docs/contract.md §8): each a call to the admin API.

They talk to ``GATEWAY_ADMIN_URL`` (default ``http://127.0.0.1:9901``) with the
token in ``GATEWAY_ADMIN_TOKEN`` (or the file named by ``GATEWAY_ADMIN_TOKEN_FILE``).
Output is a table for people and JSON with ``--json``; any failure exits
non-zero with a message naming the problem. Only the standard library speaks
HTTP here, so the commands start fast and need nothing the gateway does not.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..archive.commands import add_archive_commands
from ..policy.names import LIST_NAMES, STAGES, now_iso
from .cli_io import (
    DEFAULT_ADMIN_URL,
    URL_ENV,
    CliError,
    admin_client,
    emit,
    impact_summary,
    read_bytes,
    read_document,
    segment,
    table,
    write,
    write_reporting,
    written,
)

# --- lists -----------------------------------------------------------------------------------


def _lists_get(args: argparse.Namespace) -> None:
    data = admin_client(args).call("GET", f"/admin/v1/lists/{segment(args.list)}")

    def text(data: Any) -> str:
        entries = data.get("entries", {})
        headers = ["KEY", "REASON", "SOURCE", "EXPIRES AT", "ADDED BY", "ADDED AT", "ENFORCED"]
        ip_ranges = data.get("list") == "ip-ranges"
        if ip_ranges:
            headers.insert(1, "COUNTRY")
        rows = []
        for key, entry in entries.items():
            row = [
                key,
                entry.get("reason"),
                entry.get("source"),
                entry.get("expires_at"),
                entry.get("added_by"),
                entry.get("added_at"),
                "no (shadow)" if entry.get("enforce") is False else "yes",
            ]
            if ip_ranges:
                row.insert(1, entry.get("country"))
            rows.append(row)
        shadows = sum(1 for entry in entries.values() if entry.get("enforce") is False)
        title = f"{data.get('list')}: {len(entries)} entries, policy version {data.get('version')}"
        if shadows:
            title += f" ({shadows} shadow, not enforced)"
        return title + ("\n" + table(headers, rows) if rows else "")

    emit(args, data, text)


def _group_and_licence_fields(args: argparse.Namespace) -> dict[str, Any]:
    """--countries (country-groups, licences), --org and --models (licences), as the entry's fields."""
    fields: dict[str, Any] = {}
    if args.countries is not None:
        fields["countries"] = _countries(args.countries)
    if args.org is not None:
        fields["org"] = args.org
    if args.models is not None:
        fields["models"] = _countries(args.models)
    return fields


def _lists_put(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"reason": args.reason}
    if args.source is not None:
        body["source"] = args.source
    if args.expires_at is not None:
        body["expires_at"] = args.expires_at
    if args.country is not None:
        body["country"] = args.country
    body.update(_group_and_licence_fields(args))
    if args.shadow:
        body["enforce"] = False
    data = write(args, "PUT", f"/admin/v1/lists/{segment(args.list)}/{segment(args.key)}", body=body)
    if data is None:
        return
    done = "written as a shadow entry (not enforced)" if args.shadow else "written"
    emit(args, data, written(f"{args.list} {data.get('key', args.key)} {done}"))


def _lists_patch(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {}
    body.update(_group_and_licence_fields(args))
    for name in ("reason", "source", "expires_at", "country"):
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    if args.no_expiry:
        if args.expires_at is not None:
            raise CliError("--expires-at and --no-expiry contradict each other")
        body["expires_at"] = None  # a merge patch's null removes the field
    if args.enforce is not None:
        body["enforce"] = args.enforce
    if not body:
        raise CliError(
            "nothing to change: give --reason, --source, --expires-at, --no-expiry, --country, --countries, "
            "--org, --models or --enforce/--shadow"
        )
    write_reporting(
        args,
        "PATCH",
        f"/admin/v1/lists/{segment(args.list)}/{segment(args.key)}",
        body=body,
        done=lambda data: f"{args.list} {data.get('key', args.key)} changed ({', '.join(body)})",
    )


def _lists_delete(args: argparse.Namespace) -> None:
    write_reporting(
        args,
        "DELETE",
        f"/admin/v1/lists/{segment(args.list)}/{segment(args.key)}",
        done=lambda data: f"{args.list} {data.get('key', args.key)} deleted",
    )


def _lists_replace(args: argparse.Namespace) -> None:
    document = read_document(args.file)
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise CliError(f"{args.file}: expected a mapping of key: entry")
    # The output of `lists get --json` (version, list, entries) reads back as it is.
    wrapped = isinstance(document.get("entries"), dict) and set(document) <= {"version", "list", "entries"}
    entries = document["entries"] if wrapped else document
    body = {"entries": entries, "allow_empty": args.allow_empty}
    write_reporting(
        args,
        "PUT",
        f"/admin/v1/lists/{segment(args.list)}",
        body=body,
        done=lambda data: f"{args.list} replaced with {data.get('count', len(entries))} entries",
    )


# --- models ----------------------------------------------------------------------------------


def _model_rows(name: str, model: Mapping[str, Any]) -> list[list[Any]]:
    """The model's row, and a second one for its shadow (not enforced) when it has one."""
    rows = [_model_row(name, model)]
    shadow = model.get("shadow")
    if isinstance(shadow, Mapping):
        rows.append(_model_row(f"{name} (shadow, not enforced)", shadow))
    return rows


def _step_text(step: Mapping[str, Any]) -> str:
    """A timeline entry in a table cell: ``at->`` and the fields it sets."""
    sets = []
    if "stage" in step:
        sets.append(str(step["stage"]))
    if "export_suspended" in step:
        sets.append("suspended" if step["export_suspended"] else "lifted")
    if "allowed_countries" in step:
        allowed = step["allowed_countries"]
        sets.append("countries any" if allowed is None else "countries " + ",".join(allowed))
    return f"{step.get('at')}->{' '.join(sets)}"


def _model_row(name: str, model: Mapping[str, Any]) -> list[Any]:
    timeline = [_step_text(step) for step in model.get("timeline") or []]
    allowed = model.get("allowed_countries")
    return [
        name,
        model.get("stage"),
        timeline,
        "any" if allowed is None else (allowed or "none"),
        model.get("export_suspended"),
    ]


_MODEL_HEADERS = ["NAME", "STAGE", "TIMELINE", "ALLOWED COUNTRIES", "EXPORT SUSPENDED"]


def _models_list(args: argparse.Namespace) -> None:
    data = admin_client(args).call("GET", "/admin/v1/models")

    def text(data: Any) -> str:
        models = data.get("models", {})
        title = f"{len(models)} models, policy version {data.get('version')}"
        rows = [row for name, model in models.items() for row in _model_rows(name, model)]
        return title + ("\n" + table(_MODEL_HEADERS, rows) if rows else "")

    emit(args, data, text)


def _models_get(args: argparse.Namespace) -> None:
    data = admin_client(args).call("GET", f"/admin/v1/models/{segment(args.name)}")

    def text(d: Any) -> str:
        lines = [table(_MODEL_HEADERS, _model_rows(d["name"], d["model"]))]
        current = d.get("current")
        if current:
            # The state in force now (timeline applied, country groups resolved), and what comes next.
            lines.append("now: " + _state_text(current))
            upcoming = d.get("next_change")
            lines.append("next change: " + (_step_text(upcoming) if upcoming else "none scheduled"))
        return "\n".join(lines)

    emit(args, data, text)


def _state_text(state: Mapping[str, Any]) -> str:
    allowed = state.get("allowed_countries")
    return (
        f"stage {state.get('stage')}, export {'suspended' if state.get('export_suspended') else 'not suspended'}, "
        f"allowed countries {'any' if allowed is None else ','.join(allowed) or 'none'}"
    )


def _timeline(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CliError(
            f"--timeline: not valid JSON ({exc}); expected e.g. "
            '\'[{"at": "2026-03-01T00:00:00Z", "stage": "general"}]\''
        ) from None


def _countries(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def _models_put(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"stage": args.stage, "export_suspended": args.export_suspended}
    if args.timeline is not None:
        body["timeline"] = _timeline(args.timeline)
    if args.allowed_countries is not None:
        body["allowed_countries"] = _countries(args.allowed_countries)
    if args.shadow:
        body["enforce"] = False
    data = write(args, "PUT", f"/admin/v1/models/{segment(args.name)}", body=body)
    if data is None:
        return
    if args.shadow:
        emit(args, data, written(f"model {args.name}: shadow written (not enforced; the live model unchanged)"))
        return
    emit(args, data, written(f"model {args.name} replaced whole"))
    left_out = [
        name
        for name, given in (("--timeline", args.timeline), ("--allowed-countries", args.allowed_countries))
        if given is None
    ]
    print(
        f"gateway: note: `models put` replaces {args.name} whole; "
        + (
            f"{' and '.join(left_out)} not given, so they took their defaults (no timeline; any country). "
            if left_out
            else ""
        )
        + "To change single fields use `gateway models patch` (or `models suspend` / `models lift`).",
        file=sys.stderr,
    )


def _models_patch(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {}
    if args.stage is not None:
        body["stage"] = args.stage
    if args.timeline is not None:
        body["timeline"] = _timeline(args.timeline)
    if args.allowed_countries is not None and args.any_country:
        raise CliError("--allowed-countries and --any-country contradict each other")
    if args.allowed_countries is not None:
        body["allowed_countries"] = _countries(args.allowed_countries)
    if args.any_country:
        body["allowed_countries"] = None  # a merge patch's null removes the restriction
    if args.export_suspended is not None:
        body["export_suspended"] = args.export_suspended
    if not body:
        raise CliError(
            "nothing to change: give --stage, --timeline, --allowed-countries, --any-country "
            "or --export-suspended/--no-export-suspended"
        )
    fields = ", ".join(body)
    done = f"model {args.name} changed ({fields})"
    if args.shadow:
        body["enforce"] = False
        done = f"model {args.name}: shadow changed ({fields}); not enforced, the live model unchanged"
    _patch_model(args, body, done)


def _models_promote(args: argparse.Namespace) -> None:
    _patch_model(args, {"enforce": True}, f"model {args.name}: shadow promoted; it is the live model now")


def _lists_promote(args: argparse.Namespace) -> None:
    path = f"/admin/v1/lists/{segment(args.list)}/{segment(args.key)}"
    write_reporting(
        args,
        "PATCH",
        path,
        body={"enforce": True},
        done=lambda data: f"{args.list} {data.get('key', args.key)} promoted: enforced now",
    )


def _patch_model(args: argparse.Namespace, body: dict[str, Any], done: str) -> None:
    write_reporting(args, "PATCH", f"/admin/v1/models/{segment(args.name)}", body=body, done=lambda data: done)


def _models_suspend(args: argparse.Namespace) -> None:
    _set_export(args, suspended=True)


def _models_lift(args: argparse.Namespace) -> None:
    _set_export(args, suspended=False)


def _set_export(args: argparse.Namespace, *, suspended: bool) -> None:
    """Suspend or lift a model's export (a merge patch of that one field), or only in its shadow."""
    if args.shadow:
        done = f"model {args.name}: shadow {'suspension' if suspended else 'lift'}"
        _patch_model(args, {"export_suspended": suspended, "enforce": False}, done)
        return
    what = "export suspended" if suspended else "export suspension lifted"
    _patch_model(
        args, {"export_suspended": suspended}, f"model {args.name}: {what} (its stage and allowed countries unchanged)"
    )


def _models_delete(args: argparse.Namespace) -> None:
    write_reporting(
        args, "DELETE", f"/admin/v1/models/{segment(args.name)}", done=lambda data: f"model {args.name} deleted"
    )


# --- API keys --------------------------------------------------------------------------------


def _keys_create(args: argparse.Namespace) -> None:
    body = {"subject": args.subject, "org": args.org, "country": args.country, "tier": args.tier}
    if args.org_name is not None:
        body["org_name"] = args.org_name
    if args.expires_at is not None:
        body["expires_at"] = args.expires_at
    data = write(args, "POST", "/admin/v1/api-keys", body=body)
    if data is None:
        return
    emit(
        args,
        data,
        lambda d: (
            f"id:  {d['id']}\nkey: {d['key']}\nThe key is shown only this once; "
            f"store it now. Policy version {d.get('version')}."
        ),
    )


def _keys_revoke(args: argparse.Namespace) -> None:
    write_reporting(
        args, "DELETE", f"/admin/v1/api-keys/{segment(args.id)}", done=lambda data: f"key {args.id} revoked"
    )


def _keys_list(args: argparse.Namespace) -> None:
    data = admin_client(args).call("GET", "/admin/v1/api-keys")

    def text(data: Any) -> str:
        keys = data.get("api_keys", {})
        rows = [
            [
                key_id,
                k.get("subject"),
                k.get("org"),
                k.get("org_name"),
                k.get("country"),
                k.get("tier"),
                k.get("expires_at"),
                k.get("created_at"),
                k.get("created_by"),
            ]
            for key_id, k in keys.items()
        ]
        headers = ["ID", "SUBJECT", "ORG", "ORG NAME", "COUNTRY", "TIER", "EXPIRES AT", "CREATED AT", "CREATED BY"]
        title = f"{len(keys)} keys, policy version {data.get('version')}"
        return title + ("\n" + table(headers, rows) if rows else "")

    emit(args, data, text)


# --- decide ----------------------------------------------------------------------------------


def _decide(args: argparse.Namespace) -> None:
    body = {
        "subject": args.subject,
        "org": args.org,
        "org_name": args.org_name,
        "country": args.country,
        "tier": args.tier,
        "ip": args.ip,
        "model": args.model,
        "explain": "all" if args.all else None,
    }
    data = admin_client(args).call("POST", "/admin/v1/decide", body={k: v for k, v in body.items() if v is not None})

    def text(d: Any) -> str:
        lines = [
            f"{d.get('decision')} {d.get('status')} {d.get('code') or ''}".rstrip(),
            d.get("message", ""),
            f"policy version {d.get('policy_version')}; IP country {d.get('ip_country') or 'unknown'}",
        ]
        if d.get("licence"):
            lines.append(f"licence: {d['licence']}")
        if d.get("screening"):
            hit = d["screening"]
            lines.append(f"screening: {hit.get('matched_name')} ({hit.get('source')}), score {hit.get('score')}")
        if "blocking" in d:
            blocking = d["blocking"]
            lines.append(f"rules that block: {len(blocking)}" if blocking else "rules that block: none")
            lines += [f"  {b.get('status')} {b.get('code')}: {b.get('message')}" for b in blocking]
        shadow = d.get("shadow")
        if shadow:
            outcome = f"{shadow.get('decision')} {shadow.get('status')} {shadow.get('code') or ''}".rstrip()
            lines.append(f"shadow (not enforced): {outcome}")
        return "\n".join(lines)

    emit(args, data, text)


# --- screening -------------------------------------------------------------------------------


def _screening_import(args: argparse.Namespace) -> None:
    raw = read_bytes(args.file)
    json_file = args.file.lower().endswith(".json") or raw.lstrip()[:1] in (b"{", b"[")
    content_type = "application/json" if json_file else "text/csv; charset=utf-8"
    write_reporting(
        args,
        "POST",
        "/admin/v1/screening/import",
        data=raw,
        content_type=content_type,
        done=lambda data: f"screening list replaced with {data.get('entries')} entries",
    )


def _screening_search(args: argparse.Namespace) -> None:
    query = {"name": args.name, "limit": args.limit, "min_score": args.min_score}
    data = admin_client(args).call("GET", "/admin/v1/screening/search", query=query)

    def text(d: Any) -> str:
        matches = d.get("matches", [])
        if not matches:
            return f"no match for {args.name!r} (policy version {d.get('version')})"
        rows = [
            [
                m.get("score"),
                "block" if m.get("blocked") else "review" if m.get("score", 0) >= d.get("review_threshold", 1) else "-",
                m.get("name"),
                m.get("matched_name"),
                m.get("source"),
                m.get("entry_id"),
            ]
            for m in matches
        ]
        return table(["SCORE", "ACTION", "NAME", "MATCHED NAME", "SOURCE", "ID"], rows)

    emit(args, data, text)


def _screening_hits(args: argparse.Namespace) -> None:
    query = {"new": "true"} if args.new else None
    data = admin_client(args).call("GET", "/admin/v1/screening/hits", query=query)

    def text(d: Any) -> str:
        hits = d.get("hits", [])
        if d.get("screened_at") is None:
            return "no screening import has been made yet"
        title = f"{len(hits)} hits, screened {d.get('screened_at')} at policy version {d.get('version')}"
        rows = [
            [
                "yes" if h.get("new") else "",
                h.get("kind"),
                h.get("id"),
                h.get("org"),
                h.get("org_name"),
                "block" if h.get("blocked") else "review",
                (h.get("match") or {}).get("score"),
                (h.get("match") or {}).get("matched_name"),
                (h.get("match") or {}).get("source"),
                h.get("first_found"),
            ]
            for h in hits
        ]
        headers = ["NEW", "KIND", "ID", "ORG", "ORG NAME", "ACTION", "SCORE", "MATCHED NAME", "SOURCE", "FIRST FOUND"]
        return title + ("\n" + table(headers, rows) if rows else "")

    emit(args, data, text)


# --- audit and change history ----------------------------------------------------------------

_AUDIT_HEADERS = [
    "TIME",
    "DECISION",
    "STATUS",
    "CODE",
    "SUBJECT",
    "ORG",
    "COUNTRY",
    "IP",
    "MODEL",
    "VERSION",
    "SCREENING",
    "LICENCE",
    "REQUEST ID",
]


def _screening_cell(hit: Any) -> str:
    """A screening hit in the audit table: the action and the score (the entry is in --json)."""
    if not isinstance(hit, Mapping):
        return ""
    return f"{'block' if hit.get('blocked') else 'review'} {hit.get('score')}"


def _audit_row(r: Mapping[str, Any]) -> list[Any]:
    country = "/".join(str(c) for c in (r.get("claimed_country"), r.get("ip_country")) if c)
    return [
        r.get("time"),
        r.get("decision"),
        r.get("status"),
        r.get("code"),
        r.get("subject"),
        r.get("org"),
        country,
        r.get("client_ip"),
        r.get("model"),
        r.get("policy_version"),
        _screening_cell(r.get("screening")),
        r.get("licence") or "",
        r.get("request_id"),
    ]


def _audit_key(record: Mapping[str, Any]) -> str:
    return str(record.get("id") or (record.get("time"), record.get("request_id")))


# The admin API's audit filters, which `audit tail` passes on as they are.
_TAIL_FILTERS = ("subject", "org", "model", "code", "since", "until")

# How far back a follower looks on each poll (the admin API's largest page).
_FOLLOW_WINDOW = 1000


class _Stopped(Exception):
    """SIGTERM reached a follower: it stops as Ctrl-C stops it, with status 0."""


def _stop_on_sigterm(_signum: int, _frame: object) -> None:
    raise _Stopped


def _audit_tail(args: argparse.Namespace) -> None:
    client = admin_client(args)
    # A follower reads the whole window once, so that every record already there counts as seen and
    # only those written later are printed; of the old ones it prints the last --limit, as without it.
    window = _FOLLOW_WINDOW if args.follow else args.limit
    filters = {name: getattr(args, name) for name in _TAIL_FILTERS if getattr(args, name) is not None}
    records = list(reversed(client.call("GET", "/admin/v1/audit", query={"limit": window, **filters})["records"]))
    _print_audit(args, records[-args.limit :], header=True)
    if not args.follow:
        return
    seen: deque[str] = deque((_audit_key(r) for r in records), maxlen=100_000)
    known = set(seen)
    # SIGTERM (what a service manager, `timeout` or a script sends) ends the follower cleanly; SIGINT
    # alone is not enough, since a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        while True:
            time.sleep(args.interval)
            batch = client.call("GET", "/admin/v1/audit", query={"limit": _FOLLOW_WINDOW, **filters})["records"]
            fresh = [r for r in reversed(batch) if _audit_key(r) not in known]
            for record in fresh:
                if len(seen) == seen.maxlen:
                    known.discard(seen[0])
                key = _audit_key(record)
                seen.append(key)
                known.add(key)
            _print_audit(args, fresh, header=False)
    except (KeyboardInterrupt, _Stopped):
        return


def _print_audit(args: argparse.Namespace, records: list[dict[str, Any]], *, header: bool) -> None:
    if args.json:
        # JSON Lines: one record per line, so a follower can be piped into jq.
        for record in records:
            print(json.dumps(record, ensure_ascii=False), flush=True)
        return
    if not records:
        if header:
            print("no audit records")
        return
    lines = table(_AUDIT_HEADERS, [_audit_row(r) for r in records]).splitlines()
    print("\n".join(lines if header else lines[1:]), flush=True)


def _changes(args: argparse.Namespace) -> None:
    data = admin_client(args).call("GET", "/admin/v1/changes", query={"limit": args.limit})

    def text(d: Any) -> str:
        changes = d.get("changes", [])
        if not changes:
            return "no changes recorded"
        rows = [
            [c.get("time"), c.get("actor"), c.get("version"), c.get("effect"), c.get("target"), _change_summary(c)]
            for c in changes
        ]
        return table(["TIME", "ACTOR", "VERSION", "EFFECT", "TARGET", "CHANGE"], rows)

    emit(args, data, text)


def _change_summary(change: Mapping[str, Any]) -> str:
    before, after = change.get("before") or {}, change.get("after") or {}
    parts = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        verb = "added" if old is None else "removed" if new is None else "changed"
        parts.append(f"{name} {verb}")
    return "; ".join(parts)


# --- change requests (the two-person rule) ------------------------------------------------------


def _request_row(r: Mapping[str, Any]) -> list[Any]:
    change = r.get("change") or {}
    return [
        r.get("id"),
        r.get("status"),
        r.get("effect"),
        r.get("proposed_by"),
        r.get("created_at"),
        r.get("expires_at"),
        f"{change.get('method')} {change.get('path', '').removeprefix('/admin/v1/')}",
        impact_summary(r.get("impact")) if r.get("impact") is not None else None,
    ]


_REQUEST_HEADERS = ["ID", "STATUS", "EFFECT", "PROPOSED BY", "CREATED AT", "EXPIRES AT", "CHANGE", "IMPACT"]


def _changes_pending(args: argparse.Namespace) -> None:
    query = {"status": None if args.all else "pending", "limit": args.limit}
    data = admin_client(args).call("GET", "/admin/v1/change-requests", query=query)

    def text(d: Any) -> str:
        requests = d.get("change_requests", [])
        if not requests:
            return "no change requests" if args.all else "no change requests await approval"
        return table(_REQUEST_HEADERS, [_request_row(r) for r in requests])

    emit(args, data, text)


def _changes_approve(args: argparse.Namespace) -> None:
    data = admin_client(args).call("POST", f"/admin/v1/change-requests/{segment(args.id)}/approve")
    request = data.get("change_request", {})
    emit(
        args,
        data,
        lambda d: (
            f"change request {args.id} approved by {request.get('approved_by')} and applied "
            f"(proposed by {request.get('proposed_by')}); policy version {d.get('version')}"
        ),
    )


def _changes_reject(args: argparse.Namespace) -> None:
    body = {"reason": args.reason} if args.reason is not None else None
    data = admin_client(args).call("POST", f"/admin/v1/change-requests/{segment(args.id)}/reject", body=body)
    request = data.get("change_request", {})
    emit(args, data, lambda _d: f"change request {args.id} rejected by {request.get('rejected_by')}; nothing changed")


# --- policy ----------------------------------------------------------------------------------


def _policy_export(args: argparse.Namespace) -> None:
    data = admin_client(args).call("GET", "/admin/v1/policy")
    if args.json:
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    else:
        stamp = now_iso()
        header = (
            f"# Export-control policy, version {data.get('version')}, exported {stamp} from "
            f"{args.admin_url}.\n# Every section is here (empty ones too), so the file restores an "
            "empty Redis: gateway policy import FILE.\n# Into a Redis that holds a policy the import "
            "replaces lists, models and screening whole and leaves api_keys\n# as they are (name them "
            "with --sections to replace them); revoked keys stay revoked.\n"
        )
        document = {key: value for key, value in data.items() if key != "version"}
        text = header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
    if args.file == "-":
        sys.stdout.write(text)
        return
    try:
        Path(args.file).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write {args.file}: {exc.strerror}") from None
    print(f"policy version {data.get('version')} exported to {args.file}", file=sys.stderr)


def _policy_import(args: argparse.Namespace) -> None:
    document = read_document(args.file)
    if not isinstance(document, dict):
        raise CliError(f"{args.file}: expected a policy mapping with lists, models, api_keys or screening")
    query = {"sections": args.sections} if args.sections is not None else None
    if args.dry_run:
        data = admin_client(args).call("POST", "/admin/v1/policy/diff", body=document, query=query)
        emit(args, data, _diff_text)
        return
    data = write(args, "PUT", "/admin/v1/policy", body=document, query=query)
    if data is None:
        return
    what = f"sections {args.sections}" if args.sections else "policy"
    emit(args, data, written(f"{what} imported from {args.file}"))


def _diff_text(data: Mapping[str, Any]) -> str:
    sections = data.get("sections") or {}
    where = "an empty Redis (a restore)" if data.get("restore") else f"policy version {data.get('version')}"
    rows = []
    for name, change in sections.items():
        if name == "screening":
            rows.append(
                [
                    name,
                    "",
                    "",
                    f"{change.get('before')} -> {change.get('after')} entries"
                    if change.get("changed")
                    else "unchanged",
                ]
            )
            continue
        rows.append([name, change.get("added"), change.get("removed"), change.get("changed")])
    title = f"dry run: what the import would change against {where}; nothing was changed"
    if not rows:
        return title + "\nno section would be written"
    return title + "\n" + table(["SECTION", "ADDED", "REMOVED", "CHANGED"], rows)


# --- argument parsing ------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_argument(
        "--admin-url",
        default=os.environ.get(URL_ENV) or DEFAULT_ADMIN_URL,
        help=f"admin listener URL (default ${URL_ENV} or {DEFAULT_ADMIN_URL})",
    )
    common.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for an answer")
    return common


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError("must be from 1 to 1000")
    return value


def _run(handler: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            handler(args)
        except CliError as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            return 1
        except BrokenPipeError:
            return 1
        return 0

    return run


def _leaf(
    sub: Any, name: str, handler: Callable[[argparse.Namespace], None], help_text: str, common: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, parents=[common])
    parser.set_defaults(func=_run(handler))
    return parser


def _write_leaf(
    sub: Any, name: str, handler: Callable[[argparse.Namespace], None], help_text: str, common: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    """A write command: it also takes ``--preview`` (print the change's impact before writing it)."""
    parser = _leaf(sub, name, handler, help_text, common)
    parser.add_argument(
        "--preview",
        action="store_true",
        help="first print the change's impact on recent callers (POST /admin/v1/impact), then write",
    )
    return parser


def _group(subparsers: Any, name: str, help_text: str) -> Any:
    parser = subparsers.add_parser(name, help=help_text)
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


_SHADOW_HELP = "write a shadow entry: stored, not enforced; decided alongside and recorded where it differs"


def _add_lists(subparsers: Any, common: argparse.ArgumentParser) -> None:
    sub = _group(subparsers, "lists", "show and change the live lists")
    get = _leaf(sub, "get", _lists_get, "show a list", common)
    get.add_argument("list", choices=LIST_NAMES)
    put = _write_leaf(sub, "put", _lists_put, "add or change one entry", common)
    put.add_argument("list", choices=LIST_NAMES)
    put.add_argument("key", help="country code, subject/org, or CIDR for ip-ranges")
    put.add_argument("--reason", required=True)
    put.add_argument("--source")
    put.add_argument("--expires-at", help="ISO-8601 instant with a time zone, e.g. 2027-01-31T00:00:00Z")
    put.add_argument("--country", help="ip-ranges only: the range's country")
    put.add_argument("--countries", help="country-groups, licences: comma-separated codes (licences: or @GROUP)")
    put.add_argument("--org", help="licences only: the organisation it is granted to")
    put.add_argument("--models", help="licences only: comma-separated registered models")
    put.add_argument("--shadow", action="store_true", help=_SHADOW_HELP)
    patch = _write_leaf(sub, "patch", _lists_patch, "change only the named fields of one entry (merge patch)", common)
    patch.add_argument("list", choices=LIST_NAMES)
    patch.add_argument("key", help="country code, subject/org, or CIDR for ip-ranges")
    patch.add_argument("--reason")
    patch.add_argument("--source")
    patch.add_argument("--expires-at", help="ISO-8601 instant with a time zone, e.g. 2027-01-31T00:00:00Z")
    patch.add_argument("--no-expiry", action="store_true", help="remove the entry's expires_at")
    patch.add_argument("--country", help="ip-ranges only: the range's country")
    patch.add_argument("--countries", help="country-groups, licences: comma-separated codes (licences: or @GROUP)")
    patch.add_argument("--org", help="licences only: the organisation it is granted to")
    patch.add_argument("--models", help="licences only: comma-separated registered models")
    patch.add_argument(
        "--enforce",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--enforce makes a shadow entry live; --no-enforce makes the entry a shadow (not enforced)",
    )
    promote = _write_leaf(sub, "promote", _lists_promote, "make a shadow entry live (PATCH enforce: true)", common)
    promote.add_argument("list", choices=LIST_NAMES)
    promote.add_argument("key")
    delete = _write_leaf(sub, "delete", _lists_delete, "remove one entry", common)
    delete.add_argument("list", choices=LIST_NAMES)
    delete.add_argument("key")
    replace = _write_leaf(sub, "replace", _lists_replace, "replace a whole list from a YAML/JSON file", common)
    replace.add_argument("list", choices=LIST_NAMES)
    replace.add_argument("file", help="YAML or JSON mapping of key: entry ('-' for stdin)")
    replace.add_argument("--allow-empty", action="store_true", help="allow replacing the list with nothing")


def _add_models(subparsers: Any, common: argparse.ArgumentParser) -> None:
    sub = _group(subparsers, "models", "show and change the model registry")
    _leaf(sub, "list", _models_list, "show every model", common)
    get = _leaf(sub, "get", _models_get, "show one model", common)
    get.add_argument("name")
    put = _write_leaf(
        sub,
        "put",
        _models_put,
        "add a model, or REPLACE one whole: flags not given take their "
        "defaults (any country, no timeline, not suspended); to change one field use patch",
        common,
    )
    put.add_argument("name")
    put.add_argument("--stage", required=True, choices=STAGES)
    put.add_argument("--timeline", help='JSON list, e.g. \'[{"at": "2026-03-01T00:00:00Z", "stage": "general"}]\'')
    put.add_argument("--allowed-countries", help="comma-separated country codes; omit for any country")
    put.add_argument("--export-suspended", action=argparse.BooleanOptionalAction, default=False)
    put.add_argument("--shadow", action="store_true", help=_SHADOW_HELP + "; the live model stays")
    patch = _write_leaf(sub, "patch", _models_patch, "change only the named fields of a model (merge patch)", common)
    patch.add_argument("name")
    patch.add_argument("--stage", choices=STAGES)
    patch.add_argument(
        "--timeline",
        help='JSON list replacing the timeline, e.g. \'[{"at": "2026-03-01T00:00:00Z", "stage": "general"}]\'',
    )
    patch.add_argument("--allowed-countries", help="comma-separated country codes replacing the set")
    patch.add_argument("--any-country", action="store_true", help="remove the country restriction")
    patch.add_argument(
        "--export-suspended",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="suspend (or, with --no-export-suspended, lift) the model's export",
    )
    patch.add_argument("--shadow", action="store_true", help="change the model's shadow, not the live model")
    promote = _write_leaf(
        sub, "promote", _models_promote, "make a model's shadow the live model (PATCH enforce: true)", common
    )
    promote.add_argument("name")
    suspend = _write_leaf(
        sub,
        "suspend",
        _models_suspend,
        "suspend a model's export now; its stage and allowed countries stay as they are",
        common,
    )
    suspend.add_argument("name")
    suspend.add_argument("--shadow", action="store_true", help="suspend in the shadow only (not enforced)")
    lift = _write_leaf(
        sub,
        "lift",
        _models_lift,
        "lift a model's export suspension; its stage and allowed countries stay as they are",
        common,
    )
    lift.add_argument("name")
    lift.add_argument("--shadow", action="store_true", help="lift in the shadow only (not enforced)")
    delete = _write_leaf(sub, "delete", _models_delete, "remove a model", common)
    delete.add_argument("name")


def _add_keys(subparsers: Any, common: argparse.ArgumentParser) -> None:
    sub = _group(subparsers, "keys", "issue, list and revoke API keys")
    create = _write_leaf(sub, "create", _keys_create, "issue a key (shown once)", common)
    create.add_argument("--subject", required=True)
    create.add_argument("--org", required=True)
    create.add_argument("--country", required=True)
    create.add_argument("--tier", required=True)
    create.add_argument("--org-name")
    create.add_argument("--expires-at", help="ISO-8601 instant with a time zone")
    revoke = _write_leaf(sub, "revoke", _keys_revoke, "revoke a key by id", common)
    revoke.add_argument("id")
    _leaf(sub, "list", _keys_list, "show issued keys", common)


def _add_decide(subparsers: Any, common: argparse.ArgumentParser) -> None:
    decide = _leaf(subparsers, "decide", _decide, "the decision the gateway would make now (dry run)", common)
    decide.add_argument("--subject", required=True)
    decide.add_argument("--tier", required=True)
    decide.add_argument("--ip", required=True)
    decide.add_argument("--org")
    decide.add_argument("--org-name")
    decide.add_argument("--country")
    decide.add_argument("--model")
    decide.add_argument("--all", action="store_true", help="list every rule that blocks, not only the first")


def _add_screening(subparsers: Any, common: argparse.ArgumentParser) -> None:
    sub = _group(subparsers, "screening", "the denied-parties screening list")
    imp = _write_leaf(sub, "import", _screening_import, "replace the list with a CSL CSV or JSON export", common)
    imp.add_argument("file", help="Consolidated Screening List CSV or JSON ('-' for stdin)")
    search = _leaf(sub, "search", _screening_search, "scored matches for a name", common)
    search.add_argument("name")
    search.add_argument("--limit", type=_positive, default=10)
    search.add_argument("--min-score", type=float, default=0.5)
    hits = _leaf(
        sub, "hits", _screening_hits, "API keys and partners the last import found to match (blocked by rule 2)", common
    )
    hits.add_argument("--new", action="store_true", help="only those first found by the last import")


def _add_history(subparsers: Any, common: argparse.ArgumentParser) -> None:
    sub = _group(subparsers, "audit", "the decision audit trail")
    tail = _leaf(sub, "tail", _audit_tail, "the latest decisions, oldest first (--json: JSON Lines)", common)
    tail.add_argument("--limit", type=_positive, default=20)
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    tail.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --follow")
    for name in _TAIL_FILTERS:
        hint = "ISO-8601 time" if name in ("since", "until") else "exact value"
        tail.add_argument(f"--{name}", help=f"only records with this {name} ({hint})")
    add_archive_commands(sub)
    changes = _leaf(
        subparsers,
        "changes",
        _changes,
        "who changed the policy, newest first; pending, approve, reject: change requests",
        common,
    )
    changes.add_argument("--limit", type=_positive, default=50)
    requests = changes.add_subparsers(dest="changes_command", required=False, metavar="COMMAND")
    pending = _leaf(requests, "pending", _changes_pending, "change requests awaiting approval, newest first", common)
    pending.add_argument("--all", action="store_true", help="every kept request, whatever its status")
    pending.add_argument("--limit", type=_positive, default=100)
    approve = _leaf(requests, "approve", _changes_approve, "approve another admin's change request: apply it", common)
    approve.add_argument("id")
    reject = _leaf(requests, "reject", _changes_reject, "reject a change request (or withdraw your own)", common)
    reject.add_argument("id")
    reject.add_argument("--reason", help="why, kept with the request and in the change history")


def _add_policy(subparsers: Any, common: argparse.ArgumentParser) -> None:
    sub = _group(subparsers, "policy", "export and import the whole policy (YAML)")
    export = _leaf(sub, "export", _policy_export, "write the whole policy as YAML", common)
    export.add_argument("file", help="output file, or '-' for stdout")
    imp = _write_leaf(
        sub,
        "import",
        _policy_import,
        "replace each section the file holds (also the restore); api_keys only when --sections names them",
        common,
    )
    imp.add_argument("file", help="YAML or JSON policy document ('-' for stdin)")
    imp.add_argument(
        "--sections",
        help="comma-separated sections to replace, from lists, models, api_keys, "
        "screening (default: every one the file holds but api_keys; a restore into an empty "
        "Redis writes them all)",
    )
    imp.add_argument(
        "--dry-run",
        action="store_true",
        help="print what the import would add, remove and change per section; change nothing",
    )


def add_operator_commands(subparsers: Any) -> None:
    """Add ``lists``, ``models``, ``keys``, ``decide``, ``screening``, ``audit``, ``changes``, ``policy``."""
    common = _common()
    _add_lists(subparsers, common)
    _add_models(subparsers, common)
    _add_keys(subparsers, common)
    _add_decide(subparsers, common)
    _add_screening(subparsers, common)
    _add_history(subparsers, common)
    _add_policy(subparsers, common)
