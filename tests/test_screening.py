"""Screening: reading the Consolidated Screening List and matching names against it."""

from __future__ import annotations

import csv
import io
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.screening import (
    CSL_COLUMNS,
    MAX_ENTRIES,
    MAX_FIELD_CHARS,
    ScreeningFormatError,
    ScreeningHit,
    ScreeningIndex,
    _prepare,
    _score,
    normalize,
    parse_csl,
)

DATA = Path(__file__).resolve().parent.parent / "gateway" / "data"
FICTIONAL = "FICTIONAL SAMPLE ENTRY - not a real listing"


def _csv_bytes(rows: list[dict[str, str]], columns: tuple[str, ...] = CSL_COLUMNS) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row.get(column, "") for column in columns])
    return buffer.getvalue().encode()


@pytest.fixture(scope="module")
def csv_data() -> bytes:
    return (DATA / "csl_sample.csv").read_bytes()


@pytest.fixture(scope="module")
def json_data() -> bytes:
    return (DATA / "csl_sample.json").read_bytes()


@pytest.fixture(scope="module")
def entries(csv_data: bytes) -> list[dict[str, Any]]:
    return parse_csl(csv_data)


@pytest.fixture(scope="module")
def index(entries: list[dict[str, Any]]) -> ScreeningIndex:
    return ScreeningIndex(entries)


# ------------------------------------------------------------------ parsing


def test_both_sample_forms_parse_to_the_same_entries(csv_data: bytes, json_data: bytes) -> None:
    from_csv = parse_csl(csv_data)
    from_json = parse_csl(json_data)
    assert from_csv == from_json
    assert len(from_csv) == 25
    assert len({entry["id"] for entry in from_csv}) == 25
    assert all(entry["remarks"].startswith(FICTIONAL) for entry in from_csv)
    assert {entry["type"] for entry in from_csv} == {"Entity", "Individual", "Vessel", "Aircraft"}


def test_sample_csv_header_is_the_csl_column_order(csv_data: bytes) -> None:
    header = next(csv.reader(io.StringIO(csv_data.decode())))
    assert tuple(header) == CSL_COLUMNS
    assert len(CSL_COLUMNS) == 29


def test_entry_shape(entries: list[dict[str, Any]]) -> None:
    by_id = {entry["id"]: entry for entry in entries}
    armament = by_id["fict-0001"]
    assert armament == {
        "id": "fict-0001",
        "source": "Entity List (EL) - Bureau of Industry and Security",
        "type": "Entity",
        "name": "Société Générale d'Armement Fictif",
        "alt_names": ["SGAF", "Generale d'Armement Fictif SA"],
        "programs": [],
        "countries": ["FR"],
        "entity_number": "",
        "start_date": "2024-03-04",
        "source_list_url": "https://www.trade.gov/consolidated-screening-list",
        "remarks": FICTIONAL,
    }
    # Countries come from addresses, nationalities and citizenships, once each.
    assert by_id["fict-0002"]["countries"] == ["RU"]
    assert by_id["fict-0023"]["countries"] == ["CN", "HK"]
    assert by_id["fict-0002"]["alt_names"] == ["Dmitry Fiktivnikov", "FICTIVNIKOV, Dmitri"]
    assert by_id["fict-0005"]["type"] == "Vessel"


@pytest.mark.parametrize("name", ["csl_sample.csv", "csl_sample.json"])
def test_utf8_bom_is_tolerated(name: str, entries: list[dict[str, Any]]) -> None:
    data = b"\xef\xbb\xbf" + (DATA / name).read_bytes()
    assert parse_csl(data) == entries


def test_content_type_picks_the_format(csv_data: bytes, json_data: bytes) -> None:
    assert parse_csl(json_data, content_type="application/json; charset=utf-8") == parse_csl(csv_data)
    assert parse_csl(csv_data, content_type="text/csv") == parse_csl(csv_data)
    # A generic type falls back to sniffing.
    assert parse_csl(json_data, content_type="application/octet-stream") == parse_csl(csv_data)
    with pytest.raises(ScreeningFormatError, match="not valid JSON"):
        parse_csl(csv_data, content_type="application/json")


