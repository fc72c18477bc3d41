"""Differential property test: the model the gateway decides on is the model every upstream reads.

Hypothesis generates request variants (media types and their spellings and parameters, content codings
alone, stacked and twice applied, model keys in other letter cases and spelled with unicode escapes,
duplicate keys, byte order marks, whitespace, nesting, top-level lists and second documents,
multipart bodies, URL-encoded forms, header spellings) and sends each, as a caller in CN, through a
running gateway. Its upstream is a Go server (tests/upstreams/godecoder, built here with ``go build``)
that reads the body with encoding/json into a struct (``Model string `json:"model"```, field names
matched case-insensitively, whatever the Content-Type) and with mime/multipart, and answers with what
it read and the request exactly as it arrived. That request is then replayed to an aiohttp server that
reads it twice more: (a) Python's ``json`` honouring the Content-Type (``request.json()`` for JSON types,
``request.post()`` for forms), and (b) aiohttp's body reader, which decodes any declared
Content-Encoding, then ``json.loads`` whatever the media type (as many servers do).

The property: whenever the gateway answers 2xx, each of these real decoders reads the model the gateway
decided on (its audit record), or cannot read the body at all (it would refuse it); never another model,
and no model where one was decided. Every other answer is a 4xx with the contract's body, never a 5xx.
As ``frontier-x`` is restricted to the US, the upstream never reads ``frontier-x`` from a 2xx.

``make test`` runs a few hundred examples; ``make soak`` (``-m soak``) runs many more.
"""

from __future__ import annotations

import base64
import copy
import gzip
import json
import os
import shutil
import socket
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import brotli
import pytest
import redis as redis_sync
from aiohttp import web
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.redis_server import RedisServer, free_port

from .support.audit_entries import records_of
from .support.gateway_process import BASE_POLICY, ROOT, GatewayProcess, gateway_config, seed_policy
from .support.rawhttp import RawConnection, RawResponse, request
from .support.servers import AppThread
from .support.tokens import hs_token

GO_SOURCE = ROOT / "tests" / "upstreams" / "godecoder"
RESTRICTED, OPEN = "frontier-x", "gpt-mock"
TOKEN = hs_token("cn-differential", country="CN", tier="bulk", org="acme")
TIERS: dict[str, Any] = {
    "public": {"requests_per_minute": 60, "burst": 10, "stages": ["general"]},
    "partner": {"requests_per_minute": 600, "burst": 60, "stages": ["partners", "general"]},
    "internal": {"requests_per_minute": 6000, "burst": 600, "stages": ["internal", "partners", "general"]},
    "bulk": {"requests_per_minute": 10_000_000, "burst": 1_000_000, "stages": ["partners", "general"]},
}
ERROR = "<unreadable>"  # a decoder that cannot read the body: that upstream would refuse the request
MAX_BODY = 262144


