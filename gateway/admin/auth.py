"""Who may call the admin API: the token in ``admin.token_env`` (actor "admin") and the named tokens in
``admin.tokens_file``, checked by one middleware that records the caller's actor on the request."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..errors import GatewayError
from ..settings import Admin, ConfigError, read_secret

log = logging.getLogger("gateway.admin")

# Monitoring must work without the admin token (docs/contract.md §1).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# The operator console signs its people in with the same tokens and keeps them in a session of its
# own (gateway/console/): its pages pass this middleware and meet the console's session check instead.
CONSOLE_ROOT = "/console"
MAX_TOKEN_CHARS = 4096
_TOKEN_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")

ACTOR_KEY: web.RequestKey[str] = web.RequestKey("admin_actor", str)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def parse_tokens_file(path: Path) -> list[tuple[str, bytes]]:
    """Lines ``name: sha256-hex`` (blank lines and ``#`` comments ignored) -> (actor, digest)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"admin.tokens_file: cannot read {path}: {exc.strerror}") from None
    tokens: list[tuple[str, bytes]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, digest = (part.strip() for part in line.partition(":"))
        if not sep or not _TOKEN_NAME.fullmatch(name) or not _HEX_DIGEST.fullmatch(digest):
            raise ConfigError(
                f"admin.tokens_file: {path} line {number}: expected 'name: <sha256 hex "
                "of the token>' with a name of letters, digits, '.', '_', '@' or '-'"
            )
        tokens.append((name, bytes.fromhex(digest)))
    return tokens


class AdminTokens:
    """The admin token (``admin.token_env``, actor "admin") and the named ones in ``admin.tokens_file``.

    The file is re-read when it changes, so a token is added or withdrawn without a restart.
    """

    def __init__(self, settings: Admin, environ: Mapping[str, str]) -> None:
        token = read_secret(settings.token_env, environ)
        self._env: list[tuple[str, bytes]] = [("admin", _digest(token))] if token else []
        self._path = settings.tokens_file
        self._file: list[tuple[str, bytes]] = []
        self._stamp: tuple[float, int] | None = None
        if self._path is not None:
            self._stamp = self._file_stamp()
            self._file = parse_tokens_file(self._path)
        if not self._env and not self._file:
            log.warning("no admin token configured: every /admin/v1 request will be refused")

    def _file_stamp(self) -> tuple[float, int] | None:
        assert self._path is not None
        try:
            stat = os.stat(self._path)
        except OSError:
            return None
        return stat.st_mtime, stat.st_size

    def _file_tokens(self) -> list[tuple[str, bytes]]:
        if self._path is None:
            return []
        stamp = self._file_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._file = parse_tokens_file(self._path)
            except ConfigError as exc:
                # A half-edited file must not lock every operator out: keep the last good tokens.
                log.error("admin tokens file not reloaded: %s", exc)
        return self._file

    def actor(self, authorization: str | None) -> str | None:
        """The actor a Bearer header names, or None. Every known digest is compared, in constant time."""
        token = _bearer(authorization)
        if token is None:
            return None
        return self.actor_of_token(token)

    def actor_of_token(self, token: str) -> str | None:
        """The actor ``token`` belongs to, or None (the console's sign-in form)."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        digest = _digest(token)
        actor: str | None = None
        for name, expected in (*self._env, *self._file_tokens()):
            if hmac.compare_digest(digest, expected) and actor is None:
                actor = name
        return actor


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
        return None
    return token


def token_middleware(settings: Admin, environ: Mapping[str, str]) -> Middleware:
    """The middleware that admits only a known admin token (except :data:`OPEN_PATHS`) and stores its
    actor under :data:`ACTOR_KEY`."""
    tokens = AdminTokens(settings, environ)

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in OPEN_PATHS or path == CONSOLE_ROOT or path.startswith(CONSOLE_ROOT + "/"):
            return await handler(request)
        header = request.headers.get("Authorization")
        actor = tokens.actor(header)
        if actor is None:
            # Unknown paths too: without the token nothing here is revealed, not even what exists.
            where = f"the variable {settings.token_env}"
            if settings.tokens_file is not None:
                where += " or a token listed in admin.tokens_file"
            told = "The admin token is not accepted" if _bearer(header) is not None else "No admin token was sent"
            raise GatewayError(
                401,
                "unauthenticated",
                f"{told}: send 'Authorization: Bearer <admin token>' with the token the "
                f"gateway was started with ({where}; the CLI reads GATEWAY_ADMIN_TOKEN). "
                "User tokens and API keys are not accepted here.",
            )
        request[ACTOR_KEY] = actor
        return await handler(request)

    return authenticate