def test_multi_valued_csv_fields_split_on_semicolons() -> None:
    data = _csv_bytes(
        [
            {
                "name": "Harbourlight Example Trading LLC",
                "source": "Entity List (EL) - Bureau of Industry and Security",
                "programs": "PROGRAM-A; PROGRAM-B;",
                "alt_names": "Harbourlight Example; ; Harbourlight Trading Example",
                "addresses": "1 Sample Street, Exampletown, DE; 2 Other Street, Otherplace, Austria",
                "nationalities": "at",
            }
        ]
    )
    [entry] = parse_csl(data)
    assert entry["programs"] == ["PROGRAM-A", "PROGRAM-B"]
    assert entry["alt_names"] == ["Harbourlight Example", "Harbourlight Trading Example"]
    assert entry["countries"] == ["DE", "AT"]  # a country name becomes its code; codes are upper case


def test_json_form_with_scalars_and_missing_fields() -> None:
    data = json.dumps(
        {
            "results": [
                {"name": "Example Number Entry", "entity_number": 12345, "alt_names": None, "addresses": None},
            ]
        }
    ).encode()
    [entry] = parse_csl(data)
    assert entry["entity_number"] == "12345"
    assert entry["alt_names"] == [] and entry["countries"] == [] and entry["source"] == ""


def test_normalised_entries_read_back_unchanged(entries: list[dict[str, Any]]) -> None:
    assert parse_csl(json.dumps({"entries": entries}).encode()) == entries


def test_ids_without_id_column_are_stable_hashes() -> None:
    rows = [
        {"name": "Example Alpha", "source": "S1"},
        {"name": "Example Beta", "source": "S1"},
        {"name": "Example Alpha", "source": "S1"},  # the same party listed twice (two addresses)
    ]
    columns = ("source", "name")
    first = [entry["id"] for entry in parse_csl(_csv_bytes(rows, columns))]
    again = [entry["id"] for entry in parse_csl(_csv_bytes(list(rows), columns))]
    assert first == again
    assert len(set(first)) == 3
    assert first[2] == f"{first[0]}-2"
    assert all(identifier.startswith("csl-") for identifier in first)


def _header() -> str:
    return ",".join(CSL_COLUMNS)


def _row(**values: str) -> str:
    return ",".join(values.get(column, "") for column in CSL_COLUMNS)


BAD_FILES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "empty file"),
    ("blank lines only", b"\n\n \n", "empty file"),
    ("header only", _header().encode() + b"\n", "no entries"),
    ("no name column", b"_id,source\nx,y\n", "no 'name' column"),
    ("duplicate column", b"name,source,name\na,b,c\n", "'name' appears twice"),
    (
        "row without name",
        f"{_header()}\n{_row(_id='a', name='Ok')}\n{_row(_id='b', source='S')}\n".encode(),
        r"row 2 \(line 3\): the 'name' field is empty",
    ),
    ("too many fields", f"{_header()}\n{_row(name='Ok')},extra\n".encode(), "row 1 .*30 fields.* 29"),
    ("too few fields", b"name,source\nOnly a name\n", "row 1 .*1 fields.* 2"),
    ("bad quoting", b'name,source\n"unterminated,S\n', "malformed CSV"),
    ("not utf-8", b"name,source\nSoci\xe9t\xe9,S\n", "not UTF-8"),
    (
        "duplicate _id",
        f"{_header()}\n{_row(_id='x', name='A')}\n{_row(_id='x', name='B')}\n".encode(),
        r"row 2 .*duplicate _id 'x' \(first in row 1",
    ),
    ("broken JSON", b'{"results": [', "not valid JSON"),
    ("JSON without results", b'{"total": 0}', "expected"),
    ("JSON results not a list", b'{"results": {"name": "x"}}', "expected"),
    ("JSON scalar", b'"just a string"', "expected"),
    ("JSON item not an object", b'{"results": [{"name": "A"}, 7]}', r"results\[1\]: expected an object"),
    ("JSON name not a string", b'{"results": [{"name": ["A"]}]}', r"results\[0\]: field 'name' must be a string"),
    ("JSON empty name", b'{"results": [{"name": "  "}]}', r"results\[0\]: the 'name' field is empty"),
    ("JSON empty results", b'{"results": []}', "no entries"),
    ("JSON bad alt_names", b'{"results": [{"name": "A", "alt_names": {"x": 1}}]}', "'alt_names' must be a list"),
    ("JSON bad address", b'{"results": [{"name": "A", "addresses": [3]}]}', "'addresses' must hold"),
    ("overlong name", json.dumps({"results": [{"name": "N" * 1001}]}).encode(), "'name' is over 1000"),
    (
        "overlong field",
        json.dumps({"results": [{"name": "A", "remarks": "r" * (MAX_FIELD_CHARS + 1)}]}).encode(),
        "field 'remarks' is longer than",
    ),
    (
        "too many alt names",
        json.dumps({"results": [{"name": "A", "alt_names": [f"n{i}" for i in range(1001)]}]}).encode(),
        "'alt_names' has more than 1000 values",
    ),
]