# --- the decoders --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def go_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/upstreams/godecoder built with the local Go toolchain (standard library only, no network)."""
    go = shutil.which("go")
    if go is None:
        pytest.fail(
            "The differential test needs Go's encoding/json as one of its decoders: the 'go' command is "
            "not on PATH (install it, e.g. apt-get install golang-go).",
            pytrace=False,
        )
    out = tmp_path_factory.mktemp("godecoder")
    env = {
        **os.environ,
        "GOFLAGS": "-mod=mod",
        "GOCACHE": str(out / "cache"),
        "GOPATH": str(out / "gopath"),
        "GOPROXY": "off",
        "CGO_ENABLED": "0",
    }
    built = subprocess.run(
        [go, "build", "-o", str(out / "godecoder"), "."],
        cwd=GO_SOURCE,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if built.returncode != 0:
        pytest.fail(f"go build of {GO_SOURCE} failed:\n{built.stderr}", pytrace=False)
    return out / "godecoder"


@pytest.fixture(scope="module")
def go_upstream(go_decoder: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([str(go_decoder), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    detail = proc.stderr.read() if proc.stderr and proc.poll() is not None else b""
                    raise RuntimeError(f"godecoder did not start: {detail!r}") from exc
                time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()  # a pipe left open is a ResourceWarning


def _model_of(document: Any) -> str | None:
    if not isinstance(document, dict):
        return ERROR  # an upstream expecting a request object refuses anything else
    model = document.get("model")
    if model is None or model == "":
        return None
    return model if isinstance(model, str) else ERROR


async def by_media_type(request: web.Request) -> web.Response:
    """(a) Python's json honouring the Content-Type, as aiohttp reads it; forms through aiohttp's own parser."""
    media = request.content_type
    try:
        if media == "application/json" or media.endswith("+json"):
            model = _model_of(json.loads(await request.text()))
        elif media in ("multipart/form-data", "application/x-www-form-urlencoded"):
            values = (await request.post()).getall("model", [])
            models = [v if isinstance(v, str) else ERROR for v in values]
            model = models[0] if len(set(models)) == 1 else (None if not models else ERROR + repr(models))
            if model == "":
                model = None
        else:
            model = None  # not a type this server reads a model from
    except Exception:  # any failure to read is this decoder's refusal
        model = ERROR
    return web.json_response({"model": model})


async def ignoring_media_type(request: web.Request) -> web.Response:
    """(b) aiohttp's body reader (it decodes a declared Content-Encoding), then json.loads whatever the type."""
    try:
        model = _model_of(json.loads(await request.read()))
    except Exception:  # as above
        model = ERROR
    return web.json_response({"model": model})


@dataclass
class PythonDecoders:
    port: int = field(default_factory=free_port)
    _server: AppThread | None = None

    @staticmethod
    def _app() -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/a/{tail:.*}", by_media_type)
        app.router.add_route("*", "/b/{tail:.*}", ignoring_media_type)
        return app

    def start(self) -> PythonDecoders:
        self._server = AppThread(self._app, self.port, name="python-decoders")
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    def read(self, which: str, arrived: dict[str, Any]) -> str | None:
        """Replay the request exactly as the upstream received it to decoder ``which``."""
        body = base64.b64decode(arrived["body"] or "")
        lines = [f"{arrived['method']} /{which}{arrived['target']} HTTP/1.1", f"Host: {arrived['host']}"]
        for name, values in sorted(arrived["headers"].items()):
            if name.lower() in ("content-length", "transfer-encoding", "host", "connection"):
                continue
            lines += [f"{name}: {value}" for value in values]
        lines += [f"Content-Length: {len(body)}", "Connection: close"]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        with RawConnection(self.port) as conn:
            conn.send(data)
            response = conn.read_response()
        assert response.status == 200, response.body[:300]
        return response.json()["model"]


@pytest.fixture(scope="module")
def python_decoders() -> Iterator[PythonDecoders]:
    decoders = PythonDecoders().start()
    yield decoders
    decoders.stop()


# --- the gateway -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setting(go_upstream: str) -> Iterator[tuple[GatewayProcess, str]]:
    document = copy.deepcopy(BASE_POLICY)
    document["models"][RESTRICTED] = {
        "stage": "general",
        "timeline": [],
        "allowed_countries": ["US"],
        "export_suspended": False,
    }
    with RedisServer() as redis:
        seed_policy(redis.url, document)
        config = gateway_config(go_upstream, tiers=TIERS, audit={"flush_ms": 5}, limits={"max_body_bytes": MAX_BODY})
        gateway = GatewayProcess(config, redis_url=redis.url)
        gateway.start()
        try:
            yield gateway, redis.url
        finally:
            gateway.stop()


def audited_model(redis_url: str, request_id: str) -> str | None:
    """The model the gateway decided on, from its audit record of this request."""
    client = redis_sync.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for _id, fields in client.xrevrange("gw:audit", count=50):
                for record in records_of(fields):
                    if record["request_id"] == request_id:
                        return record["model"]
            time.sleep(0.005)
    finally:
        client.close()
    raise AssertionError(f"no audit record for {request_id}")


# --- request variants ---------------------------------------------------------------------------------------

# Weighted towards requests the gateway serves, where the property has something to compare.
MODELS = [OPEN, OPEN, OPEN, OPEN, RESTRICTED, "GPT-MOCK", OPEN + " ", " " + RESTRICTED, ""]
MODEL_KEYS = ["model"] * 10 + [
    "MODEL",
    "Model",
    "moDel",
    "modeL",
    "mod\\u0065l",
    "MOD\\u0045L",
    "\\u006dodel",
    "\\u006D\\u006F\\u0064\\u0065\\u006C",
    "model ",
    " model",
    "mo\\u0064el",
]
OTHER_KEYS = ["messages", "x", "stream", "input"]
WHITESPACE = ["", " ", "\n", "\t", "\r\n  "]
BOUNDARY = "xYz-b0undary"
CODERS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "deflate-raw": lambda b: zlib.compress(b, wbits=-15),
    "br": brotli.compress,
}
SPOOFED_HEADERS = [
    ("X_Gateway_Subject", "admin"),
    ("X_Gateway_Tier", "internal"),
    ("X-Gateway-Org", "evil"),
    ("x_gateway_org", "evil"),
    ("Forwarded", "for=6.6.6.6"),
    ("X-Real-IP", "6.6.6.6"),
    ("X_Forwarded_For", "6.6.6.6"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Original-URL", "/admin"),
    ("X_Rewrite_URL", "/admin"),
    ("Content_Type", "text/plain"),
    ("Content_Encoding", "gzip"),
]


@st.composite
def json_texts(draw: st.DrawFn, plain: bool = False) -> str:
    """JSON text; ``plain`` ones name model once, correctly spelled, and are mostly served."""
    models = [OPEN, OPEN, OPEN, RESTRICTED] if plain else MODELS

    def value() -> str:
        kind = draw(st.sampled_from(["model"] * 6 + ["nested", "list", "number", "null"]))
        if kind == "model" or plain:
            return json.dumps(draw(st.sampled_from(models)), ensure_ascii=draw(st.booleans()))
        if kind == "nested":
            return '{"model": ' + json.dumps(draw(st.sampled_from(MODELS))) + "}"
        if kind == "list":
            return '["' + draw(st.sampled_from(MODELS)) + '"]'
        return "7" if kind == "number" else "null"

    pairs = []
    keys = (
        ["model", *draw(st.lists(st.sampled_from(OTHER_KEYS), max_size=3, unique=True))]
        if plain
        else [
            draw(st.sampled_from(MODEL_KEYS + OTHER_KEYS * 2))
            for _ in range(draw(st.sampled_from([1, 1, 2, 2, 3, 4, 0])))
        ]
    )
    for key in draw(st.permutations(keys)):
        ws = [draw(st.sampled_from(WHITESPACE)) for _ in range(3)]
        pairs.append(f'{ws[0]}"{key}"{ws[1]}:{ws[2]}{value()}')
    document = "{" + ",".join(pairs) + draw(st.sampled_from(WHITESPACE)) + "}"
    shape = (
        "object"
        if plain
        else draw(st.sampled_from(["object"] * 16 + ["list", "two_documents", "not_json", "leading_space"]))
    )
    if shape == "list":
        return "[" + document + "]"
    if shape == "two_documents":
        return document + draw(st.sampled_from(WHITESPACE)) + '{"model": "' + draw(st.sampled_from(MODELS)) + '"}'
    if shape == "not_json":
        return "model=" + draw(st.sampled_from(MODELS))
    if shape == "leading_space":
        return draw(st.sampled_from(WHITESPACE)) + document
    return document


@st.composite
def multipart_bodies(draw: st.DrawFn, plain: bool = False) -> bytes:
    if plain:
        names = draw(
            st.permutations(
                ["model", *draw(st.lists(st.sampled_from(["x", "file", "prompt"]), max_size=2, unique=True))]
            )
        )
        return (
            (
                "".join(
                    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                    f"{draw(st.sampled_from([OPEN, OPEN, RESTRICTED])) if name == 'model' else 'v'}\r\n"
                    for name in names
                )
            )
            + f"--{BOUNDARY}--\r\n"
        ).encode()
    newline = draw(st.sampled_from(["\r\n"] * 9 + ["\n"]))
    parts = []
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3]))):
        name = draw(st.sampled_from(["model"] * 6 + ["x"] * 3 + ["Model", "MODEL", "_charset_", "model "]))
        disposition = draw(
            st.sampled_from(
                [f'form-data; name="{name}"'] * 6
                + [
                    f"form-data; name={name.strip()}",
                    f'form-data; name="{name}"; filename="m.txt"',
                    f"form-data; name*=utf-8''{name.strip()}",
                    f'form-data; NAME="{name}"',
                ]
            )
        )
        extra = draw(
            st.sampled_from(
                [""] * 6
                + [
                    "Content-Type: text/plain" + newline,
                    "Content-Type: text/plain; charset=utf-16" + newline,
                    "Content-Transfer-Encoding: base64" + newline,
                ]
            )
        )
        content = draw(st.sampled_from(MODELS))
        if "base64" in extra and draw(st.booleans()):
            content = base64.b64encode(content.encode()).decode()
        padding = draw(st.sampled_from([""] * 8 + [" ", "\t"]))
        parts.append(
            f"--{BOUNDARY}{padding}{newline}Content-Disposition: {disposition}{newline}{extra}{newline}"
            f"{content}{newline}"
        )
    return ("".join(parts) + f"--{BOUNDARY}--{newline}").encode("utf-8")


