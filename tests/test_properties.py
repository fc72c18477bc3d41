"""Property tests (hypothesis): header hygiene, client IP, request ids, model extraction and decide().

The decide() invariants, stated exactly:

* **Deny lists only block.** Adding an active entry to ``deny-countries`` or ``deny-entities`` never turns
  a blocked request into an allowed one. Likewise restricting a model (suspending its export, narrowing
  its ``allowed_countries``) and removing a partner never allow what was blocked.
* **Tiers are monotone in their stages.** For tiers A and B with ``stages(A) ⊆ stages(B)``, a request
  allowed under A is allowed under B (same caller, model, snapshot, time). This holds *including* row 8
  (partner required): that row is waived exactly when ``internal ∈ stages``, which is itself monotone in
  the stage set, so a superset tier is never newly subject to it.
* **Stale is 503.** With ``stale=True`` or no snapshot, every request is 503 ``policy_stale``.
* **Deterministic.** The same inputs give the same decision, also on a snapshot rebuilt from the same data.
"""

from __future__ import annotations

import copy
import os
import posixpath
import re
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import GatewayError
from gateway.logs import request_id_for
from gateway.network import TrustedProxies, UnreadableHop, client_chain, parse_ip
from gateway.policy.decide import Rules, decide
from gateway.policy.model import Caller
from gateway.policy.names import STAGES
from gateway.policy.wire import build_snapshot
from gateway.proxy import HOP_BY_HOP, origin_form, response_headers, upstream_request_headers
from gateway.public import header_safe
from gateway.request_model import ModelExtractor