@pytest.mark.parametrize(("data", "message"), [(d, m) for _, d, m in BAD_FILES], ids=[n for n, _, _ in BAD_FILES])
def test_bad_files_are_refused_with_a_clear_message(data: bytes, message: str) -> None:
    with pytest.raises(ScreeningFormatError, match=message):
        parse_csl(data)


def test_format_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):  # callers that only know ValueError still catch it
        parse_csl(b"")


def test_entry_count_is_bounded() -> None:
    data = ("name\n" + "\n".join(f"Example Party {i}" for i in range(MAX_ENTRIES + 1))).encode()
    with pytest.raises(ScreeningFormatError, match=f"more than {MAX_ENTRIES} entries"):
        parse_csl(data)


# -------------------------------------------------------------- normalising


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Société Générale d'Armement Fictif", "societe generale d armement fictif"),
        ("ACME Trading Co., Ltd.", "acme trading"),
        ("Quillfeather Trading L.L.C.", "quillfeather trading"),
        ("OOO Vostok-Fiktiv", "vostok fiktiv"),
        ("Øresund Pseudo Optics A/S", "oresund pseudo optics"),
        ("Hans-Jürgen Erfundener", "hans jurgen erfundener"),
        ("Große Straße GmbH", "grosse strasse"),
        ("The Acme & Sons Company", "acme sons"),
        ("Public Joint Stock Company Tidewater", "tidewater"),
        ("Lumen Invented Holdings S.A.", "lumen invented holdings"),
        ("J.P. Fictional", "jp fictional"),
        ("  Many \t spaces\n here ", "many spaces here"),
        ("Восток Фиктив", "восток фиктив"),
        ("FICTIVNIKOV, Dmitri", "fictivnikov dmitri"),
        ("Corp", ""),
        ("Co., Ltd.", ""),
        ("", ""),
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


# ---------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("query", "entry_id", "matched_name"),
    [
        ("Société Générale d'Armement Fictif", "fict-0001", "Société Générale d'Armement Fictif"),
        ("Societe Generale d Armement Fictif", "fict-0001", "Société Générale d'Armement Fictif"),
        ("SOCIETE GENERALE D'ARMEMENT FICTIF S.A.", "fict-0001", "Société Générale d'Armement Fictif"),
        ("Fictivnikov Dmitri Olegovich", "fict-0002", "Dmitri Olegovich Fictivnikov"),
        ("Quillfeather Trading Ltd", "fict-0003", "Quillfeather Trading LLC"),
        ("Quillfeather Trading L.L.C.", "fict-0003", "Quillfeather Trading LLC"),
        ("Hongdeng Precision Machinery Co", "fict-0004", "Hongdeng Precision Machinery"),
        ("Восток Фиктив", "fict-0007", "Восток Фиктив"),
        ("Oresund Pseudo Optics", "fict-0019", "Øresund Pseudo Optics A/S"),
        ("Stella Ficta", "fict-0005", "STELLA FICTA"),
        ("Marquez Jose Antonio Ficticio", "fict-0006", "José Antonio Ficticio Márquez"),
    ],
)
def test_exact_accented_reordered_suffix_and_alt_name_matches_block(
    index: ScreeningIndex, query: str, entry_id: str, matched_name: str
) -> None:
    hit = index.match(query)
    assert hit is not None
    assert (hit.entry_id, hit.matched_name, hit.score, hit.blocked) == (entry_id, matched_name, 1.0, True)
    assert hit.name == index.get(entry_id)["name"]  # type: ignore[index]