@dataclass
class Variant:
    headers: list[tuple[str, str]]
    body: bytes

    def __repr__(self) -> str:
        return f"Variant(headers={self.headers!r}, body={self.body[:400]!r})"


@st.composite
def variants(draw: st.DrawFn) -> Variant:
    # Half the variants are plain requests with one twist at most (a coding, header spellings), so that
    # many are served and the property has readings to compare; the other half mix every trick freely.
    plain = draw(st.booleans())
    kind = draw(st.sampled_from(["json"] * 6 + ["multipart"] * 3 + ([] if plain else ["form"])))
    if kind == "json":
        text = draw(json_texts(plain))
        encoding = "utf-8" if plain else draw(st.sampled_from(["utf-8"] * 16 + ["utf-8-sig", "utf-16", "utf-16-le"]))
        body = text.encode(encoding)
        matching = [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            'application/json;charset="UTF-8"',
            "application/vnd.api+json",
            " application/json ",
        ]
    elif kind == "multipart":
        body = draw(multipart_bodies(plain))
        matching = [
            f"multipart/form-data; boundary={BOUNDARY}",
            f'multipart/form-data; boundary="{BOUNDARY}"',
            f"Multipart/Form-Data; BOUNDARY={BOUNDARY}",
        ]
    else:
        body = (
            "x=1&model="
            + draw(st.sampled_from(MODELS))
            + draw(st.sampled_from(["", "&model=gpt-mock", ";model=frontier-x"]))
        ).encode()
        matching = ["application/x-www-form-urlencoded"]
    others = [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/json; charset=utf-16",
        "text/json",
        "application/json, text/plain",
        f"multipart/form-data; boundary={BOUNDARY}; boundary=zz",
        "application/octet-stream",
        f"multipart/form-data; boundary={BOUNDARY}",
        "application/json",
    ]
    labelled_as_is = plain or draw(st.sampled_from([True, True, True, False]))
    content_type = draw(st.sampled_from(matching)) if labelled_as_is else draw(st.sampled_from(others))
    headers = [("Content-Type", content_type)] if content_type is not None else []
    # Content codings: none, one, or stacked; declared as applied, or not.
    layers = [
        draw(st.sampled_from(list(CODERS)))
        for _ in range(draw(st.sampled_from([0, 1] if plain else [0] * 5 + [1] * 4 + [2])))
    ]
    for layer in layers:
        body = CODERS[layer](body)
    applied = [layer.replace("deflate-raw", "deflate") for layer in layers]
    declared = (
        "as_applied"
        if plain
        else draw(
            st.sampled_from(
                ["as_applied"] * 10 + ["outer_only", "x-gzip", "upper", "two_headers", "with_identity", "none"]
            )
        )
    )
    if declared == "as_applied" and applied:
        headers.append(("Content-Encoding", ", ".join(reversed(applied))))
    elif declared == "outer_only" and applied:
        headers.append(("Content-Encoding", applied[-1]))
    elif declared == "x-gzip":
        headers.append(("Content-Encoding", "x-gzip"))
    elif declared == "upper" and applied:
        headers.append(("Content-Encoding", applied[-1].upper()))
    elif declared == "two_headers" and applied:
        headers += [("Content-Encoding", coding) for coding in reversed(applied)] + [("Content-Encoding", "identity")]
    elif declared == "with_identity":
        headers.append(("Content-Encoding", ", ".join([*reversed(applied), "identity"])))
    headers += draw(st.lists(st.sampled_from(SPOOFED_HEADERS), max_size=3, unique=True))
    return Variant(headers, body)