# GATEWAY_PROPERTY_EXAMPLES raises the count for a longer fuzz run (e.g. 20000); the default keeps the suite fast.
FAST = settings(
    max_examples=int(os.environ.get("GATEWAY_PROPERTY_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# --- header hygiene -----------------------------------------------------------------------------------

GATEWAY_SET = (
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-id",
    "x-gateway-subject",
    "x-gateway-org",
    "x-gateway-tier",
    "authorization",
)
NAME_POOL = [
    *HOP_BY_HOP,
    "Connection",
    "Keep-Alive",
    "TE",
    "Upgrade",
    "Proxy-Authorization",
    "Proxy-Foo",
    "X-Gateway-Subject",
    "X-Gateway-Tier",
    "x-gateway-anything",
    "Authorization",
    "Host",
    "Content-Length",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Request-Id",
    "Expect",
    "Content-Type",
    "Accept",
    "X-Custom",
    "X-Other",
    "User-Agent",
    "Cookie",
    # Spellings an upstream may fold into a header the gateway sets or vouches for (finding 6).
    "X_Gateway_Subject",
    "x_gateway_tier",
    "X_Forwarded_For",
    "X-Forwarded-Host",
    "Forwarded",
    "X-Real-IP",
    "X_Real_IP",
    "X-Original-URL",
    "X_Rewrite_URL",
    "Content_Type",
    "Content-Encoding",
    "Transfer_Encoding",
    "X_Custom_Kept",
]
VOUCHED = ("forwarded", "x-real-ip", "x-original-url", "x-rewrite-url", "content-encoding")


def folded(name: str) -> str:
    return name.lower().replace("_", "-")


header_names = st.one_of(
    st.sampled_from(NAME_POOL).map(lambda n: "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(n))),
    st.sampled_from(NAME_POOL),
    st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True),
)
header_values = st.from_regex(r"[\x20-\x7e]{0,40}", fullmatch=True)
connection_values = st.lists(st.one_of(header_names, st.sampled_from(["close", "keep-alive", ""])), max_size=6).map(
    ", ".join
)


@FAST
@given(
    headers=st.lists(st.tuples(header_names, header_values), max_size=25),
    connection=st.lists(connection_values, max_size=2),
    upstream_auth=st.one_of(st.none(), st.just("Bearer upstream-secret")),
    proto=st.sampled_from(["http", "https"]),
)
def test_upstream_request_headers_hygiene(
    headers: list[tuple[str, str]], connection: list[str], upstream_auth: str | None, proto: str
) -> None:
    incoming: CIMultiDict[str] = CIMultiDict(headers)
    for value in connection:
        incoming.add("Connection", value)
    identity = (("X-Gateway-Subject", "alice"), ("X-Gateway-Org", "acme"), ("X-Gateway-Tier", "partner"))
    out = upstream_request_headers(
        CIMultiDictProxy(incoming),
        forwarded_for="203.0.113.9, 10.0.0.1",
        proto=proto,
        request_id="rid-1",
        identity_headers=identity,
        upstream_auth=upstream_auth,
    )
    names = [name.lower() for name in out]
    named_by_connection = {folded(t.strip()) for v in incoming.getall("Connection", []) for t in v.split(",")}
    for name in names:
        assert folded(name) not in HOP_BY_HOP and not folded(name).startswith("proxy-"), name
        assert folded(name) not in named_by_connection or name in GATEWAY_SET, name
        assert folded(name) not in ("host", "content-length", "expect", *VOUCHED)
        assert not folded(name).startswith(("x-gateway-", "x-forwarded-")) or name in GATEWAY_SET, name
    # However an upstream folds names, the gateway's own arrive once each.
    assert len([n for n in names if folded(n) in GATEWAY_SET]) == len(GATEWAY_SET) - (upstream_auth is None)
    # The gateway's own, each exactly once, whatever the caller sent or named in Connection.
    for name, value in (
        ("x-forwarded-for", "203.0.113.9, 10.0.0.1"),
        ("x-forwarded-proto", proto),
        ("x-request-id", "rid-1"),
        *((n.lower(), v) for n, v in identity),
    ):
        assert names.count(name) == 1, name
        assert out[name] == value
    assert [n for n in names if n.startswith("x-gateway-")] == ["x-gateway-subject", "x-gateway-org", "x-gateway-tier"]
    if upstream_auth is None:
        assert "authorization" not in names
    else:
        assert names.count("authorization") == 1 and out["Authorization"] == upstream_auth
    # Every other caller header passes unchanged and in order.
    expected = [
        (n.lower(), v)
        for n, v in incoming.items()
        if folded(n) not in HOP_BY_HOP
        and not folded(n).startswith(("proxy-", "x-gateway-", "x-forwarded-"))
        and folded(n) not in named_by_connection
        and folded(n) not in GATEWAY_SET
        and folded(n) not in ("host", "content-length", "expect", *VOUCHED)
        and not (folded(n) == "content-type" and "_" in n)
    ]
    assert [(n.lower(), v) for n, v in out.items() if n.lower() not in GATEWAY_SET] == expected


@FAST
@given(
    headers=st.lists(st.tuples(header_names, header_values), max_size=25),
    connection=st.lists(connection_values, max_size=2),
)
def test_response_headers_drop_hop_by_hop_and_framing(headers: list[tuple[str, str]], connection: list[str]) -> None:
    upstream: CIMultiDict[str] = CIMultiDict(headers)
    for value in connection:
        upstream.add("Connection", value)
    named = {t.strip().lower() for v in upstream.getall("Connection", []) for t in v.split(",")}
    out = response_headers(CIMultiDictProxy(upstream))
    for name in out:
        lower = name.lower()
        assert lower not in HOP_BY_HOP and lower != "content-length" and not lower.startswith("proxy-")
        assert lower not in named


# --- client IP ------------------------------------------------------------------------------------------

TRUSTED = TrustedProxies(["10.0.0.0/8", "127.0.0.1/32", "fd00::/8"])
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
trusted_hops = st.one_of(
    st.ip_addresses(network="10.0.0.0/8").map(str), st.just("127.0.0.1"), st.ip_addresses(network="fd00::/8").map(str)
)
untrusted_hops = st.one_of(
    st.ip_addresses(network="198.51.100.0/24").map(str), st.ip_addresses(network="2001:db8::/32").map(str)
)
garbage = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["unknown", "_hidden", "999.1.1.1", "1.2.3", "[::1", "::ffff:", "1.2.3.4/24", "a" * 50, " ", "%00"]
    ),
)
xff_entry = st.one_of(
    ipv4, ipv6, trusted_hops, untrusted_hops, garbage, ipv4.map(lambda a: f"{a}:8080"), ipv6.map(lambda a: f"[{a}]:443")
)
peers = st.one_of(st.none(), st.just(""), ipv4, ipv6, trusted_hops, garbage)


def chain_or_refusal(peer: str | None, xff: list[str]) -> tuple[str, str] | None:
    try:
        return client_chain(peer, xff, TRUSTED)
    except UnreadableHop:
        return None


@FAST
@given(peer=peers, xff=st.lists(st.lists(xff_entry, max_size=5).map(", ".join), max_size=3))
def test_client_ip_is_an_address_or_the_transports_own_word(peer: str | None, xff: list[str]) -> None:
    found = chain_or_refusal(peer, xff)
    # Several XFF headers are one list.
    assert chain_or_refusal(peer, [", ".join(xff)] if xff else []) == found
    if found is None:
        # Refused only where the XFF is read at all: behind a trusted peer (or a unix socket's none).
        assert not peer or TRUSTED.contains(peer)
        return
    result, forwarded = found
    assert result == "" or parse_ip(result) is not None or result == peer
    if result and parse_ip(result) is not None:
        assert str(parse_ip(result)) == result  # normalised
        assert "," not in result and " " not in result
    if peer and parse_ip(peer) is not None and not TRUSTED.contains(peer):
        assert found == (str(parse_ip(peer)),) * 2  # an untrusted peer's XFF is never believed nor sent on
    # The upstream's left-most X-Forwarded-For entry is the address the gateway decided on.
    assert forwarded.split(", ")[0] == result


@FAST
@given(
    peer=trusted_hops,
    spoofed=st.lists(xff_entry, max_size=6),
    real=untrusted_hops,
    hops=st.lists(trusted_hops, max_size=3),
)
def test_spoofed_left_of_the_rightmost_untrusted_hop_changes_nothing(
    peer: str, spoofed: list[str], real: str, hops: list[str]
) -> None:
    honest = [real, *hops]
    expected = client_chain(peer, [", ".join(honest)], TRUSTED)
    assert expected == (str(parse_ip(real)), ", ".join(str(parse_ip(h)) for h in [*honest, peer]))
    # Whatever the caller put left of the real hop, garbage included, is neither read nor sent on.
    assert client_chain(peer, [", ".join([*spoofed, *honest])], TRUSTED) == expected
    assert (
        client_chain(peer, [", ".join(spoofed), ", ".join(honest)] if spoofed else [", ".join(honest)], TRUSTED)
        == expected
    )


NOT_CANONICAL = ["198.51.100.007", "3325256711", "0x7f.0.0.1", "198.51.100.7:80", "[2001:db8::1]", "fe80::1%eth0"]


@FAST
@given(
    peer=trusted_hops, bad=st.one_of(garbage, st.sampled_from(NOT_CANONICAL)), hops=st.lists(trusted_hops, max_size=3)
)
def test_an_unreadable_hop_that_must_be_read_is_refused_never_skipped(peer: str, bad: str, hops: list[str]) -> None:
    assume(bad in NOT_CANONICAL or (bad.strip(" \t") and "," not in bad and parse_ip(bad.strip(" \t")) is None))
    with pytest.raises(UnreadableHop):
        client_chain(peer, [", ".join(["203.0.113.9", bad, *hops])], TRUSTED)


@FAST
@given(text=st.text(max_size=60))
def test_parse_ip_never_fails_and_round_trips(text: str) -> None:
    address = parse_ip(text)
    if address is not None:
        assert parse_ip(str(address)) == address


# --- claims as header values, request ids -----------------------------------------------------------------

any_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40)