def test_reordered_individual_name() -> None:
    index = ScreeningIndex([{"id": "p1", "name": "Ivan Ivanov", "source": "Example list"}])
    hit = index.match("Ivanov Ivan")
    assert hit is not None and hit.blocked and hit.score == 1.0


def test_suffix_variants_of_one_name() -> None:
    index = ScreeningIndex([{"id": "x1", "name": "X Trading LLC", "source": "Example list"}])
    for query in ("X Trading Ltd", "X Trading Limited", "X TRADING CO., LTD.", "x trading"):
        hit = index.match(query)
        assert hit is not None and hit.blocked and hit.entry_id == "x1", query


@pytest.mark.parametrize(
    ("query", "entry_id"),
    [
        ("Quilfeather Trading", "fict-0003"),
        ("Quill Feather Trading", "fict-0003"),
        ("Dmitri Fiktivnikov", "fict-0002"),
        ("Elena Pseudonov", "fict-0025"),
        ("Kestrelmor Dual Use Components", "fict-0014"),
        ("Cobalt Marigold Semiconductors", "fict-0023"),
    ],
)
def test_spelling_variants_block_below_a_perfect_score(index: ScreeningIndex, query: str, entry_id: str) -> None:
    hit = index.match(query)
    assert hit is not None and hit.entry_id == entry_id and hit.blocked
    assert index.block_threshold <= hit.score <= 1.0


@pytest.fixture(scope="module")
def trap_index() -> ScreeningIndex:
    return ScreeningIndex(
        [
            {"id": "corp", "name": "Corp", "source": "Example list"},
            {"id": "coltd", "name": "Co., Ltd.", "alt_names": ["LLC"], "source": "Example list"},
            {"id": "global", "name": "Global Trading Corp", "source": "Example list"},
            {"id": "intl", "name": "International Bank of Examples", "source": "Example list"},
            {"id": "alhoba", "name": "Al Hoba Exchange", "source": "Example list"},
        ]
    )


@pytest.mark.parametrize(
    ("listed", "query"),
    [
        ("Y Trading", "X Trading"),
        ("International Ro", "International Ka"),
        ("Blue Ocean Shipping", "Red Ocean Shipping"),
        ("Polmar Technology", "Technology Polin"),
        ("K Smith", "J Smith"),
    ],
)
def test_names_that_differ_in_a_whole_word_do_not_match(listed: str, query: str) -> None:
    index = ScreeningIndex([{"id": "e1", "name": listed, "source": "Example list"}])
    assert index.match(query) is None
    assert index.match(listed) is not None


@pytest.mark.parametrize(
    "query",
    [
        "Acme Corp",
        "Corp",
        "CORP.",
        "Acme Co., Ltd.",
        "Trading",
        "Global",
        "Trading Corp",
        "International",
        "Bank",
        "Al",
        "Al Bank",
        "Exchange",
    ],
)
def test_a_lone_common_token_does_not_match(trap_index: ScreeningIndex, query: str) -> None:
    assert trap_index.match(query) is None
    # Not even as a weak candidate for the names that are nothing but legal forms.
    assert all(hit.entry_id not in ("corp", "coltd") for hit in trap_index.search(query, min_score=0.0))


def test_common_token_scores_stay_low(trap_index: ScreeningIndex) -> None:
    [hit] = trap_index.search("Trading", min_score=0.5)
    assert hit.entry_id == "global" and hit.score < trap_index.review_threshold


@pytest.mark.parametrize("query", ["", " ", "A", "Ltd.", "é", "&"])
def test_queries_under_two_characters_never_match(index: ScreeningIndex, query: str) -> None:
    assert index.match(query) is None
    assert index.search(query, min_score=0.0) == []


@pytest.mark.parametrize(
    ("query", "entry_id", "matched_name"),
    [
        ("Cobalt Marigold", "fict-0023", "Cobalt Marigold Semi"),  # one word of three missing
        ("Jelena Pseudonova", "fict-0025", "Elena Pseudonova"),  # another transliteration
    ],
)
def test_review_band_is_reported_without_blocking(
    index: ScreeningIndex, query: str, entry_id: str, matched_name: str
) -> None:
    hit = index.match(query)
    assert hit is not None
    assert hit.entry_id == entry_id and hit.matched_name == matched_name
    assert index.review_threshold <= hit.score < index.block_threshold
    assert hit.blocked is False