# --- the property -------------------------------------------------------------------------------------------

GATEWAY_REFUSALS = {400, 403, 405, 408, 413, 415, 451}


def check(setting: tuple[GatewayProcess, str], decoders: PythonDecoders, variant: Variant) -> None:
    gateway, redis_url = setting
    request_id = "diff-" + os.urandom(8).hex()
    data = request(
        "POST",
        "/v1/chat/completions",
        [("Authorization", f"Bearer {TOKEN}"), ("X-Request-Id", request_id), *variant.headers],
        variant.body,
    )
    with RawConnection(int(gateway.config["listen"]["port"])) as conn:
        conn.send(data)
        response: RawResponse = conn.read_response()
    event(f"status {response.status}")
    if not 200 <= response.status < 300:
        event(f"refused {response.json()['error']['code']}")
        assert response.status in GATEWAY_REFUSALS, (response.status, response.body[:300])
        error = response.json()["error"]
        assert error["code"] and error["request_id"] == request_id, error
        return
    decided = audited_model(redis_url, request_id)
    event(f"served, decided {decided!r}")
    arrived = response.json()
    go_json = (arrived["json"]["model"] or None) if arrived["json"]["ok"] else ERROR
    readings = {
        "go encoding/json": go_json,
        "python json by media type": decoders.read("a", arrived),
        "aiohttp reader + json.loads": decoders.read("b", arrived),
    }
    if arrived["form"]["ok"]:
        models = arrived["form"]["models"] or []
        readings["go mime/multipart"] = (models[0] or None) if len(models) == 1 else (None if not models else ERROR)
    for decoder, model in readings.items():
        assert model == ERROR or model == decided, (decoder, model, decided, readings)
    assert RESTRICTED not in readings.values()
    # The headers the gateway vouches for arrive once, from the gateway only, however an upstream folds names.
    folded: dict[str, list[str]] = {}
    for name, values in arrived["headers"].items():
        folded.setdefault(name.lower().replace("_", "-"), []).extend(values)
    assert folded.get("x-gateway-subject") == ["cn-differential"], folded
    assert folded.get("x-gateway-tier") == ["bulk"] and folded.get("x-gateway-org") == ["acme"], folded
    assert folded.get("x-forwarded-for") == ["127.0.0.1"], folded
    for name in ("forwarded", "x-real-ip", "x-forwarded-host", "x-original-url", "x-rewrite-url", "content-encoding"):
        assert name not in folded, (name, folded)