@FAST
@given(value=st.one_of(any_text, st.text(max_size=40), st.from_regex(r"[ %a-z]{0,10}", fullmatch=True)))
def test_header_safe_is_printable_and_reversible(value: str) -> None:
    encoded = header_safe(value)
    assert re.fullmatch(r"[\x20-\x7e]*", encoded)
    assert encoded == encoded.strip(" "), "parsers strip spaces at the ends"
    assert unquote(encoded, errors="surrogatepass") == value  # so two claims never share a header value


@FAST
@given(incoming=st.one_of(st.none(), st.text(max_size=200), st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True)))
def test_request_id_is_kept_when_valid_and_always_safe(incoming: str | None) -> None:
    result = request_id_for(incoming)
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", result)
    if incoming is not None and re.fullmatch(r"[A-Za-z0-9._-]{1,128}", incoming):
        assert result == incoming


# --- the model: path and body ----------------------------------------------------------------------------

PATTERN = r"^/v1/models/(?P<model>[^/]+)/infer$"
EXTRACTOR = ModelExtractor(PATTERN)
LOOSE = re.compile(PATTERN, re.IGNORECASE)
SEGMENTS = [
    "v1",
    "V1",
    "models",
    "MODELS",
    "open",
    "secret",
    "Secret",
    "infer",
    "INFER",
    "",
    ".",
    "..",
    "%2e",
    "%2E%2e",
    ".%2e",
    "%2F",
    "%2f",
    "secret%2Finfer",
    "a;b",
    ";x",
    "secret;v=1",
    "%3B",
    "%5C",
    "secret%00",
    "%73ecret",
    "secre%74",
    "%25",
    "%252F",
    "%252e%252e",
    "a\\b",
    "x%20y",
    "%C3%A9",
    "%FF",
    "models%2Fsecret",
]


