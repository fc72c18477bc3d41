"""The canonical view of one public request: read once, decided on, and sent exactly as read.

An export decision is only as good as the gateway's reading of the request, and the upstream must
never read a different model, caller or body than the one decided on (docs/contract.md §4a). So the
request is read in one place, here, into a :class:`CanonicalRequest`: the client address chain, the
origin-form target, the body with its content coding removed, its media type, the model, and the
headers to forward. The decision is made on that view and the forwarder sends that view and nothing
else: the decoded body (never the caller's compressed bytes), the computed headers.

Where a request could be read two ways it is refused, never guessed:

* the model comes from exactly one place: a JSON body (``application/json`` or ``+json``), a
  ``multipart/form-data`` field, or the path (``policy.model_path_pattern``); a body in any other
  media type, or none declared, is 415 ``unsupported_media_type``;
* a JSON body that is not one object, or that holds ``model`` more than once or in another letter
  case (``MODEL``, ``"mod\\u0065l"``), is 400 ``ambiguous_request``, as is a multipart body with more
  than one ``model`` field;
* ``Content-Encoding``: at most one of gzip, deflate, br, identity, decoded here (bounded by
  ``limits.max_body_bytes`` after decoding: a bomb is 413); anything else, stacked, or a body still
  compressed after decoding is 415;
* a model name over 256 bytes or with control characters is 400 ``invalid_request``;
* ``TRACE`` and ``CONNECT`` are 405; a body not fully arrived within ``limits.body_read_timeout_s`` is
  408; an unreadable ``X-Forwarded-For`` hop the gateway must read is 400.

The common request (a small JSON body that came with the head, no content coding) costs one
``orjson.loads`` and a look at the top-level keys.
"""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import aiohttp
import orjson
from aiohttp import web
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict

from .errors import (
    GatewayError,
    ambiguous_request,
    bad_request,
    method_not_allowed,
    request_timeout,
    unsupported_media_type,
)
from .network import TrustedProxies, UnreadableHop, client_chain
from .proxy import origin_form, upstream_request_headers

try:
    import brotli
except ImportError:  # pragma: no cover - a dependency; without it br bodies are refused (415)
    brotli = None