EXAMPLES = int(os.environ.get("GATEWAY_DIFFERENTIAL_EXAMPLES", "300"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(variant=variants())
def test_the_upstreams_read_the_model_the_gateway_decided(
    setting: tuple[GatewayProcess, str], python_decoders: PythonDecoders, variant: Variant
) -> None:
    check(setting, python_decoders, variant)


@pytest.mark.soak
@pytest.mark.timeout(3600)
@settings(
    max_examples=int(os.environ.get("GATEWAY_DIFFERENTIAL_SOAK_EXAMPLES", "20000")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(variant=variants())
def test_the_upstreams_read_the_model_the_gateway_decided_soak(
    setting: tuple[GatewayProcess, str], python_decoders: PythonDecoders, variant: Variant
) -> None:
    check(setting, python_decoders, variant)


def test_the_decoders_do_read_the_model_where_the_gateway_did_not_look(
    setting: tuple[GatewayProcess, str], python_decoders: PythonDecoders, go_upstream: str
) -> None:
    """The decoders are live: sent straight to them, the bypasses of the review read frontier-x."""
    direct = {
        "headers": {"Content-Type": ["application/x-www-form-urlencoded"]},
        "method": "POST",
        "target": "/v1/chat/completions",
        "host": "x",
        "body": base64.b64encode(b'{"model": "frontier-x", "messages": []}').decode(),
    }
    assert python_decoders.read("b", direct) == RESTRICTED  # JSON under a form type (finding 1)
    assert python_decoders.read("a", direct) is None
    direct["headers"] = {"Content-Type": ["application/json"], "Content-Encoding": ["gzip"]}
    direct["body"] = base64.b64encode(gzip.compress(b'{"model": "frontier-x"}')).decode()
    assert python_decoders.read("b", direct) == RESTRICTED  # a body still compressed (finding 2)
    with RawConnection(int(go_upstream.rsplit(":", 1)[1])) as conn:
        conn.send(
            request(
                "POST", "/", [("Content-Type", "application/json")], b'{"model": "gpt-mock", "MODEL": "frontier-x"}'
            )
        )
        assert conn.read_response().json()["json"]["model"] == RESTRICTED  # case-insensitive keys (finding 3)