def normalisations(path: str) -> list[str]:
    """How servers this gateway may front could read a path (an implementation independent of the product)."""

    def resolve(text: str) -> str:
        text = re.sub(r"/+", "/", text)
        resolved = posixpath.normpath(text) if text else "/"
        return resolved if resolved != "//" else "/"

    def params(text: str) -> str:
        return "/".join(segment.split(";")[0] for segment in text.split("/"))

    once = unquote(path, errors="replace")
    twice = unquote(once, errors="replace")
    readings = [path, once, twice, once.split("\x00")[0], once.replace("\\", "/"), params(path), params(once)]
    return readings + [resolve(r) for r in readings] + [resolve(r).rstrip("/") for r in readings]


MUTATIONS = [
    "empty",
    "dot",
    "dotdot",
    "encode",
    "encode_slash",
    "upper",
    "param",
    "double",
    "backslash",
    "trailing",
    "nul",
    "utf8",
]


@st.composite
def model_paths(draw: st.DrawFn) -> str:
    """A model path, then a few of the ways a client could disguise it."""
    segments = ["v1", "models", draw(st.sampled_from(["open", "secret", "Secret", "a-b_c.d~e"])), "infer"]
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=4)):
        at = draw(st.integers(0, len(segments) - 1))
        if mutation == "empty":
            segments.insert(at, "")
        elif mutation == "dot":
            segments.insert(at, ".")
        elif mutation == "dotdot":
            segments[at:at] = ["decoy", ".."]
        elif mutation == "encode" and segments[at]:
            i = draw(st.integers(0, len(segments[at]) - 1))
            code = f"%{ord(segments[at][i]):02{draw(st.sampled_from(['X', 'x']))}}"
            segments[at] = segments[at][:i] + code + segments[at][i + 1 :]
        elif mutation in ("encode_slash", "backslash") and at + 1 < len(segments):
            joint = "%2F" if mutation == "encode_slash" else draw(st.sampled_from(["\\", "%5C", "%5c"]))
            segments[at : at + 2] = [segments[at] + joint + segments[at + 1]]
        elif mutation == "upper":
            segments[at] = segments[at].upper()
        elif mutation == "param":
            segments[at] += draw(st.sampled_from([";", ";v=1", "%3B", "%3bjsessionid=x"]))
        elif mutation == "double":
            segments[at] = segments[at].replace("%", "%25")
        elif mutation == "trailing":
            segments.append("")
        elif mutation == "nul":
            segments[at] += "%00"
        elif mutation == "utf8":
            segments[at] += draw(st.sampled_from(["%C3%A9", "%FF", "%E2%80%AE"]))
    return "/" + "/".join(segments)


@FAST
@given(
    st.one_of(
        model_paths(), st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6).map(lambda s: "/" + "/".join(s))
    )
)
@example("/v1/models%2Fsecret/infer/;x/..")  # ";x" is a segment to servers that resolve ".." before params
def test_a_path_model_is_the_model_every_normalising_server_would_route_to(path: str) -> None:
    try:
        model = EXTRACTOR.model_from_path(origin_form(path))
    except GatewayError as err:
        assert err.status == 400
        return  # refused: nothing is decided or served
    for reading in normalisations(path):
        match = LOOSE.search(reading)
        if match and match.group("model"):
            assert model == match.group("model"), (path, reading, model)


