"""The operator CLI's input and output: the admin API client, tables and JSON on stdout, warnings on
stderr, and the YAML or JSON files operators hand it. Only the standard library speaks HTTP here."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..settings import ConfigError, read_secret

DEFAULT_ADMIN_URL = "http://127.0.0.1:9901"
TOKEN_ENV = "GATEWAY_ADMIN_TOKEN"
URL_ENV = "GATEWAY_ADMIN_URL"
_CELL_LIMIT = 60


class CliError(Exception):
    """A failure to report on stderr; the command exits with status 1."""


# --- talking to the admin API ----------------------------------------------------------------


class AdminClient:
    """JSON over HTTP to the admin listener, with errors turned into one readable sentence."""

    def __init__(self, base_url: str, token: str, *, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        data: bytes | None = None,
        content_type: str = "application/json",
        query: Mapping[str, Any] | None = None,
    ) -> Any:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            raise CliError(_http_error_message(method, path, exc)) from None
        except urllib.error.URLError as exc:
            raise CliError(self._unreachable(exc.reason)) from None
        except (TimeoutError, ConnectionError) as exc:
            raise CliError(self._unreachable(exc)) from None
        try:
            return json.loads(payload) if payload else {}
        except ValueError:
            raise CliError(f"{method} {path}: the admin API answered with something that is not JSON") from None

    def _unreachable(self, reason: object) -> str:
        if isinstance(reason, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(reason, TimeoutError):
            why = f"no answer within {self.timeout:g} s"
        else:
            why = str(reason)
        return (
            f"cannot reach the admin API at {self.base_url}: {why}. Is `gateway serve` running, and "
            f"does {URL_ENV} point at its admin listener?"
        )


def _http_error_message(method: str, path: str, exc: urllib.error.HTTPError) -> str:
    try:
        error = json.loads(exc.read())["error"]
        return f"{method} {path}: {exc.code} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError, OSError):
        return f"{method} {path}: HTTP {exc.code} {exc.reason}"


def admin_client(args: argparse.Namespace) -> AdminClient:
    try:
        token = read_secret(TOKEN_ENV)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    if not token:
        raise CliError(
            f"{TOKEN_ENV} is not set: export the admin token (or {TOKEN_ENV}_FILE naming a file that holds it)"
        )
    return AdminClient(args.admin_url, token, timeout=args.timeout)


def segment(value: str) -> str:
    # Every character that is not unreserved is encoded, so a CIDR's "/" stays one path segment.
    return urllib.parse.quote(value, safe="")


# --- output ----------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None or value == "" or value == []:
        text = "-"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, list | tuple):
        text = ",".join(_cell(item) for item in value)
    elif isinstance(value, dict):
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    else:
        text = str(value)
    text = " ".join(text.split())
    return text if len(text) <= _CELL_LIMIT else text[: _CELL_LIMIT - 3] + "..."


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in cells]) for i, header in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def emit(args: argparse.Namespace, data: Any, text: Callable[[Any], str]) -> None:
    if args.json:
        print_json(data)
    else:
        print(text(data))
    print_warnings(data)


def print_warnings(data: Any) -> None:
    """A write that succeeded but carries a risk says so on stderr (also with --json, whose output
    holds the same ``warnings``), so a script's log and a person's terminal both show it."""
    warnings = data.get("warnings") if isinstance(data, dict) else None
    for warning in warnings or ():
        print(f"gateway: warning: {warning}", file=sys.stderr)


def written(what: str) -> Callable[[Any], str]:
    return lambda data: f"{what}; policy version {data.get('version')}"


def write_reporting(
    args: argparse.Namespace, method: str, path: str, done: Callable[[Any], str], **kwargs: Any
) -> Any | None:
    """:func:`write`, then report it: ``done(answer)`` says what was written (nothing when it is held)."""
    data = write(args, method, path, **kwargs)
    if data is not None:
        emit(args, data, written(done(data)))
    return data


# --- reading files ---------------------------------------------------------------------------


def read_bytes(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror}") from None


def read_document(name: str) -> Any:
    """A YAML or JSON file (JSON is YAML) as plain JSON values."""
    try:
        data = yaml.safe_load(read_bytes(name))
    except yaml.YAMLError as exc:
        raise CliError(f"{name}: not valid YAML or JSON: {exc}") from None
    return _plain(data, name)


def _plain(value: Any, where: str) -> Any:
    """YAML's dates and non-string keys made JSON: the admin API validates the rest."""
    if isinstance(value, dt.datetime):
        return value.isoformat() if value.tzinfo else value.isoformat() + "Z"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, list):
        return [_plain(item, where) for item in value]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(key, bool) or key is None:
                # YAML 1.1 reads NO, YES, ON, OFF as booleans: Norway must be quoted.
                raise CliError(
                    f"{where}: the key {key!r} is not text (YAML read it as "
                    f"{type(key).__name__}); quote it, e.g. 'NO': ..."
                )
            out[str(key)] = _plain(item, where)
        return out
    return value


