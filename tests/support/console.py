"""The operator console's test setup: two named admin tokens, a gateway config with the two-person rule,
and a plain HTTP client that signs in and posts the console's forms as a browser would."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp

from .gateway_process import GatewayProcess, gateway_config
from .tokens import admin_tokens_file

ALICE_TOKEN = "console-test-token-alice-0001"
BOB_TOKEN = "console-test-token-bobby-0002"
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


def tokens_file(directory: Path) -> Path:
    return admin_tokens_file(directory, {"alice": ALICE_TOKEN, "bob": BOB_TOKEN})


def console_config(upstream_url: str, tokens: Path, **sections: Any) -> dict[str, Any]:
    admin = {"tokens_file": str(tokens), "approval": {"required_for": ["loosen"], "ttl_s": 3600}}
    return gateway_config(upstream_url, admin=admin, **sections)


def csrf_of(html: str) -> str:
    found = CSRF_FIELD.search(html)
    assert found is not None, html[:2000]
    return found.group(1)


class ConsoleClient:
    """One browser's worth of console state over plain HTTP: its cookies, sent by hand."""

    def __init__(self, http: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
        self.http = http
        self.base = gateway.admin_url
        self.cookies: dict[str, str] = {}

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Origin": self.base}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        return {**headers, **(extra or {})}

    def _keep(self, response: aiohttp.ClientResponse) -> None:
        for name, morsel in response.cookies.items():
            if morsel.value and morsel["max-age"] != "0":
                self.cookies[name] = morsel.value
            else:
                self.cookies.pop(name, None)

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.get(self.base + path, headers=self._headers(headers), allow_redirects=False) as r:
            self._keep(r)
            return r.status, await r.text(), r

    async def post(
        self, path: str, form: dict[str, str], headers: dict[str, str] | None = None
    ) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.post(
            self.base + path, data=form, headers=self._headers(headers), allow_redirects=False
        ) as r:
            self._keep(r)
            return r.status, await r.text(), r

    async def sign_in(self, token: str) -> None:
        status, html, _ = await self.get("/console/signin")
        assert status == 200
        status, _, response = await self.post("/console/signin", {"csrf": csrf_of(html), "token": token})
        assert status == 303, status
        assert response.headers["Location"] == "/console/"

    async def csrf(self, path: str = "/console/") -> str:
        status, html, _ = await self.get(path)
        assert status == 200, (status, html[:500])
        return csrf_of(html)