@FAST
@given(path=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60).map(lambda p: "/" + p))
def test_path_extraction_refuses_or_answers_never_fails(path: str) -> None:
    try:
        target = origin_form(path)
        model = EXTRACTOR.model_from_path(target.split("?", 1)[0])
    except GatewayError as err:
        assert err.status == 400
        return
    assert model is None or (isinstance(model, str) and model)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.text(max_size=10))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["model", "x", "messages", "Model"]), inner, max_size=3),
    ),
    max_leaves=10,
)


@FAST
@given(
    document=st.dictionaries(
        st.sampled_from(["model", "messages", "stream", "x", "Model", "model "]), json_values, max_size=5
    ),
    ensure_ascii=st.booleans(),
    indent=st.sampled_from([None, 2]),
)
def test_json_model_is_what_a_json_parser_reads(
    document: dict[str, Any], ensure_ascii: bool, indent: int | None
) -> None:
    import json

    body = json.dumps(document, ensure_ascii=ensure_ascii, indent=indent).encode()
    expected = document.get("model")
    try:
        model = EXTRACTOR.model_from_body(body, ["application/json"])
    except GatewayError as err:
        assert err.status == 400
        # Refused: an unusable model, or a key that case-insensitive decoders read as "model" too.
        if "Model" in document:
            assert err.code == "ambiguous_request"
        else:
            assert "model" in document
            assert not (isinstance(expected, str) and expected) or re.search(r"[\x00-\x1f\x7f-\x9f]", expected)
        return
    assert "Model" not in document
    assert model == (expected if "model" in document else None)


@FAST
@given(
    first=st.text(min_size=1, max_size=8),
    second=st.text(min_size=1, max_size=8),
    escape=st.sampled_from(["model", "mod\\u0065l", "\\u006dodel", "m\\u006f\\u0064\\u0065\\u006c"]),
)
def test_a_duplicate_model_key_is_refused_however_spelled(first: str, second: str, escape: str) -> None:
    import json

    body = ('{"model": ' + json.dumps(first) + ', "x": 1, "' + escape + '": ' + json.dumps(second) + "}").encode()
    with pytest.raises(GatewayError) as refused:
        EXTRACTOR.model_from_body(body, ["application/json"])
    assert (refused.value.status, refused.value.code) == (400, "ambiguous_request")


@FAST
@given(
    boundary=st.from_regex(r"[A-Za-z0-9'()+_,./:=?-]{1,70}", fullmatch=True),
    fields=st.lists(
        st.tuples(
            st.sampled_from(["model", "file", "prompt", "model_x", "temperature"]),
            st.text(alphabet="abcXYZ 0123456789é", min_size=1, max_size=12),
        ),
        max_size=5,
    ),
)
def test_multipart_model_is_the_one_model_field(boundary: str, fields: list[tuple[str, str]]) -> None:
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode() + b"\r\n"
            for name, value in fields
        )
        + f"--{boundary}--\r\n".encode()
    )
    models = [value for name, value in fields if name == "model"]
    content_type = [f'multipart/form-data; boundary="{boundary}"']
    if len(models) > 1 or not fields:  # two models, or no part at all
        with pytest.raises(GatewayError):
            EXTRACTOR.model_from_body(body, content_type)
        return
    assert EXTRACTOR.model_from_body(body, content_type) == (models[0] if models else None)


@FAST
@given(
    body=st.binary(max_size=200),
    content_type=st.sampled_from(
        [
            [],
            ["application/json"],
            ["multipart/form-data; boundary=xx"],
            ["multipart/form-data"],
            ["application/x-www-form-urlencoded"],
            ["text/plain"],
            ["a/b", "c/d"],
        ]
    ),
)
def test_any_body_is_refused_or_answered_never_an_error(body: bytes, content_type: list[str]) -> None:
    try:
        model = EXTRACTOR.model_from_body(body, content_type)
    except GatewayError as err:
        assert err.status in (400, 415)
        return
    assert model is None or (isinstance(model, str) and model)
    # Read at all only as JSON or multipart, and only with one media type named.
    assert not body or content_type in (["application/json"], ["multipart/form-data; boundary=xx"])


# --- decide() ---------------------------------------------------------------------------------------------

