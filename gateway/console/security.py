"""The console's defences that do not depend on a session: response headers, the same-origin check
every POST must pass, and whether the operator reached us over TLS (directly or through a trusted proxy).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from ..network import TrustedProxies

# No script at all, styles and images from the console's own files only, no framing, forms post only
# back here: a page that an attacker gets text into still runs nothing and sends nothing elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def add_security_headers(response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value


def is_secure(request: web.Request, trusted: TrustedProxies) -> bool:
    """Whether the operator's browser speaks TLS to us: the listener's own TLS, or
    ``X-Forwarded-Proto: https`` from a proxy in ``network.trusted_proxies`` (from anyone else the
    header is ignored, so a caller cannot talk us out of the ``Secure`` cookie flag or into it)."""
    if request.secure:
        return True
    peer = request.remote or ""
    if not trusted or not trusted.contains(peer):
        return False
    forwarded = request.headers.get("X-Forwarded-Proto", "")
    # The proxy nearest us appends last.
    return forwarded.split(",")[-1].strip().lower() == "https"


def own_origin(request: web.Request, secure: bool) -> str:
    return f"{'https' if secure else 'http'}://{request.host}".lower()


def same_origin(request: web.Request, secure: bool) -> bool:
    """A POST must come from one of our own pages: its ``Origin`` (or, without one, its ``Referer``)
    names this console's scheme, host and port. A request naming neither is refused as well."""
    expected = own_origin(request, secure)
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin.strip().lower() == expected
    referer = request.headers.get("Referer")
    if not referer:
        return False
    parts = urlsplit(referer.strip())
    return f"{parts.scheme}://{parts.netloc}".lower() == expected