@pytest.mark.parametrize(
    "query",
    [
        "Microsoft Corporation",
        "Acme Widgets Inc",
        "Jane Doe",
        "Bank of Example",
        "Fictional",
        "Red Lantern Bakery",
        "Ali Hassan",
        "Stella Artois Ltd",
        "Global Trading",
        "Northbrook Electronics",
    ],
)
def test_unrelated_names_do_not_match(index: ScreeningIndex, query: str) -> None:
    assert index.match(query) is None


def test_match_is_cached_per_normalised_name(entries: list[dict[str, Any]]) -> None:
    index = ScreeningIndex(entries, cache_size=2)
    first = index.match("Quillfeather Trading Ltd")
    assert first is not None
    assert index.match("Quillfeather Trading Ltd") is first
    assert index.match("QUILLFEATHER TRADING, L.L.C.") is first  # same normalised name
    index.match("Stella Ficta")
    index.match("Elena Pseudonova")  # evicts the least recently used: the Quillfeather hit
    again = index.match("Quillfeather Trading Ltd")
    assert again == first and again is not first


def test_cache_size_zero_disables_caching(entries: list[dict[str, Any]]) -> None:
    index = ScreeningIndex(entries, cache_size=0)
    first = index.match("Stella Ficta")
    second = index.match("Stella Ficta")
    assert first == second and first is not second


def test_search_orders_by_score_and_honours_limit(index: ScreeningIndex) -> None:
    hits = index.search("Fictional", limit=25, min_score=0.5)
    assert len(hits) >= 4
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    assert len({hit.entry_id for hit in hits}) == len(hits)  # one hit per entry, its best name
    assert all(hit.score >= 0.5 for hit in hits)
    assert index.search("Fictional", limit=3, min_score=0.5) == hits[:3]
    strict = index.search("Fictional", limit=25, min_score=0.7)
    assert strict == [hit for hit in hits if hit.score >= 0.7]

    top = index.search("Global Fictional Trading", limit=2)
    assert top[0].entry_id == "fict-0017" and top[0].score == 1.0 and top[1].score < 1.0