NOW = 1_800_000_000.0
COUNTRIES = ["US", "DE", "IR", "CN", "RU", "UA", "GB"]
SUBDIVISIONS = ["UA-43", "UA-30", "US-CA"]
REGIONS = COUNTRIES + SUBDIVISIONS
SUBJECTS = ["alice", "bob", "mallory"]
ORGS = ["acme", "globex", "evil"]
MODELS = ["m1", "m2", "m3"]


def entry(expires_at: str | None = None) -> dict[str, Any]:
    return {
        "reason": "property",
        "source": "test",
        "added_by": "t",
        "added_at": "2026-01-01T00:00:00Z",
        "expires_at": expires_at,
    }


expiry = st.sampled_from([None, None, "2020-01-01T00:00:00Z", "2030-01-01T00:00:00Z"])
stage_sets = st.sets(st.sampled_from(STAGES))
model_dicts = st.fixed_dictionaries(
    {
        "stage": st.sampled_from(STAGES),
        "timeline": st.lists(
            st.fixed_dictionaries(
                {
                    "at": st.sampled_from(["2026-06-01T00:00:00Z", "2027-06-01T00:00:00Z"]),
                    "stage": st.sampled_from(STAGES),
                }
            ),
            max_size=2,
        ),
        "allowed_countries": st.one_of(st.none(), st.lists(st.sampled_from(REGIONS), max_size=4, unique=True)),
        "export_suspended": st.booleans(),
    }
)
policies = st.fixed_dictionaries(
    {
        "lists": st.fixed_dictionaries(
            {
                "deny-countries": st.dictionaries(st.sampled_from(REGIONS), expiry.map(entry), max_size=3),
                "deny-entities": st.dictionaries(st.sampled_from(SUBJECTS + ORGS), expiry.map(entry), max_size=2),
                "partners": st.dictionaries(st.sampled_from(ORGS), expiry.map(entry), max_size=3),
            }
        ),
        "models": st.dictionaries(st.sampled_from(MODELS), model_dicts, max_size=3),
    }
)
callers = st.builds(
    lambda subject, org, claim, ip_country, ip_sub: Caller(
        subject=subject,
        org=org,
        org_name=None,
        tier="t",
        claimed_country=claim,
        ip="192.0.2.1",
        ip_country=ip_country,
        ip_subdivision=ip_sub,
    ),
    st.sampled_from(SUBJECTS),
    st.one_of(st.none(), st.sampled_from(ORGS)),
    st.one_of(st.none(), st.sampled_from(REGIONS)),
    st.one_of(st.none(), st.sampled_from(COUNTRIES)),
    st.one_of(st.none(), st.sampled_from(SUBDIVISIONS)),
)
rule_sets = st.builds(
    lambda home, unknown, require: (home, unknown, require),
    st.sets(st.sampled_from(COUNTRIES), max_size=3),
    st.sampled_from(["deny", "allow"]),
    st.booleans(),
)
requested_models = st.one_of(st.none(), st.sampled_from([*MODELS, "unregistered"]))


def snapshot_of(policy: dict[str, Any], version: int = 7) -> Any:
    lists = {**policy["lists"], "ip-ranges": {}}
    return build_snapshot(
        version=version, generation="g", loaded_at=NOW, lists=lists, models=policy["models"], api_keys={}
    )


def rules_of(rule_set: tuple[frozenset[str], str, bool], tiers: dict[str, frozenset[str]]) -> Rules:
    home, unknown, require = rule_set
    return Rules(home_countries=frozenset(home), unknown_model=unknown, tier_stages=tiers, require_ip_country=require)


def with_tier(caller: Caller, tier: str) -> Caller:
    return Caller(
        subject=caller.subject,
        org=caller.org,
        org_name=caller.org_name,
        tier=tier,
        claimed_country=caller.claimed_country,
        ip=caller.ip,
        ip_country=caller.ip_country,
        ip_subdivision=caller.ip_subdivision,
    )