# --- writes: the impact preview first, and writes held for approval ----------------------------


def impact_summary(impact: Any) -> str:
    """One line for an impact preview: callers decided again, and how many would change."""
    if not isinstance(impact, dict):
        return "no impact preview"
    block, allow = impact.get("would_block") or [], impact.get("would_allow") or []
    blocked = impact.get("would_block_count", len(block))
    allowed = impact.get("would_allow_count", len(allow))
    return (
        f"{impact.get('callers', '?')} recent callers decided again: "
        f"{blocked} would be blocked, {allowed} would be allowed"
    )


def _impact_text(impact: Mapping[str, Any]) -> str:
    lines = [f"impact preview ({impact.get('effect', '?')}): {impact_summary(impact)}"]
    for kind in ("would_block", "would_allow"):
        rows = [
            [r.get("subject"), r.get("org"), r.get("tier"), r.get("model"), r.get("code"), r.get("requests")]
            for r in impact.get(kind) or []
        ]
        if rows:
            lines.append(f"{kind.replace('_', ' ')}:")
            lines.append(table(["SUBJECT", "ORG", "TIER", "MODEL", "CODE", "REQUESTS"], rows[:50]))
            if len(rows) > 50:
                lines.append(f"... and {len(rows) - 50} more (--json shows them all)")
    return "\n".join(lines)


def write(
    args: argparse.Namespace,
    method: str,
    path: str,
    *,
    body: Any = None,
    data: bytes | None = None,
    content_type: str = "application/json",
    query: Mapping[str, Any] | None = None,
) -> Any | None:
    """Send one admin write; None when it is held for approval (already reported, exit status 0).

    With ``--preview`` the impact of the same change is printed first (on stderr, so ``--json``
    output stays the write's answer); a preview that cannot be made stops the command unwritten.
    """
    client = admin_client(args)
    if getattr(args, "preview", False):
        shown = path
        if query:
            shown += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        described = body if data is None else data.decode("utf-8", "replace")
        change = {"method": method, "path": shown, "body": described}
        impact = client.call("POST", "/admin/v1/impact", body={"change": change})
        print(json.dumps(impact, ensure_ascii=False) if args.json else _impact_text(impact), file=sys.stderr)
    answer = client.call(method, path, body=body, data=data, content_type=content_type, query=query)
    if isinstance(answer, dict) and "change_request" in answer and "version" not in answer:
        emit(args, answer, held_text)
        request = answer["change_request"]
        print_warnings(request)
        return None
    return answer


def held_text(data: Mapping[str, Any]) -> str:
    """What a write held for a second admin's approval says."""
    request = data["change_request"]
    lines = [
        f"change request {request.get('id')} awaits approval by another admin "
        f"(effect {request.get('effect')}; expires {request.get('expires_at')}); nothing was changed yet",
        f"impact: {impact_summary(request.get('impact'))}",
        f"approve: gateway changes approve {request.get('id')}",
    ]
    if "key" in data:
        lines[1:1] = [
            f"id:  {data.get('id')}",
            f"key: {data.get('key')}",
            "The key is shown only this once; store it now. It works once the request is approved.",
        ]
    return "\n".join(lines)