@pytest.mark.parametrize("kwargs", [{"limit": 0}, {"min_score": -0.1}, {"min_score": 1.5}])
def test_search_rejects_bad_arguments(index: ScreeningIndex, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        index.search("Stella Ficta", **kwargs)


def test_thresholds_are_configurable(entries: list[dict[str, Any]]) -> None:
    strict = ScreeningIndex(entries, block_threshold=0.995, review_threshold=0.95)
    hit = strict.match("Quilfeather Trading")
    assert hit is not None and hit.entry_id == "fict-0003"
    assert 0.95 <= hit.score < 0.995 and not hit.blocked

    lenient = ScreeningIndex(entries, block_threshold=0.85, review_threshold=0.75)
    hit = lenient.match("Northbrook Electronics")  # two of three words: 0.80
    assert hit is not None and hit.entry_id == "fict-0011" and not hit.blocked
    assert 0.75 <= hit.score < 0.85
    hit = lenient.match("Cobalt Marigold")
    assert hit is not None and hit.blocked


@pytest.mark.parametrize(
    "kwargs",
    [
        {"review_threshold": 0.95, "block_threshold": 0.9},
        {"review_threshold": 0.0},
        {"block_threshold": 1.2},
        {"cache_size": -1},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ScreeningIndex([], **kwargs)


def test_hit_to_dict(index: ScreeningIndex) -> None:
    hit = index.match("SGAF")
    assert isinstance(hit, ScreeningHit)
    assert hit.to_dict() == {
        "entry_id": "fict-0001",
        "name": "Société Générale d'Armement Fictif",
        "matched_name": "SGAF",
        "source": "Entity List (EL) - Bureau of Industry and Security",
        "score": 1.0,
        "blocked": True,
    }
    assert json.loads(json.dumps(hit.to_dict())) == hit.to_dict()


def test_index_refuses_malformed_entries() -> None:
    with pytest.raises(ScreeningFormatError, match=r"entries\[1\]: 'name'"):
        ScreeningIndex([{"id": "a", "name": "Ok"}, {"id": "b"}])
    with pytest.raises(ScreeningFormatError, match=r"entries\[0\]: 'id'"):
        ScreeningIndex([{"name": "No id"}])
    with pytest.raises(ScreeningFormatError, match=r"entries\[0\]: 'alt_names'"):
        ScreeningIndex([{"id": "a", "name": "Ok", "alt_names": "not a list"}])


def test_empty_index_matches_nothing() -> None:
    index = ScreeningIndex([])
    assert len(index) == 0 and index.match("Anything At All") is None and index.get("x") is None


# ---------------------------------------------------- scale and the prefilter

_SYLLABLES = (
    "ka",
    "ro",
    "mi",
    "tan",
    "vel",
    "or",
    "shi",
    "ba",
    "nek",
    "lu",
    "dra",
    "pol",
    "zen",
    "vi",
    "ash",
    "mar",
    "tek",
    "ul",
    "gor",
    "in",
    "sa",
    "fa",
    "rid",
    "ho",
    "qu",
    "xe",
    "jo",
    "em",
)
_COMMON = ("Trading", "International", "Group", "Industrial", "Al", "Bank", "Shipping", "Technology")
_SUFFIXES = ("LLC", "Ltd", "Co., Ltd.", "GmbH", "Corp", "", "")


def _synthetic_entries(count: int, seed: int) -> tuple[list[dict[str, Any]], Callable[[], str]]:
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()

    def name() -> str:
        parts = [word() for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.5:
            parts.insert(rng.randint(0, len(parts)), rng.choice(_COMMON))
        return f"{' '.join(parts)} {rng.choice(_SUFFIXES)}".strip()

    entries = [
        {
            "id": f"s{i}",
            "name": name(),
            "alt_names": [name() for _ in range(rng.choice((1, 1, 2)))],
            "source": "Synthetic",
        }
        for i in range(count)
    ]
    return entries, name


def _typo(text: str, rng: random.Random) -> str:
    position = rng.randrange(1, len(text))
    return text[:position] + text[position + 1 :]


def test_prefilter_finds_what_a_full_scan_finds() -> None:
    entries, fresh_name = _synthetic_entries(2_000, seed=3)
    index = ScreeningIndex(entries, cache_size=0)
    names = [
        (position, _prepare(position, text, normalize(text)))
        for position, entry in enumerate(entries)
        for text in (entry["name"], *entry["alt_names"])
        if normalize(text)
    ]
    rng = random.Random(4)
    queries = [_typo(rng.choice(entries)["name"], rng) for _ in range(150)]
    queries += [fresh_name() for _ in range(150)]
    checked = 0
    for query in queries:
        prepared = _prepare(-1, normalize(query), normalize(query))
        if prepared.token_chars < 2:
            continue
        best = max(round(_score(prepared, name), 4) for _, name in names)
        hit = index.match(query)
        if best >= index.review_threshold:
            assert hit is not None and hit.score == best, query
            checked += 1
        else:
            assert hit is None, query
    assert checked >= 100


def test_match_time_at_20k_entries(record_property: Callable[[str, object], None]) -> None:
    """Measured, never asserted: one uncached match against ~50k names."""
    entries, fresh_name = _synthetic_entries(20_000, seed=7)
    started = time.perf_counter()
    index = ScreeningIndex(entries, cache_size=0)
    build_s = time.perf_counter() - started
    rng = random.Random(8)
    queries = [fresh_name() for _ in range(200)] + [_typo(rng.choice(entries)["name"], rng) for _ in range(100)]
    timings = []
    for query in queries:
        started = time.perf_counter()
        index.match(query)
        timings.append(time.perf_counter() - started)
    timings.sort()
    mean_ms = 1000 * sum(timings) / len(timings)
    p99_ms = 1000 * timings[int(len(timings) * 0.99) - 1]
    record_property("screening_build_s", round(build_s, 3))
    record_property("screening_match_mean_ms", round(mean_ms, 2))
    record_property("screening_match_p99_ms", round(p99_ms, 2))
    print(
        f"\nscreening at 20k entries: build {build_s:.2f} s, uncached match mean {mean_ms:.2f} ms, p99 {p99_ms:.2f} ms"
    )
    # Correctness at this size: a listed name is still found exactly.
    hit = index.match(entries[12_345]["name"])
    assert hit is not None and hit.score == 1.0