@FAST
@given(
    policy=policies,
    caller=callers,
    model=requested_models,
    rule_set=rule_sets,
    stages=stage_sets,
    added=st.one_of(
        st.tuples(st.just("deny-countries"), st.sampled_from(REGIONS)),
        st.tuples(st.just("deny-entities"), st.sampled_from(SUBJECTS + ORGS)),
    ),
    now=st.sampled_from([NOW - 86400 * 400, NOW, NOW + 86400 * 400]),
)
def test_adding_a_deny_entry_never_allows_what_was_blocked(
    policy: dict[str, Any],
    caller: Caller,
    model: str | None,
    rule_set: Any,
    stages: set[str],
    added: tuple[str, str],
    now: float,
) -> None:
    rules = rules_of(rule_set, {"t": frozenset(stages)})
    before = decide(snapshot_of(policy), caller, model, now, rules)
    grown = copy.deepcopy(policy)
    grown["lists"][added[0]][added[1]] = entry()
    after = decide(snapshot_of(grown, version=8), caller, model, now, rules)
    assert not (after.allowed and not before.allowed)
    if not before.allowed:
        assert not after.allowed


@FAST
@given(
    policy=policies,
    caller=callers,
    model=st.sampled_from(MODELS),
    rule_set=rule_sets,
    stages=stage_sets,
    change=st.sampled_from(["suspend", "narrow", "drop_partner"]),
    data=st.data(),
)
def test_restricting_a_model_or_removing_a_partner_never_allows(
    policy: dict[str, Any],
    caller: Caller,
    model: str,
    rule_set: Any,
    stages: set[str],
    change: str,
    data: st.DataObject,
) -> None:
    assume(model in policy["models"])
    rules = rules_of(rule_set, {"t": frozenset(stages)})
    before = decide(snapshot_of(policy), caller, model, NOW, rules)
    changed = copy.deepcopy(policy)
    if change == "suspend":
        changed["models"][model]["export_suspended"] = True
    elif change == "narrow":
        allowed = changed["models"][model]["allowed_countries"]
        current = REGIONS if allowed is None else allowed  # [] allows no country: nothing narrower exists
        changed["models"][model]["allowed_countries"] = (
            data.draw(st.lists(st.sampled_from(sorted(current)), unique=True, max_size=len(current))) if current else []
        )
    else:
        changed["lists"]["partners"].pop(caller.org or "", None)
    after = decide(snapshot_of(changed, version=8), caller, model, NOW, rules)
    assert before.allowed or not after.allowed


@FAST
@given(
    policy=policies,
    caller=callers,
    model=requested_models,
    rule_set=rule_sets,
    lower=stage_sets,
    extra=stage_sets,
    now=st.sampled_from([NOW - 86400 * 400, NOW, NOW + 86400 * 400]),
)
def test_a_tier_with_more_stages_never_loses_access(
    policy: dict[str, Any],
    caller: Caller,
    model: str | None,
    rule_set: Any,
    lower: set[str],
    extra: set[str],
    now: float,
) -> None:
    tiers = {"low": frozenset(lower), "high": frozenset(lower | extra)}
    rules = rules_of(rule_set, tiers)
    snapshot = snapshot_of(policy)
    low = decide(snapshot, with_tier(caller, "low"), model, now, rules)
    high = decide(snapshot, with_tier(caller, "high"), model, now, rules)
    if low.allowed:
        assert high.allowed, (lower, extra, high.code)


@FAST
@given(policy=policies, caller=callers, model=requested_models, rule_set=rule_sets, stages=stage_sets)
def test_stale_is_always_503_and_decisions_are_deterministic(
    policy: dict[str, Any], caller: Caller, model: str | None, rule_set: Any, stages: set[str]
) -> None:
    rules = rules_of(rule_set, {"t": frozenset(stages)})
    snapshot = snapshot_of(policy)
    for stale_snapshot in (snapshot, None):
        stale = decide(stale_snapshot, caller, model, NOW, rules, stale=True)
        assert (stale.allowed, stale.status, stale.code) == (False, 503, "policy_stale")
    assert decide(None, caller, model, NOW, rules).policy_version == 0
    first = decide(snapshot, caller, model, NOW, rules)
    assert decide(snapshot, caller, model, NOW, rules) == first
    assert decide(snapshot_of(copy.deepcopy(policy)), caller, model, NOW, rules) == first
    assert first.policy_version == snapshot.version
    assert first.allowed == (first.status == 200 and first.code == "")
    if model is None and not first.allowed:  # a request naming no model: rows 2 and 3 only
        assert first.code in ("entity_denied", "country_denied")
