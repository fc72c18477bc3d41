"""The console's pages and their routes under ``/console/`` on the admin listener.

Every change is the admin API's own write: the form becomes the ``{"method", "path", "body"}`` of the
``/admin/v1`` write it stands for, planned by the same :class:`WritePlanner` and committed (or held for
approval) by the same :class:`ChangeControl`, as the signed-in actor. Reads use the same store and
snapshot as the API's reads. The middleware here guards every console path: security headers on every
answer, a session for every page but sign-in and the stylesheet, and for every POST the same-origin
check and the CSRF token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..admin.api import AdminApi
from ..admin.audit_filters import audit_filter_of
from ..admin.auth import AdminTokens
from ..errors import BackendUnavailable, GatewayError, error_for
from ..network import TrustedProxies
from ..policy.names import LIST_NAMES
from ..storage.audit_search import AuditPage
from ..storage.keys import APIKEYS_KEY, MODELS_KEY, list_key
from .security import add_security_headers, is_secure, same_origin
from .sessions import (
    COOKIE,
    IDLE_S,
    SESSION_KEY,
    SIGNIN_COOKIE,
    ConsoleSession,
    SessionStore,
    clear_cookie,
    set_cookie,
)
from .views import (
    AUDIT_COLUMNS,
    AUDIT_FILTERS,
    CONSOLE_ONLY_FILTERS,
    audit_csv,
    audit_matches,
    diff_lines,
    minute_chart,
    pretty,
    read_metrics,
)

log = logging.getLogger("gateway.console")

ROOT = "/console"
HERE = Path(__file__).resolve().parent
ADMIN = "/admin/v1"
CHANGE_STATUSES = ("pending", "applied", "rejected", "expired")
AUDIT_SCAN_CAP = 200_000  # records one audit search reads at most (the API's own bound)
CHART_RECORDS = 50_000  # at most this many records of the last hour are counted for the chart
OPEN = frozenset({ROOT + "/signin"})
SECURE_KEY: web.RequestKey[bool] = web.RequestKey("console_secure", bool)

Page = Callable[..., Awaitable[web.Response]]


class Notice:
    """What a write answered, for the page it lands on: applied, held as a change request, or refused."""

    def __init__(self, *, kind: str, message: str, answer: dict[str, Any] | None = None) -> None:
        self.kind = kind  # "ok", "held" or "error"
        self.message = message
        self.answer = answer or {}
        self.warnings: list[str] = list(self.answer.get("warnings") or [])
        self.change_request: dict[str, Any] | None = self.answer.get("change_request")


class Console:
    """The pages; ``api`` is the ``/admin/v1`` handlers' object, shared so a page's write is the API's write."""

    def __init__(
        self,
        api: AdminApi,
        *,
        trusted: TrustedProxies,
        metrics: Callable[[], str],
        max_staleness_s: float,
    ) -> None:
        self.api = api
        self.store = api.store
        self.tokens = AdminTokens(api.context.admin, api.context.environ)
        self.sessions = SessionStore(api.store)
        self.trusted = trusted
        self.metrics = metrics
        self.max_staleness_s = max_staleness_s
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["pretty"] = pretty
        self.env.filters["q"] = lambda value: quote(str(value), safe="")
        self.env.globals.update(root=ROOT, list_names=LIST_NAMES)

    # --- rendering ------------------------------------------------------------------------------

    def render(self, request: web.Request, template: str, *, status: int = 200, **context: Any) -> web.Response:
        session = request.get(SESSION_KEY)
        html = self.env.get_template(template).render(
            session=session,
            csrf=session.csrf if session is not None else context.pop("csrf", ""),
            here=request.path,
            notice=context.pop("notice", None),
            **context,
        )
        return web.Response(status=status, text=html, content_type="text/html", charset="utf-8")

    async def write(self, request: web.Request, method: str, path: str, body: Any = None) -> Notice:
        """One admin write as the signed-in actor, through the API's planner and change control."""
        actor = request[SESSION_KEY].actor
        try:
            call, planner = self.api.planner.call_of({"method": method, "path": path, "body": body}, actor)
            response = await self.api.changes_control.commit(call, await planner(call))
        except Exception as exc:
            return refused(exc)
        answer = orjson.loads(response.body) if isinstance(response.body, bytes) else {}
        if response.status == 202:
            cr = answer.get("change_request") or {}
            return Notice(
                kind="held",
                message=f"Held for approval by another admin as change request {cr.get('id')} "
                f"(effect {cr.get('effect')}).",
                answer=answer,
            )
        return Notice(kind="ok", message=f"Done: policy version {answer.get('version')}.", answer=answer)

    # --- sign-in, sign-out --------------------------------------------------------------------

    async def signin_form(self, request: web.Request) -> web.Response:
        if request.get(SESSION_KEY) is not None:
            return redirect(ROOT + "/")
        return self._signin_page(request)

    def _signin_page(self, request: web.Request, *, error: str | None = None, status: int = 200) -> web.Response:
        import secrets

        token = secrets.token_urlsafe(32)
        next_path = _local_path(request.query.get("next") or "")
        response = self.render(
            request,
            "signin.html",
            status=status,
            csrf=token,
            error=error,
            next_path=next_path,
            notice=None,
        )
        set_cookie(response, SIGNIN_COOKIE, token, secure=request[SECURE_KEY], max_age=IDLE_S)
        return response

    async def signin(self, request: web.Request) -> web.Response:
        form = await request.post()
        import hmac

        expected = request.cookies.get(SIGNIN_COOKIE, "")
        sent = str(form.get("csrf", ""))
        if not expected or not hmac.compare_digest(expected.encode(), sent.encode("utf-8", "replace")):
            return self._signin_page(request, error="The sign-in form had expired; please try again.", status=403)
        actor = self.tokens.actor_of_token(str(form.get("token", "")).strip())
        if actor is None:
            log.warning("console sign-in refused from %s", request.remote)
            return self._signin_page(request, error="That admin token is not accepted.", status=401)
        value, _session = await self.sessions.create(actor)
        log.info("console sign-in: %s", actor)
        target = _local_path(str(form.get("next", ""))) or ROOT + "/"
        response = redirect(target)
        secure = request[SECURE_KEY]
        set_cookie(response, COOKIE, value, secure=secure, max_age=IDLE_S)
        clear_cookie(response, SIGNIN_COOKIE, secure=secure)
        return response

    async def signout(self, request: web.Request) -> web.Response:
        await self.sessions.end(request[SESSION_KEY])
        response = redirect(ROOT + "/signin?signed_out=1")
        clear_cookie(response, COOKIE, secure=request[SECURE_KEY])
        return response

    # --- overview -----------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        now = time.time()
        records: list[bytes] = []
        async for page in self.store.read_audit_window(int((now - 3600) * 1000), limit=CHART_RECORDS):
            records.extend(page)
        chart = minute_chart(records, now)
        view = read_metrics(self.metrics(), max_staleness_s=self.max_staleness_s)
        version, _generation = await self.store.read_version()
        policy = self.api.policy
        pending = await self.store.change_requests(status="pending", limit=100, now=now)
        return self.render(
            request,
            "overview.html",
            chart=chart,
            view=view,
            stored_version=version,
            enforced_version=policy.version,
            stale=policy.stale(),
            pending=len(pending),
        )

    # --- models -------------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        version, models = await self._hash(MODELS_KEY)
        return self.render(request, "models.html", version=version, models=models)

    async def model(self, request: web.Request, notice: Notice | None = None, status: int = 200) -> web.Response:
        name = request.match_info["model"]
        version, models = await self._hash(MODELS_KEY)
        if name not in models:
            raise web.HTTPNotFound(text=f"No model {name!r} in the registry.")
        return self.render(
            request, "model.html", status=status, name=name, model=models[name], version=version, notice=notice
        )

    async def model_post(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        form = await request.post()
        action = form.get("action")
        path = f"{ADMIN}/models/{quote(name, safe='')}"
        body: dict[str, Any]
        if action == "suspend":
            body = {"export_suspended": True}
        elif action == "lift":
            body = {"export_suspended": False}
        elif action == "countries":
            text = str(form.get("allowed_countries", "")).strip()
            body = {"allowed_countries": None if text == "*" else _codes(text)}
        elif action == "stage":
            body = {"stage": str(form.get("stage", ""))}
        else:
            raise web.HTTPBadRequest(text="unknown action")
        notice = await self.write(request, "PATCH", path, body)
        return await self.model(request, notice, _status(notice))

    # --- lists --------------------------------------------------------------------------------

    async def lists(self, _request: web.Request) -> web.Response:
        return redirect(f"{ROOT}/lists/{LIST_NAMES[0]}")

    async def list_page(self, request: web.Request, notice: Notice | None = None, status: int = 200) -> web.Response:
        name = request.match_info["list"]
        if name not in LIST_NAMES:
            raise web.HTTPNotFound(text=f"No list {name!r}.")
        version, entries = await self._hash(list_key(name))
        search = request.query.get("q", "").strip().lower()
        shown = {
            key: entry
            for key, entry in sorted(entries.items())
            if not search or search in key.lower() or search in str(entry.get("reason", "")).lower()
        }
        return self.render(
            request,
            "list.html",
            status=status,
            name=name,
            version=version,
            entries=shown,
            total=len(entries),
            search=request.query.get("q", ""),
            notice=notice,
        )

    async def list_post(self, request: web.Request) -> web.Response:
        name = request.match_info["list"]
        if name not in LIST_NAMES:
            raise web.HTTPNotFound(text=f"No list {name!r}.")
        form = await request.post()
        action = form.get("action")
        key = str(form.get("key", "")).strip()
        path = f"{ADMIN}/lists/{name}/{quote(key, safe='')}"
        fields = {field: str(form.get(field, "")).strip() for field in ("reason", "source", "expires_at", "country")}
        if action == "add":
            body: dict[str, Any] = {k: v for k, v in fields.items() if v and (k != "country" or name == "ip-ranges")}
            if form.get("shadow") == "on":
                body["enforce"] = False
            notice = await self.write(request, "PUT", path, body)
        elif action == "edit":
            patch: dict[str, Any] = {k: (v or None) for k, v in fields.items() if k in ("source", "expires_at")}
            if fields["reason"]:
                patch["reason"] = fields["reason"]
            notice = await self.write(request, "PATCH", path, patch)
        elif action == "expire":
            notice = await self.write(request, "PATCH", path, {"expires_at": fields["expires_at"] or None})
        elif action == "remove":
            notice = await self.write(request, "DELETE", path)
        else:
            raise web.HTTPBadRequest(text="unknown action")
        return await self.list_page(request, notice, _status(notice))

    # --- API keys -----------------------------------------------------------------------------

    async def keys(self, request: web.Request, notice: Notice | None = None, status: int = 200) -> web.Response:
        version, keys = await self._hash(APIKEYS_KEY)
        return self.render(
            request, "keys.html", status=status, version=version, keys=keys, notice=notice, tiers=self.api.tiers
        )

    async def keys_post(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("action") == "issue":
            body = {
                field: str(form.get(field, "")).strip()
                for field in ("subject", "org", "org_name", "country", "tier", "expires_at")
                if str(form.get(field, "")).strip()
            }
            notice = await self.write(request, "POST", f"{ADMIN}/api-keys", body)
        elif form.get("action") == "revoke":
            key_id = str(form.get("id", ""))
            notice = await self.write(request, "DELETE", f"{ADMIN}/api-keys/{quote(key_id, safe='')}")
        else:
            raise web.HTTPBadRequest(text="unknown action")
        return await self.keys(request, notice, _status(notice))

    # --- screening ----------------------------------------------------------------------------

    async def screening(self, request: web.Request, notice: Notice | None = None, status: int = 200) -> web.Response:
        name = request.query.get("name", "").strip()
        answer: dict[str, Any] | None = None
        error = None
        if name:
            try:
                answer = await self.api.screening_answer(name[:500], 20, 0.0)
            except GatewayError as exc:
                error = exc.message
        return self.render(
            request, "screening.html", status=status, name=name, answer=answer, error=error, notice=notice
        )

    async def screening_post(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        if not isinstance(upload, web.FileField):
            notice = Notice(kind="error", message="Choose a Consolidated Screening List file (CSV or JSON) to import.")
            return await self.screening(request, notice, 400)
        data = upload.file.read()
        text = data.decode("utf-8-sig", "replace") if isinstance(data, bytes) else str(data)
        notice = await self.write(request, "POST", f"{ADMIN}/screening/import", text)
        return await self.screening(request, notice, _status(notice))

    # --- change requests ----------------------------------------------------------------------

    async def change_requests(self, request: web.Request) -> web.Response:
        status = request.query.get("status", "pending")
        if status not in (*CHANGE_STATUSES, "all"):
            status = "pending"
        found = await self.store.change_requests(status=None if status == "all" else status, limit=200, now=time.time())
        return self.render(request, "change_requests.html", requests=found, shown=status, statuses=CHANGE_STATUSES)

    async def change_request(
        self, request: web.Request, notice: Notice | None = None, status: int = 200
    ) -> web.Response:
        found = await self.store.change_request(request.match_info["id"], now=time.time())
        return self.render(request, "change_request.html", status=status, cr=found, notice=notice)

    async def change_request_post(self, request: web.Request) -> web.Response:
        form = await request.post()
        session: ConsoleSession = request[SESSION_KEY]
        request_id = request.match_info["id"]
        control = self.api.changes_control
        try:
            if form.get("action") == "approve":
                answer = await control.approve_request(request_id, session.actor)
                notice = Notice(kind="ok", message=f"Approved and applied: policy version {answer['version']}.")
            elif form.get("action") == "reject":
                reason = str(form.get("reason", "")).strip() or None
                await control.reject_request(request_id, session.actor, reason)
                notice = Notice(kind="ok", message="Rejected; nothing was changed.")
            else:
                raise web.HTTPBadRequest(text="unknown action")
        except web.HTTPException:
            raise
        except Exception as exc:  # a domain refusal (approval_self, change_conflict, ...) shown on the page
            notice = refused(exc)
        return await self.change_request(request, notice, _status(notice))

    # --- history, audit, decide ---------------------------------------------------------------

    async def changes(self, request: web.Request) -> web.Response:
        found = await self.store.read_changes(_bounded_int(request.query.get("limit"), 50, 500))
        rows = [(change, diff_lines(change.get("before"), change.get("after"))) for change in found]
        return self.render(request, "changes.html", rows=rows)

    async def _audit_records(self, request: web.Request) -> tuple[dict[str, str], AuditPage]:
        """The records the form's filters select, newest first: the admin API's own audit search
        (subject, org, model, code, since, until), then the console's decision and country filters."""
        filters = {name: request.query.get(name, "").strip()[:256] for name in AUDIT_FILTERS}
        limit = _bounded_int(request.query.get("limit"), 100, 1000)
        chosen = audit_filter_of({k: v for k, v in filters.items() if v and k not in CONSOLE_ONLY_FILTERS})
        extra = {k: filters[k] for k in CONSOLE_ONLY_FILTERS}

        def match(record: dict[str, Any]) -> bool:
            return chosen(record) and audit_matches(record, extra)

        page = await self.store.search_audit(
            limit, match, since_ms=chosen.since_ms, until_ms=chosen.until_ms, scan_cap=AUDIT_SCAN_CAP
        )
        return filters, page

    async def audit(self, request: web.Request) -> web.Response:
        error: str | None = None
        try:
            filters, page = await self._audit_records(request)
        except GatewayError as exc:
            filters = {name: request.query.get(name, "") for name in AUDIT_FILTERS}
            page, error = AuditPage([], 0, True), exc.message
        query = urlencode({k: v for k, v in filters.items() if v})
        return self.render(
            request,
            "audit.html",
            status=400 if error else 200,
            filters=filters,
            page=page,
            error=error,
            columns=AUDIT_COLUMNS,
            csv_href=f"{ROOT}/audit.csv" + (f"?{query}" if query else ""),
        )

    async def audit_csv(self, request: web.Request) -> web.Response:
        _filters, page = await self._audit_records(request)
        records = page.records
        return web.Response(
            text=audit_csv(records),
            content_type="text/csv",
            charset="utf-8",
            headers={"Content-Disposition": 'attachment; filename="audit.csv"'},
        )

    async def decide(self, request: web.Request) -> web.Response:
        return self.render(request, "decide.html", form={}, answer=None, error=None, tiers=self.api.tiers)

    async def decide_post(self, request: web.Request) -> web.Response:
        posted = await request.post()
        form = {
            name: str(posted.get(name, "")).strip()
            for name in ("subject", "org", "org_name", "country", "tier", "ip", "model")
        }
        body = {name: value for name, value in form.items() if value}
        answer, error = None, None
        try:
            answer = self.api.decide_answer(body)
        except GatewayError as exc:
            error = exc.message
        status = 400 if error else 200
        tiers = self.api.tiers
        return self.render(request, "decide.html", status=status, form=form, answer=answer, error=error, tiers=tiers)

    # --- reads --------------------------------------------------------------------------------

    async def _hash(self, key: str) -> tuple[int, dict[str, dict[str, Any]]]:
        found = await self.store.read_hash(key)
        if found is None:
            raise GatewayError(409, "policy_missing", "Redis holds no policy: restore one with a whole import first.")
        return found

    # --- the guard ----------------------------------------------------------------------------

    def middleware(self) -> Middleware:
        """Security headers on every console answer; a session for every page but sign-in and the
        stylesheet; the same-origin check and the CSRF token on every POST."""

        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            path = request.path
            if path != ROOT and not path.startswith(ROOT + "/"):
                return await handler(request)
            try:
                response = await self._guarded(request, handler)
            except web.HTTPException as exc:
                # Raised by a handler (a redirect, a 404): answered as a plain response of ours.
                response = web.Response(status=exc.status, headers=exc.headers, text=exc.text)
            except Exception as exc:
                response = self._failure(request, exc)
            add_security_headers(response)
            return response

        return guard

    async def _guarded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        secure = is_secure(request, self.trusted)
        request[SECURE_KEY] = secure
        path = request.path
        if path.startswith(ROOT + "/static/"):
            return await handler(request)
        if request.method == "POST" and not same_origin(request, secure):
            return self._plain(403, "Refused: this form was not sent from this console's own pages.")
        session = await self.sessions.find(request.cookies.get(COOKIE))
        if session is not None:
            request[SESSION_KEY] = session
        if path in OPEN:
            return await handler(request)
        if session is None:
            if request.method == "POST":
                return self._plain(401, "Your console session has ended: sign in again.")
            return redirect(f"{ROOT}/signin?{urlencode({'next': request.path_qs})}")
        if request.method == "POST":
            form = await request.post()
            if not session.csrf_ok(str(form.get("csrf", "")) or None):
                return self._plain(403, "Refused: the form's CSRF token is missing or wrong. Reload the page.")
        return await handler(request)

    def _plain(self, status: int, message: str) -> web.Response:
        return web.Response(status=status, text=message, content_type="text/plain", charset="utf-8")

    def _failure(self, request: web.Request, exc: Exception) -> web.Response:
        err = error_for(exc)
        if err is None:
            log.exception("console page failed: %s", request.path)
            return self.render(request, "error.html", status=500, message="Something went wrong; see the gateway log.")
        if isinstance(exc, BackendUnavailable):
            log.warning("console page failed: %s", exc)
        return self.render(request, "error.html", status=err.status, message=err.message)


def redirect(location: str) -> web.Response:
    """303 See Other: after a form, the browser GETs ``location``."""
    return web.Response(status=303, headers={"Location": location})


def refused(exc: Exception) -> Notice:
    err = error_for(exc)
    if err is None:
        raise exc
    return Notice(kind="error", message=err.message, answer={"code": err.code, "status": err.status})


def _status(notice: Notice) -> int:
    return int(notice.answer.get("status", 400)) if notice.kind == "error" else 200


def _codes(text: str) -> list[str]:
    return [code.strip().upper() for code in text.replace(";", ",").replace(" ", ",").split(",") if code.strip()]


def _local_path(text: str) -> str:
    """Only a path inside the console is a place to go after sign-in (never another site)."""
    if text.startswith(ROOT + "/") and not text.startswith("//") and "\\" not in text:
        return text
    return ""


def _bounded_int(raw: str | None, default: int, most: int) -> int:
    if raw is None or not raw.isdigit():
        return default
    return max(1, min(int(raw), most))


def register_console_routes(
    app: web.Application, api: AdminApi, *, trusted: TrustedProxies, metrics: Callable[[], str], max_staleness_s: float
) -> Console:
    """Mount ``/console/`` on the admin app, its guard after the admin middlewares."""
    console = Console(api, trusted=trusted, metrics=metrics, max_staleness_s=max_staleness_s)
    app.middlewares.append(console.middleware())
    r = app.router

    async def to_root(_request: web.Request) -> web.Response:
        return redirect(ROOT + "/")

    r.add_get(ROOT, to_root)
    r.add_get(ROOT + "/", console.overview)
    r.add_get(ROOT + "/signin", console.signin_form)
    r.add_post(ROOT + "/signin", console.signin)
    r.add_post(ROOT + "/signout", console.signout)
    r.add_get(ROOT + "/models", console.models)
    r.add_get(ROOT + "/models/{model}", console.model)
    r.add_post(ROOT + "/models/{model}", console.model_post)
    r.add_get(ROOT + "/lists", console.lists)
    r.add_get(ROOT + "/lists/{list}", console.list_page)
    r.add_post(ROOT + "/lists/{list}", console.list_post)
    r.add_get(ROOT + "/keys", console.keys)
    r.add_post(ROOT + "/keys", console.keys_post)
    r.add_get(ROOT + "/screening", console.screening)
    r.add_post(ROOT + "/screening", console.screening_post)
    r.add_get(ROOT + "/change-requests", console.change_requests)
    r.add_get(ROOT + "/change-requests/{id}", console.change_request)
    r.add_post(ROOT + "/change-requests/{id}", console.change_request_post)
    r.add_get(ROOT + "/changes", console.changes)
    r.add_get(ROOT + "/audit", console.audit)
    r.add_get(ROOT + "/audit.csv", console.audit_csv)
    r.add_get(ROOT + "/decide", console.decide)
    r.add_post(ROOT + "/decide", console.decide_post)
    r.add_static(ROOT + "/static", HERE / "static", append_version=False)
    return console
