"""The canonical request view's pieces on their own: content decoding, media types, model names.

Through a running gateway these are held by tests/test_request_findings.py and the differential test;
here each rule's edges are checked directly (bombs, truncated and trailing streams, gzip members,
media-type grammar, the 256-byte bound).
"""

from __future__ import annotations

import gzip
import zlib

import brotli
import pytest

from gateway.errors import GatewayError
from gateway.request_model import check_model, decode_body, parse_media_type, still_compressed

LIMIT = 4096
BODY = b'{"model": "gpt-mock", "messages": []}'


def refused(call: object, status: int, code: str) -> None:
    with pytest.raises(GatewayError) as caught:
        call()  # type: ignore[operator]
    assert (caught.value.status, caught.value.code) == (status, code), caught.value


@pytest.mark.parametrize(
    ("coding", "encoded"),
    [
        ("gzip", gzip.compress(BODY)),
        ("GZIP", gzip.compress(BODY)),
        (" gzip\t", gzip.compress(BODY)),
        ("deflate", zlib.compress(BODY)),
        ("deflate", zlib.compress(BODY, wbits=-15)),
        ("br", brotli.compress(BODY)),
        ("identity", BODY),
        ("gzip", gzip.compress(BODY[:10]) + gzip.compress(BODY[10:])),
    ],
)  # two gzip members
def test_one_coding_decodes_to_the_body(coding: str, encoded: bytes) -> None:
    assert decode_body(encoded, [coding], LIMIT) == BODY


@pytest.mark.parametrize(
    "codings",
    [
        ["x-gzip"],
        ["gzip, identity"],
        ["gzip,gzip"],
        ["gzip", "identity"],
        ["zstd"],
        ["compress"],
        [""],
        ["gzip;q=1"],
        ["gz\u0131p"],
        ["br, gzip"],
    ],
)
def test_other_or_stacked_codings_are_415(codings: list[str]) -> None:
    refused(lambda: decode_body(gzip.compress(BODY), codings, LIMIT), 415, "unsupported_media_type")


@pytest.mark.parametrize(
    ("coding", "outer", "inner"),
    [
        ("gzip", gzip.compress, gzip.compress),
        ("gzip", gzip.compress, zlib.compress),
        ("deflate", zlib.compress, gzip.compress),
        ("br", brotli.compress, brotli.compress),
        ("gzip", gzip.compress, brotli.compress),
    ],
)
def test_a_body_still_compressed_after_decoding_is_415(coding: str, outer: object, inner: object) -> None:
    encoded = outer(inner(BODY))  # type: ignore[operator]
    refused(lambda: decode_body(encoded, [coding], LIMIT), 415, "unsupported_media_type")


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
def test_bombs_are_413_without_decoding_them_whole(coding: str) -> None:
    compress = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress}[coding]
    bomb = compress(b"0" * (64 * 1024 * 1024))
    refused(lambda: decode_body(bomb, [coding], LIMIT), 413, "request_too_large")


@pytest.mark.parametrize(
    ("coding", "encoded"),
    [
        ("gzip", gzip.compress(BODY)[:-6]),
        ("gzip", gzip.compress(BODY) + b"trailing"),
        ("gzip", b"not gzip"),
        ("deflate", zlib.compress(BODY)[:-3]),
        ("deflate", zlib.compress(BODY) + b"x"),
        ("br", brotli.compress(BODY)[:-2]),
        ("br", brotli.compress(BODY) + b"x"),
    ],
)
def test_broken_streams_are_400(coding: str, encoded: bytes) -> None:
    refused(lambda: decode_body(encoded, [coding], LIMIT), 400, "invalid_request")


def test_still_compressed_spots_gzip_zlib_and_brotli_but_not_json_or_multipart() -> None:
    for compressed in (gzip.compress(BODY), zlib.compress(BODY), brotli.compress(BODY)):
        assert still_compressed(compressed, LIMIT)
    for plain in (BODY, b"  " + BODY, b"[1]", b"--boundary\r\n", b""):
        assert not still_compressed(plain, LIMIT)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("application/json", ("application/json", {})),
        ("Application/JSON; Charset=UTF-8", ("application/json", {"charset": "UTF-8"})),
        ('multipart/form-data; boundary="a b"', ("multipart/form-data", {"boundary": "a b"})),
        ("multipart/form-data;boundary=x;", ("multipart/form-data", {"boundary": "x"})),
        (" application/vnd.api+json ", ("application/vnd.api+json", {})),
    ],
)
def test_media_types_parse(value: str, expected: tuple[str, dict[str, str]]) -> None:
    assert parse_media_type(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "application/json, text/plain",
        "json",
        "application/json; charset",
        'multipart/form-data; boundary="a\\"b"',
        "multipart/form-data; boundary=a; boundary=b",
        "multipart/form-data; BOUNDARY=a; boundary=b",
        "application /json",
        "a/b; c = d",
        "application/json\x00",
    ],
)
def test_media_types_read_two_ways_are_415(value: str) -> None:
    refused(lambda: parse_media_type(value), 415, "unsupported_media_type")


def test_model_names_are_bounded_and_printable() -> None:
    assert check_model("m" * 256) == "m" * 256
    assert check_model("é" * 128) == "é" * 128  # 256 bytes
    for bad in ("m" * 257, "é" * 129, "a\nb", "a\x00", "a\x7f", "a\u0085", "", None, 7, ["gpt-mock"]):
        refused(lambda bad=bad: check_model(bad), 400, "invalid_request")


def test_multipart_uploads_with_utf8_file_names_are_read() -> None:
    from gateway.request_model import ModelExtractor

    body = (
        '--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-mock\r\n'
        '--b\r\nContent-Disposition: form-data; name="file"; filename="日本.wav"; '
        "filename*=UTF-8''%E6%97%A5.wav\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n--b--\r\n"
    ).encode()
    assert ModelExtractor(None).read_body(body, ["multipart/form-data; boundary=b"]) == (
        "gpt-mock",
        "multipart/form-data",
    )
    refused(
        lambda: ModelExtractor(None).read_body(
            body.replace(b'name="file"', b'name="f\xc3\xa9"'), ["multipart/form-data; boundary=b"]
        ),
        400,
        "invalid_request",
    )