MAX_MODEL_BYTES = 256
REFUSED_METHODS = frozenset({"TRACE", "CONNECT"})
CODINGS = frozenset({"gzip", "deflate", "br", "identity"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MAX_GZIP_MEMBERS = 64
_BROTLI_STEP = 65536

# RFC 9110 §8.3.1 media type, strictly: a token pair, then parameters of token or quoted string (no
# escapes: parsers disagree on them). Anything else is refused rather than read one way or another.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"[^"\\\x00-\x1f\x7f]*"'
_MEDIA_TYPE = re.compile(rf"[ \t]*({_TOKEN})/({_TOKEN})[ \t]*((?:;[ \t]*(?:{_TOKEN}=(?:{_TOKEN}|{_QUOTED})[ \t]*)?)*)")
_PARAMETER = re.compile(rf"({_TOKEN})=({_TOKEN}|\"[^\"]*\")")
# A part's Content-Disposition, as strictly: form-data and simple parameters, nothing escaped.
_DISPOSITION = re.compile(
    rf"[ \t]*form-data[ \t]*((?:;[ \t]*{_TOKEN}[ \t]*=[ \t]*(?:{_TOKEN}|{_QUOTED})[ \t]*)*);?[ \t]*", re.IGNORECASE
)
_DISPOSITION_PARAMETER = re.compile(rf"({_TOKEN})[ \t]*=[ \t]*({_TOKEN}|\"[^\"]*\")")
# A 5-unit JSON string made of letters and \u escapes, at least one escape: the only other way to
# spell the key "model" (or a letter-case variant) in JSON text.
_ESCAPED_KEY = re.compile(rb'"(?=[^"]{0,30}\\u)(?:[A-Za-z]|\\u[0-9A-Fa-f]{4}){5}"')


@dataclass(slots=True)
class CanonicalRequest:
    """One request as the gateway read it: what is decided on and exactly what is sent upstream.

    ``target`` is origin-form (path and query as sent); ``body`` is the decoded body; ``media_type``
    is the lower-case media type without parameters ("" when the request declares none); ``model``
    is None when the request names no model; ``headers`` are the headers to forward (the caller's
    minus those the gateway sets or vouches for, plus its own).
    """

    method: str
    client_ip: str
    forwarded_for: str
    proto: str
    deadline: float
    target: str = ""
    media_type: str = ""
    body: bytes = b""
    model: str | None = None
    headers: CIMultiDict[str] | None = None


class RequestReader:
    """Builds the :class:`CanonicalRequest` of a public request, in two steps.

    :meth:`begin` reads the head's cheap parts every answer needs (method, client address), before
    the policy and identity checks; :meth:`read` reads the rest (target, body, model, headers to
    forward) once the caller is known.
    """

    def __init__(
        self,
        *,
        trusted: TrustedProxies,
        model_path_pattern: str | None,
        max_body_bytes: int,
        body_read_timeout_s: float,
        body_gap_timeout_s: float,
    ) -> None:
        self.trusted = trusted
        self.models = ModelExtractor(model_path_pattern, max_body_bytes=max_body_bytes)
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout_s = body_read_timeout_s
        self.body_gap_timeout_s = body_gap_timeout_s

    def begin(self, request: BaseRequest) -> CanonicalRequest:
        method = request.method
        if method in REFUSED_METHODS:
            raise method_not_allowed(method)
        try:
            ip, forwarded_for = client_chain(
                request.remote, request.headers.getall("X-Forwarded-For", ()), self.trusted
            )
        except UnreadableHop as exc:
            raise bad_request(
                "An X-Forwarded-For hop from a trusted proxy is not an IP address in canonical "
                "form; the caller's address cannot be vouched for."
            ) from exc
        deadline = asyncio.get_running_loop().time() + self.body_read_timeout_s
        return CanonicalRequest(method, ip, forwarded_for, request.scheme, deadline)

    async def read(
        self,
        view: CanonicalRequest,
        request: BaseRequest,
        *,
        request_id: str,
        identity_headers: Iterable[tuple[str, str]],
        upstream_auth: str | None,
    ) -> None:
        headers = request.headers
        view.target = target = origin_form(request.raw_path)
        body = await self._body(request, view.deadline)
        encodings = headers.getall("Content-Encoding", ())
        if encodings:
            body = decode_body(body, encodings, self.max_body_bytes)
        view.body = body
        models = self.models
        path_model = models.model_from_path(target.split("?", 1)[0]) if models.pattern is not None else None
        content_types = headers.getall("Content-Type", ())
        body_model, view.media_type = models.read_body(body, content_types)
        if path_model is not None and body_model is not None and path_model != body_model:
            raise bad_request(
                f"The request path names model '{path_model[:100]}' and its body names '{body_model[:100]}'."
            )
        view.model = path_model if path_model is not None else body_model
        view.headers = upstream_request_headers(
            headers,
            forwarded_for=view.forwarded_for,
            proto=view.proto,
            request_id=request_id,
            identity_headers=identity_headers,
            upstream_auth=upstream_auth,
        )

    async def body(self, request: BaseRequest) -> bytes:
        """``request``'s body as received (content coding not removed), bounded as a public request's."""
        return await self._body(request, asyncio.get_running_loop().time() + self.body_read_timeout_s)

    async def _body(self, request: BaseRequest, deadline: float) -> bytes:
        limit = self.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise _too_large(limit)
        if not request.body_exists:
            return b""
        content = request.content
        if content.is_eof() and content.exception() is None:
            # The whole body came with the head (the common small request): no waiting, no timer.
            body = content.read_nowait()
            if len(body) > limit:
                raise _too_large(limit)
            return body
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        try:
            while True:
                # Both bounds: no gap between chunks longer than a header may take, and the whole body
                # within body_read_timeout_s of its head however steadily it trickles.
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(min(remaining, self.body_gap_timeout_s)):
                    chunk = await content.readany()
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
        except TimeoutError as exc:
            if loop.time() < deadline:
                raise GatewayError(
                    408, "request_timeout", f"The request body stalled for more than {self.body_gap_timeout_s:g} s."
                ) from exc
            raise request_timeout(self.body_read_timeout_s) from exc
        except web.HTTPException:
            raise
        except (
            aiohttp.ClientPayloadError,
            aiohttp.http_exceptions.HttpProcessingError,
            web.RequestPayloadError,
            ValueError,
        ) as exc:
            # Bad chunking or a body cut short: the parser's errors arrive here, on the body stream.
            raise bad_request("The request body is malformed.") from exc
        return b"".join(chunks)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, "request_too_large", f"The request body exceeds the limit of {limit} bytes.")


# --- content coding ----------------------------------------------------------------------------------


def decode_body(body: bytes, encodings: Iterable[str], limit: int) -> bytes:
    """``body`` with its one declared content coding removed, at most ``limit`` bytes once decoded.

    The upstream gets the decoded bytes without ``Content-Encoding``, so it reads exactly what was
    decided on. Two codings (two headers, a list, ``x-gzip``, ``zstd``...) or a body that is still
    compressed after decoding (a second layer an upstream would peel off again) are 415.
    """
    values = list(encodings)
    coding = values[0].strip(" \t").lower() if len(values) == 1 and values[0].isascii() else ""
    if coding not in CODINGS:
        raise unsupported_media_type(
            "The request's Content-Encoding must be one of gzip, deflate, br or identity, once."
        )
    if coding == "identity" or not body:
        return body
    if coding == "gzip":
        decoded = _gunzip(body, limit)
    elif coding == "deflate":
        # RFC 9110's deflate is the zlib format; some clients send raw deflate, as other servers accept.
        wbits = zlib.MAX_WBITS if body[0] & 0x0F == 8 else -zlib.MAX_WBITS
        decoded, rest = _inflate(body, wbits, limit)
        if rest:
            raise bad_request("The request body has data after its deflate stream.")
    else:
        decoded = _unbrotli(body, limit)
    if still_compressed(decoded, limit):
        raise unsupported_media_type("The request body is compressed more than once; send it with one content coding.")
    return decoded


def _inflate(data: bytes, wbits: int, limit: int) -> tuple[bytes, bytes]:
    decompressor = zlib.decompressobj(wbits)
    try:
        out = decompressor.decompress(data, limit + 1)
    except zlib.error as exc:
        raise bad_request("The request body does not decode as its Content-Encoding says.") from exc
    if len(out) > limit:
        raise _too_large(limit)
    if not decompressor.eof:
        raise bad_request("The request body's compressed stream is cut short.")
    return out, decompressor.unused_data


def _gunzip(data: bytes, limit: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    rest = data
    for _ in range(_MAX_GZIP_MEMBERS):  # RFC 1952 allows several members, one after the other
        out, rest = _inflate(rest, 16 + zlib.MAX_WBITS, limit - total)
        parts.append(out)
        total += len(out)
        if not rest:
            return b"".join(parts)
        if rest[:2] != b"\x1f\x8b":
            raise bad_request("The request body has data after its gzip stream.")
    raise bad_request("The request body has too many gzip members.")


def _unbrotli(data: bytes, limit: int) -> bytes:
    if brotli is None:  # pragma: no cover
        raise unsupported_media_type("This gateway cannot decode the br content coding.")
    decompressor = brotli.Decompressor()
    parts: list[bytes] = []
    total = 0
    try:
        chunk = decompressor.process(data, output_buffer_limit=_BROTLI_STEP)
        while True:
            parts.append(chunk)
            total += len(chunk)
            if total > limit:
                raise _too_large(limit)
            if decompressor.is_finished():
                return b"".join(parts)
            if decompressor.can_accept_more_data():
                raise bad_request("The request body's compressed stream is cut short.")
            chunk = decompressor.process(b"", output_buffer_limit=_BROTLI_STEP)
    except brotli.error as exc:
        raise bad_request("The request body does not decode as its Content-Encoding says.") from exc


def still_compressed(body: bytes, limit: int) -> bool:
    """Whether decoded bytes are themselves a gzip, zlib or brotli stream."""
    if body[:2] == b"\x1f\x8b":
        return True
    if len(body) >= 2 and body[0] & 0x0F == 8 and body[0] >> 4 <= 7 and ((body[0] << 8) | body[1]) % 31 == 0:
        return True
    if brotli is None or body[:1] in (b"{", b"[", b"-", b" ", b"\r", b"\n", b"\t"):
        return False  # JSON and multipart text: never a brotli stream that decodes to the end
    try:
        _unbrotli(body, limit)
    except GatewayError:
        return False
    return True


# --- media types and the model --------------------------------------------------------------------------


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """(lower-case ``type/subtype``, parameters with lower-case names) of a Content-Type, strictly; 415 when
    it does not parse or names a parameter twice."""
    match = _MEDIA_TYPE.fullmatch(value)
    if match is None:
        raise unsupported_media_type("The request's Content-Type is not a media type.")
    media = f"{match.group(1)}/{match.group(2)}".lower()
    params: dict[str, str] = {}
    for name, raw in _PARAMETER.findall(match.group(3)):
        name = name.lower()
        if name in params:
            raise unsupported_media_type(f"The request's Content-Type names '{name[:40]}' more than once.")
        params[name] = raw[1:-1] if raw[:1] == '"' else raw
    return media, params


def check_model(model: object) -> str:
    """``model`` if it is a name the gateway can decide on and record: a non-empty string of at most 256
    UTF-8 bytes without control characters; else 400 ``invalid_request``."""
    if not isinstance(model, str) or not model:
        raise bad_request("The request's 'model' must be a non-empty string.")
    if len(model) > MAX_MODEL_BYTES // 4 and len(model.encode("utf-8", "surrogatepass")) > MAX_MODEL_BYTES:
        raise bad_request(f"The request's 'model' is longer than {MAX_MODEL_BYTES} bytes.")
    if _CONTROL.search(model):
        raise bad_request("The request's 'model' holds control characters.")
    return model


class ModelExtractor:
    """The model a request names: a JSON body's ``model``, a multipart ``model`` field, or the group
    ``model`` of ``policy.model_path_pattern``; and the body's media type.

    * The request-target must be origin-form (absolute-form is reduced to its path and query).
    * With a path pattern, a path that a normalising server (percent-decoding, dot segments, ``//``,
      ``;params``, ``\\``, NUL, letter case, a trailing slash) could route to a model must already be in
      canonical form (none of those, nothing percent-encoded), or it is refused; a canonical path is
      matched exactly as written. A path model and a body model that differ are refused.
    * JSON bodies must be UTF-8 without a byte order mark (RFC 8259): lenient parsers read UTF-16 and
      BOMs that strict ones refuse. A ``model`` inside a nested object names no model.
    """

    def __init__(self, pattern: str | None, *, max_body_bytes: int = 10_485_760) -> None:
        self.pattern = re.compile(pattern) if pattern else None
        # What a lenient upstream might route on is matched without regard to letter case.
        self.loose_pattern = re.compile(pattern, re.IGNORECASE) if pattern else None
        self.max_body_bytes = max_body_bytes

    # --- the path ---------------------------------------------------------------------------------

    def model_from_path(self, path: str) -> str | None:
        """``path`` is the raw (percent-encoded) path of an origin-form target, without the query."""
        assert self.pattern is not None and self.loose_pattern is not None
        if self._canonical(path):
            match = self.pattern.search(path)
            if match and match.group("model"):
                return check_model(match.group("model"))
        for candidate in self._loosened(path):
            loose = self.loose_pattern.search(candidate)
            if loose and loose.group("model"):
                raise bad_request(
                    "The request path could name a model in more than one way (encoded characters, "
                    "dot segments, empty segments, ';' parameters, backslashes, letter case or a "
                    "trailing slash); send the canonical path."
                )
        return None

    @staticmethod
    def _canonical(path: str) -> bool:
        """True when no server reads ``path`` other than as written: nothing percent-encoded (a server may
        decode it or not), no ``//``, dot segments, ``;`` parameters or ``\\``."""
        if "%" in path or "//" in path or ";" in path or "\\" in path:
            return False
        return not any(segment in (".", "..") for segment in path.split("/"))

    def _loosened(self, path: str) -> list[str]:
        """``path`` as lenient servers might read it, decoded zero to three times: ``\\`` as ``/``, cut at
        NUL, empty and dot segments resolved, no trailing slash; ``;params`` dropped before the dot
        segments are resolved (``/a;x/..`` -> ``/``) and, as other servers do, after (``/a/;x/..`` -> ``/a``)."""
        readings: list[str] = []
        text = path
        for _ in range(4):
            cut = text.split("\x00", 1)[0].replace("\\", "/").split("/")
            readings.append(self._resolved([segment.split(";", 1)[0] for segment in cut]))
            if ";" in text:
                readings.append(self._resolved(cut, strip_params=True))
            decoded = unquote(text, errors="replace")
            if decoded == text:
                break
            text = decoded
        return readings

    @staticmethod
    def _resolved(segments: list[str], *, strip_params: bool = False) -> str:
        kept: list[str] = []
        for segment in segments:
            if segment in ("", "."):
                continue
            if segment == "..":
                if kept:
                    kept.pop()
                continue
            kept.append(segment)
        if strip_params:
            kept = [part for part in (segment.split(";", 1)[0] for segment in kept) if part]
        return "/" + "/".join(kept)

    # --- the body ---------------------------------------------------------------------------------

    def model_from_body(self, body: bytes, content_types: list[str] | tuple[str, ...]) -> str | None:
        return self.read_body(body, content_types)[0]

    def read_body(self, body: bytes, content_types: list[str] | tuple[str, ...]) -> tuple[str | None, str]:
        """(the model the decoded ``body`` names or None, the lower-case media type or "")."""
        if len(content_types) > 1:
            raise ambiguous_request("The request has more than one Content-Type header.")
        content_type = content_types[0] if content_types else ""
        if content_type == "application/json":  # the common case, without parsing the media type
            return (self._json_model(body) if body else None), content_type
        if not body:  # nothing to read, so nothing to read two ways
            return None, content_type.split(";", 1)[0].strip(" \t").lower()
        media, params = parse_media_type(content_type) if content_type else ("", {})
        if media == "application/json" or media.endswith("+json"):
            charset = params.get("charset")
            if charset is not None and charset.lower() != "utf-8":
                raise unsupported_media_type("A JSON request body must be UTF-8 (charset=utf-8 or none).")
            return self._json_model(body), media
        if media == "multipart/form-data":
            return self._multipart_model(body, params.get("boundary")), media
        raise unsupported_media_type(
            "The request body must be application/json (or +json) or multipart/form-data"
            + ("" if media else "; it declares no Content-Type")
            + "."
        )

    def _json_model(self, body: bytes) -> str | None:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise self._bad_json(body) from exc
        if type(document) is not dict:
            raise ambiguous_request("A JSON request body must be one object.")
        model = document.get("model")
        for key in document:
            # Case-insensitive decoders (Go's encoding/json, Jackson's, .NET's) read MODEL or Model as model.
            if len(key) == 5 and key != "model" and key.lower() == "model":
                raise ambiguous_request("The request names 'model' in another letter case.")
        # Only a key spelled with escapes ("mod\u0065l") or several "model" strings let the body name the key
        # twice; parsers disagree on which one wins.
        if (
            (b"\\u" in body or body.count(b'"model"') > 1)
            and self._may_repeat_model(body)
            and self._top_level_model_keys(body) > 1
        ):
            raise ambiguous_request("The request names 'model' more than once.")
        if model is None and "model" not in document:
            return None
        return check_model(model)

    @staticmethod
    def _may_repeat_model(body: bytes) -> bool:
        count = body.count(b'"model"')
        if b"\\u" in body:
            for match in _ESCAPED_KEY.finditer(body):
                try:
                    if orjson.loads(match.group()).lower() == "model":
                        count += 1
                except orjson.JSONDecodeError:
                    continue
        return count > 1

    @staticmethod
    def _top_level_model_keys(body: bytes) -> int:
        counts: list[int] = []

        def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            counts.append(sum(1 for key, _ in pairs if key.lower() == "model"))
            return {}

        try:
            json.loads(body, object_pairs_hook=hook)
        except (ValueError, RecursionError) as exc:  # orjson read it; a stricter look did not
            raise bad_request("The request body is not valid JSON.") from exc
        return counts[-1] if counts else 0  # the outermost object is finished last

    @staticmethod
    def _bad_json(body: bytes) -> GatewayError:
        """Why a body labelled JSON did not parse: a BOM or UTF-16/32 text (which lenient parsers such as
        Python's ``json.loads`` on bytes accept), a second document after the first, or no JSON."""
        if body[:3] == b"\xef\xbb\xbf" or body[:2] in (b"\xfe\xff", b"\xff\xfe") or b"\x00" in body[:4]:
            return bad_request("A JSON request body must be UTF-8 without a byte order mark.")
        try:
            text = body.decode("utf-8")
            _, end = json.JSONDecoder().raw_decode(text, len(text) - len(text.lstrip()))
        except (ValueError, RecursionError):
            return bad_request("The request body is not valid JSON.")
        if text[end:].strip():
            return ambiguous_request("The request body holds more than one JSON document.")
        return bad_request("The request body is not valid JSON.")

    @staticmethod
    def _multipart_model(body: bytes, boundary: str | None) -> str | None:  # noqa: C901 - complexity 18, the most in its module: to be split
        """The one ``model`` field of a multipart/form-data body, read strictly (RFC 7578): every delimiter
        line exactly ``--boundary``, each part one Content-Disposition ``form-data`` with simple parameters.
        A ``model`` field must be plain text: no file name, transfer or content coding, or other charset."""
        if not boundary or len(boundary) > 70 or not boundary.isascii():
            raise unsupported_media_type("A multipart body needs a boundary of at most 70 ASCII characters.")
        delimiter = b"\r\n--" + boundary.encode()
        if not body.startswith(delimiter[2:] + b"\r\n"):
            raise unsupported_media_type("The request body does not begin as its multipart media type says.")
        parts = (b"\r\n" + body).split(delimiter)
        if len(parts) < 3 or not parts[-1].startswith(b"--"):
            raise bad_request("The multipart body is not complete.")
        found: list[bytes] = []
        for part in parts[1:-1]:
            if not part.startswith(b"\r\n"):
                raise bad_request("The multipart body is malformed.")
            rest = part[2:]
            if rest.startswith(b"\r\n"):
                head, content = b"", rest[2:]
            else:
                head, separator, content = rest.partition(b"\r\n\r\n")
                if not separator:
                    raise bad_request("The multipart body is malformed.")
            fields: list[tuple[bytes, bytes]] = []
            for line in head.split(b"\r\n"):
                name, colon, value = line.partition(b":")
                if not colon or not name or name != name.strip() or b"\n" in line or b"\r" in line:
                    raise bad_request("A multipart part has a malformed header.")
                fields.append((name.lower(), value.strip(b" \t")))
            dispositions = [v for k, v in fields if k == b"content-disposition"]
            if len(dispositions) != 1:
                raise bad_request("Each multipart part needs exactly one Content-Disposition.")
            field_name, filename = _disposition(dispositions[0])
            if field_name.lower() == "_charset_":
                raise bad_request("A multipart '_charset_' field would change how other fields are read.")
            if field_name.lower() != "model":
                continue
            if field_name != "model":
                raise ambiguous_request("The multipart body names its model field in another letter case.")
            others = [(k, v.lower()) for k, v in fields if k != b"content-disposition"]
            if filename is not None or any(
                not (k == b"content-type" and v in (b"text/plain", b"text/plain; charset=utf-8"))
                and not (k == b"content-transfer-encoding" and v in (b"7bit", b"8bit", b"binary"))
                for k, v in others
            ):
                raise bad_request(
                    "The multipart 'model' field must be plain UTF-8 text: no file name, "
                    "transfer or content coding, or other charset."
                )
            found.append(content)
        if not found:
            return None
        if len(found) > 1:
            raise ambiguous_request("The request names 'model' more than once.")
        try:
            model = found[0].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise bad_request("The multipart 'model' field is not UTF-8.") from exc
        return check_model(model)


def _disposition(value: bytes) -> tuple[str, str | None]:
    """(name, filename or None) of a part's Content-Disposition; 400 unless it is plainly ``form-data``
    with one ASCII ``name``, no parameter twice, and no RFC 2231 ``name*`` (which parsers decode or not).
    File names may be raw UTF-8, as browsers send them, or ``filename*``."""
    text = value.decode("latin-1")
    match = _DISPOSITION.fullmatch(text)
    if match is None:
        raise bad_request("A multipart Content-Disposition is malformed.")
    params: dict[str, str] = {}
    for key, raw in _DISPOSITION_PARAMETER.findall(match.group(1)):
        key = key.lower()
        if key in params or key == "name*":
            raise bad_request("A multipart Content-Disposition names a parameter twice or in an encoded form.")
        params[key] = raw[1:-1] if raw[:1] == '"' else raw
    name = params.get("name")
    if name is None or not name.isascii():
        raise bad_request("A multipart part needs a name of ASCII characters.")
    return name, params.get("filename", params.get("filename*"))
