"""Name screening: read the Consolidated Screening List and score names against it.

Pure code: no I/O beyond the bytes handed in, no aiohttp, no Redis. The policy
snapshot builds one :class:`ScreeningIndex` per policy version; the hot path
calls :meth:`ScreeningIndex.match` with an org's name, and the admin API calls
:func:`parse_csl` on an import and :meth:`ScreeningIndex.search` for lookups.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import heapq
import io
import math
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import orjson
from rapidfuzz import process
from rapidfuzz.distance import Indel, JaroWinkler

__all__ = [
    "CSL_COLUMNS",
    "MAX_ENTRIES",
    "ScreeningFormatError",
    "ScreeningHit",
    "ScreeningIndex",
    "normalize",
    "parse_csl",
]

# The Consolidated Screening List CSV header, in the order trade.gov publishes it.
CSL_COLUMNS: tuple[str, ...] = (
    "_id",
    "source",
    "entity_number",
    "type",
    "programs",
    "name",
    "title",
    "addresses",
    "federal_register_notice",
    "start_date",
    "end_date",
    "standard_order",
    "license_requirement",
    "license_policy",
    "call_sign",
    "vessel_type",
    "gross_tonnage",
    "gross_registered_tonnage",
    "vessel_flag",
    "vessel_owner",
    "remarks",
    "source_list_url",
    "alt_names",
    "citizenships",
    "dates_of_birth",
    "nationalities",
    "places_of_birth",
    "source_information_url",
    "ids",
)

# Bounds that turn a hostile or corrupt upload into an error instead of a memory spike.
MAX_ENTRIES = 200_000
MAX_INPUT_BYTES = 256 * 1024 * 1024
MAX_FIELD_CHARS = 100_000
MAX_NAME_CHARS = 1_000
MAX_VALUES_PER_FIELD = 1_000

_JSON_TYPES = ("application/json", "text/json")
_CSV_TYPES = ("text/csv", "application/csv", "text/comma-separated-values", "application/vnd.ms-excel")


class ScreeningFormatError(ValueError):
    """A screening list that cannot be read; the message names the row or field at fault."""


# --------------------------------------------------------------------------- parsing


def parse_csl(data: bytes, *, content_type: str | None = None) -> list[dict[str, Any]]:
    """Read a Consolidated Screening List export (CSV or JSON) into normalised entries.

    Each entry is ``{"id", "source", "type", "name", "alt_names", "programs",
    "countries", "entity_number", "start_date", "source_list_url", "remarks"}``:
    strings ("" when absent) and lists of strings. The JSON form also accepts
    ``{"entries": [...]}`` of entries in this normalised shape, so a policy
    export reads back unchanged.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ScreeningFormatError("screening list: expected bytes")
    raw = bytes(data)
    if len(raw) > MAX_INPUT_BYTES:
        raise ScreeningFormatError(f"screening list: larger than {MAX_INPUT_BYTES} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ScreeningFormatError(f"screening list: not UTF-8 (byte {exc.start})") from None
    if _is_json(text, content_type):
        records = _json_records(text)
    else:
        records = _csv_records(text)
    entries = _build_entries(records)
    if not entries:
        raise ScreeningFormatError("screening list: no entries")
    return entries


def _is_json(text: str, content_type: str | None) -> bool:
    if content_type:
        media = content_type.split(";", 1)[0].strip().lower()
        if media in _JSON_TYPES or media.endswith("+json"):
            return True
        if media in _CSV_TYPES:
            return False
    # No (or a generic) content type: a CSV header never starts with a bracket.
    return text.lstrip()[:1] in ("{", "[")


def _json_records(text: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ScreeningFormatError(f"screening list: not valid JSON: {exc}") from None
    key = "results"
    if isinstance(document, dict):
        key = "results" if "results" in document else "entries"
        items = document.get(key)
        if not isinstance(items, list):
            raise ScreeningFormatError('screening list: expected {"results": [...]} in the JSON form')
    elif isinstance(document, list):
        items = document
    else:
        raise ScreeningFormatError('screening list: expected {"results": [...]} in the JSON form')
    for position, item in enumerate(items):
        where = f"{key}[{position}]"
        if not isinstance(item, dict):
            raise ScreeningFormatError(f"{where}: expected an object, got {type(item).__name__}")
        yield where, item


def _csv_records(text: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    row_number = 0
    previous_line = 0
    try:
        for cells in reader:
            start_line, previous_line = previous_line + 1, reader.line_num
            if not any(cell.strip() for cell in cells):
                continue  # blank lines carry nothing, wherever they are
            if header is None:
                header = _csv_header(cells, line=start_line)
                continue
            row_number += 1
            where = f"row {row_number} (line {start_line})"
            if len(cells) != len(header):
                raise ScreeningFormatError(f"{where}: {len(cells)} fields, but the header has {len(header)}")
            yield where, {column: cell for column, cell in zip(header, cells, strict=True) if column}
    except csv.Error as exc:
        raise ScreeningFormatError(f"line {reader.line_num}: malformed CSV: {exc}") from None
    if header is None:
        raise ScreeningFormatError("screening list: empty file")


def _csv_header(cells: list[str], *, line: int) -> list[str]:
    columns = [cell.strip().lower() for cell in cells]
    if "name" not in columns:
        raise ScreeningFormatError(
            f"line {line}: the header row has no 'name' column; expected the Consolidated Screening "
            f"List columns ({', '.join(CSL_COLUMNS)})"
        )
    seen: set[str] = set()
    for column in columns:
        if column and column in seen:
            raise ScreeningFormatError(f"line {line}: column {column!r} appears twice in the header")
        seen.add(column)
    # Unknown columns are kept as "" so that a newer export with extra columns still reads.
    return [column if column in CSL_COLUMNS or column in ("id", "countries") else "" for column in columns]


def _build_entries(records: Iterable[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    given_ids: dict[str, str] = {}
    derived_ids: set[str] = set()
    for where, record in records:
        if len(entries) >= MAX_ENTRIES:
            raise ScreeningFormatError(f"{where}: more than {MAX_ENTRIES} entries")
        entry = _build_entry(where, record)
        if entry["id"]:
            if entry["id"] in given_ids:
                raise ScreeningFormatError(
                    f"{where}: duplicate _id {entry['id']!r} (first in {given_ids[entry['id']]})"
                )
            given_ids[entry["id"]] = where
        else:
            entry["id"] = _derived_id(entry["source"], entry["name"], derived_ids)
        entries.append(entry)
    return entries


def _derived_id(source: str, name: str, taken: set[str]) -> str:
    # Stable across re-imports of the same list, so audit records keep pointing at the entry.
    base = "csl-" + hashlib.sha256(f"{source}\n{name}".encode()).hexdigest()[:16]
    candidate, suffix = base, 1
    while candidate in taken:
        suffix += 1
        candidate = f"{base}-{suffix}"
    taken.add(candidate)
    return candidate


def _build_entry(where: str, record: Mapping[str, Any]) -> dict[str, Any]:
    name = _text(record.get("name"), "name", where)
    if not name:
        raise ScreeningFormatError(f"{where}: the 'name' field is empty")
    _check_name(name, "name", where)
    alt_names: list[str] = []
    for alt in _multi(record.get("alt_names"), "alt_names", where):
        _check_name(alt, "alt_names", where)
        if alt != name and alt not in alt_names:
            alt_names.append(alt)
    countries: list[str] = []
    for code in (
        *_address_countries(record.get("addresses"), where),
        *_multi(record.get("nationalities"), "nationalities", where),
        *_multi(record.get("citizenships"), "citizenships", where),
        *_multi(record.get("countries"), "countries", where),
    ):
        country = _country_code(code)
        if country and country not in countries:
            countries.append(country)
    return {
        "id": _text(record.get("_id", record.get("id")), "_id", where),
        "source": _text(record.get("source"), "source", where),
        "type": _text(record.get("type"), "type", where),
        "name": name,
        "alt_names": alt_names,
        "programs": _multi(record.get("programs"), "programs", where),
        "countries": countries,
        "entity_number": _text(record.get("entity_number"), "entity_number", where),
        "start_date": _text(record.get("start_date"), "start_date", where),
        "source_list_url": _text(record.get("source_list_url"), "source_list_url", where),
        "remarks": _text(record.get("remarks"), "remarks", where),
    }


def _text(value: Any, field: str, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ScreeningFormatError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    text = str(value).strip()
    if len(text) > MAX_FIELD_CHARS:
        raise ScreeningFormatError(f"{where}: field {field!r} is longer than {MAX_FIELD_CHARS} characters")
    return text


def _check_name(name: str, field: str, where: str) -> None:
    if len(name) > MAX_NAME_CHARS:
        raise ScreeningFormatError(f"{where}: a value of {field!r} is over {MAX_NAME_CHARS} characters")


def _multi(value: Any, field: str, where: str) -> list[str]:
    """A multi-valued field: a JSON list of strings, or one string split on ``;`` (the CSV form)."""
    if value is None:
        return []
    if isinstance(value, str):
        parts = [part.strip() for part in _text(value, field, where).split(";")]
    elif isinstance(value, list):
        parts = [_text(item, field, where) for item in value]
    else:
        raise ScreeningFormatError(f"{where}: field {field!r} must be a list or a string")
    values = [part for part in parts if part]
    if len(values) > MAX_VALUES_PER_FIELD:
        raise ScreeningFormatError(f"{where}: field {field!r} has more than {MAX_VALUES_PER_FIELD} values")
    return values


def _address_countries(value: Any, where: str) -> list[str]:
    # JSON: a list of {address, city, state, postal_code, country}; CSV: addresses
    # split on ";", each "street, city, ..., country" with the country last.
    if value is None:
        return []
    items: list[Any] = value if isinstance(value, list) else [value]
    if len(items) > MAX_VALUES_PER_FIELD:
        raise ScreeningFormatError(f"{where}: field 'addresses' has more than {MAX_VALUES_PER_FIELD} values")
    countries: list[str] = []
    for item in items:
        if isinstance(item, dict):
            country = _text(item.get("country"), "addresses.country", where)
            if country:
                countries.append(country)
        elif isinstance(item, str):
            for address in _multi(item, "addresses", where):
                countries.append(address.rsplit(",", 1)[-1].strip())
        else:
            raise ScreeningFormatError(f"{where}: field 'addresses' must hold objects or strings")
    return countries


@lru_cache(maxsize=4096)
def _country_code(value: str) -> str | None:
    """ISO 3166-1 alpha-2 for a code or a country name; None for anything else (a city, a typo)."""
    text = value.strip()
    if re.fullmatch(r"[A-Za-z]{2}", text):
        return text.upper()
    if len(text) < 3 or len(text) > 80:
        return None
    import pycountry  # only names need it, and exports mostly carry codes

    try:
        return str(pycountry.countries.lookup(text).alpha_2)
    except LookupError:
        return None


# ----------------------------------------------------------------------- normalising

# Legal-form tokens (after dots are dropped: "L.L.C." -> "llc", "S.p.A." -> "spa").
# They say nothing about who a party is, and left in they make unrelated
# companies look alike ("Acme Corp" vs "Zenith Corp").
LEGAL_SUFFIXES: frozenset[str] = frozenset(
    {
        "llc",
        "inc",
        "incorporated",
        "ltd",
        "ltda",
        "limited",
        "gmbh",
        "mbh",
        "co",
        "corp",
        "corporation",
        "company",
        "plc",
        "sa",
        "sae",
        "sal",
        "sas",
        "ag",
        "kg",
        "kgaa",
        "ohg",
        "bv",
        "nv",
        "oao",
        "ooo",
        "zao",
        "pao",
        "ao",
        "tov",
        "pjsc",
        "jsc",
        "ojsc",
        "cjsc",
        "sarl",
        "srl",
        "spa",
        "pte",
        "pty",
        "pvt",
        "kk",
        "lp",
        "llp",
        "bhd",
        "sdn",
        "fze",
        "fzc",
        "fzco",
        "fzllc",
        "sro",
        "kft",
        "zrt",
    }
)
# Multi-word legal forms, dropped as a whole so that their words alone ("joint",
# "stock") stay meaningful elsewhere in a name.
_LEGAL_PHRASES: tuple[tuple[str, ...], ...] = (
    ("public", "joint", "stock", "company"),
    ("open", "joint", "stock", "company"),
    ("closed", "joint", "stock", "company"),
    ("joint", "stock", "company"),
    ("limited", "liability", "company"),
    ("limited", "liability", "partnership"),
    ("public", "limited", "company"),
    ("sp", "z", "o", "o"),
    ("a", "s"),  # A/S, Danish and Norwegian
    ("s", "a"),  # "S. A." written with a space
)
_NOISE_WORDS = frozenset({"the", "and"})  # "&" becomes a space, so "and" must vanish too

# Letters NFD does not decompose into a base letter plus a mark.
_LETTER_FOLD = str.maketrans(
    {"ø": "o", "đ": "d", "ð": "d", "ł": "l", "ħ": "h", "\u0131": "i", "þ": "th", "æ": "ae", "œ": "oe"}
)
_ASCII_PUNCT = str.maketrans({chr(c): " " for c in range(128) if not chr(c).isalnum()} | {".": None, ",": None})


def normalize(name: str) -> str:
    """A name as screeners compare it: lower case, no accents or punctuation, no legal forms.

    ``"Société Générale d'Armement, S.A."`` -> ``"societe generale d armement"``.
    """
    text = unicodedata.normalize("NFD", name.casefold().translate(_LETTER_FOLD))
    if text.isascii():
        text = text.translate(_ASCII_PUNCT)
    else:
        text = "".join(_fold_char(char) for char in text)
    return " ".join(_drop_legal_forms(text.split()))


def _fold_char(char: str) -> str:
    if char in ".,":
        return ""
    if char.isalnum():
        return char
    if unicodedata.category(char) == "Mn":
        return ""  # the accent NFD split off its letter
    return " "


def _drop_legal_forms(tokens: list[str]) -> list[str]:
    kept: list[str] = []
    i = 0
    while i < len(tokens):
        for phrase in _LEGAL_PHRASES:
            if tuple(tokens[i : i + len(phrase)]) == phrase:
                i += len(phrase)
                break
        else:
            token = tokens[i]
            if token not in LEGAL_SUFFIXES and token not in _NOISE_WORDS:
                kept.append(token)
            i += 1
    return kept


# ------------------------------------------------------------------------- scoring

_MIN_QUERY_CHARS = 2
# Names this short (spaces removed) carry too little signal for fuzzy scores:
# Jaro-Winkler rates "abc" vs "abd" at 0.86. Only an exact match counts in full.
_SHORT_NAME_CHARS = 4
_SHORT_NAME_FACTOR = 0.8
# Jaro-Winkler is lenient about tokens of different length ("trad" vs "trading")
# and only mildly strict about a different first letter ("petrov" vs "vetrov").
_TOKEN_LENGTH_RATIO = 0.8
_FIRST_LETTER_FACTOR = 0.9
# A token weighs its length, within bounds: one long shared word cannot
# outweigh the rest of a name ("International Ka" vs "International Ro"), and
# a one-letter word still counts when it is what tells two names apart
# ("X Trading" vs "Y Trading").
_TOKEN_WEIGHT_FLOOR = 3
_TOKEN_WEIGHT_CAP = 8
# Prefilter sizes: generous enough that the exact scorer sees every plausible name.
_WHOLE_CANDIDATES = 50
_TOKEN_CANDIDATES = 64
_VOCAB_PER_TOKEN = 100
_VOCAB_CUTOFF = 0.7


@dataclass(frozen=True, slots=True)
class _Name:
    entry: int
    text: str
    flat: str  # normalised, spaces removed: compares names whatever their word breaks
    tokens: tuple[str, ...]
    sorted_tokens: tuple[str, ...]
    token_chars: int
    weight: int  # the sum of its tokens' weights


def _weight(token: str) -> int:
    return max(_TOKEN_WEIGHT_FLOOR, min(len(token), _TOKEN_WEIGHT_CAP))


def _prepare(entry: int, text: str, normalised: str) -> _Name:
    tokens = tuple(normalised.split())
    flat = "".join(tokens)
    return _Name(entry, text, flat, tokens, tuple(sorted(tokens)), len(flat), sum(map(_weight, tokens)))


def _token_similarity(a: str, b: str) -> float:
    if a == b:
        return 1.0
    if min(len(a), len(b)) <= 2:
        return 0.0  # "al" inside "kalu" is a coincidence, not a spelling variant
    similarity = JaroWinkler.normalized_similarity(a, b)
    ratio = min(len(a), len(b)) / max(len(a), len(b))
    if ratio < _TOKEN_LENGTH_RATIO:
        similarity *= math.sqrt(ratio / _TOKEN_LENGTH_RATIO)
    if a[0] != b[0]:
        similarity *= _FIRST_LETTER_FACTOR
    # Squared, so that a spelling variant (0.95 -> 0.90) keeps nearly full
    # credit while a different word with a shared start ("polin" vs "polmar",
    # 0.79 -> 0.62) no longer rides on an exactly shared common word.
    return similarity * similarity


def _token_score(query: tuple[str, ...], name: tuple[str, ...], total_weight: int) -> float:
    """Order-insensitive: each token pairs with at most one on the other side, best pairs first.

    Pairs count by their tokens' weights, and unpaired tokens on either side
    count as zero, so a lone shared word ("trading" in "Global Trading")
    cannot carry a longer name.
    """
    pairs = sorted(
        ((_token_similarity(q, n), i, j) for i, q in enumerate(query) for j, n in enumerate(name)),
        reverse=True,
    )
    used_query: set[int] = set()
    used_name: set[int] = set()
    weighted = 0.0
    for similarity, i, j in pairs:
        if i in used_query or j in used_name:
            continue
        used_query.add(i)
        used_name.add(j)
        weighted += similarity * (_weight(query[i]) + _weight(name[j]))
        if len(used_query) == len(query) or len(used_name) == len(name):
            break
    return weighted / total_weight


def _whole_score(query: str, name: str) -> float:
    # Jaro matches characters anywhere within half the length, and the Winkler
    # bonus rewards a shared start: on long names one shared first word
    # ("internationaltradinggroup" vs "internationalgorinroridqu") scores 0.9,
    # and so does a mere prefix ("global" vs "globaltrading"). Scaling by the
    # in-order character overlap (Indel) and the length ratio keeps typos and
    # word-break variants ("hans jurgen" vs "hansjurgen") high and those low.
    similarity = JaroWinkler.normalized_similarity(query, name)
    ratio = min(len(query), len(name)) / max(len(query), len(name))
    return similarity * math.sqrt(Indel.normalized_similarity(query, name) * ratio)


def _score(query: _Name, name: _Name) -> float:
    if query.flat == name.flat or query.sorted_tokens == name.sorted_tokens:
        return 1.0
    score = _token_score(query.tokens, name.tokens, query.weight + name.weight)
    # The whole-name score is for names broken into words differently ("quill
    # fether" vs "quillfeather"). With as many words on both sides, the
    # per-word score already sees every difference and knows which word it is
    # in; the whole name would blur a wholly different word into a typo.
    if len(query.tokens) != len(name.tokens):
        score = max(score, _whole_score(query.flat, name.flat))
    if min(query.token_chars, name.token_chars) < _SHORT_NAME_CHARS:
        score *= _SHORT_NAME_FACTOR
    return min(score, 1.0)


@dataclass(frozen=True, slots=True)
class ScreeningHit:
    """One entry a name screened against: what matched and how closely."""

    entry_id: str
    name: str  # the entry's primary name
    matched_name: str  # the name or alt name, as listed, that scored best
    source: str
    score: float  # 0..1, rounded to 4 places
    blocked: bool  # score >= the block threshold; below it, the review band

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ScreeningIndex:
    """Normalised names of a screening list, prepared for fast fuzzy lookups.

    Immutable once built: a new list means a new index (and an empty cache).
    The cache is not locked: use an index from one thread (the event loop).
    """

    def __init__(
        self,
        entries: Sequence[Mapping[str, Any]],
        *,
        block_threshold: float = 0.92,
        review_threshold: float = 0.85,
        cache_size: int = 10_000,
    ) -> None:
        if not 0 < review_threshold <= block_threshold <= 1:
            raise ValueError("thresholds must satisfy 0 < review_threshold <= block_threshold <= 1")
        if cache_size < 0:
            raise ValueError("cache_size must not be negative")
        self.block_threshold = block_threshold
        self.review_threshold = review_threshold
        self._cache_size = cache_size
        self._cache: OrderedDict[str, ScreeningHit | None] = OrderedDict()
        self._entries: list[Mapping[str, Any]] = list(entries)
        self._by_id: dict[str, int] = {}
        self._names: list[_Name] = []
        self._postings: dict[str, list[int]] = {}
        self._build()
        # Blocking keys that keep one lookup far below a scan of every name:
        # whole names by first letter, sorted by length; tokens by first letter.
        names = self._names
        order = sorted(range(len(names)), key=lambda i: (names[i].flat[0], len(names[i].flat)))
        self._flat_buckets: dict[str, tuple[list[int], list[str], list[int]]] = {}
        for index in order:
            flat = self._names[index].flat
            lengths, flats, indices = self._flat_buckets.setdefault(flat[0], ([], [], []))
            lengths.append(len(flat))
            flats.append(flat)
            indices.append(index)
        self._vocabulary: dict[str, list[str]] = {}
        for token in self._postings:
            self._vocabulary.setdefault(token[0], []).append(token)

    def _build(self) -> None:
        for position, entry in enumerate(self._entries):
            entry_id, primary = entry.get("id"), entry.get("name")
            if not isinstance(entry_id, str) or not entry_id:
                raise ScreeningFormatError(f"entries[{position}]: 'id' must be a non-empty string")
            if not isinstance(primary, str) or not primary:
                raise ScreeningFormatError(f"entries[{position}]: 'name' must be a non-empty string")
            alt_names = entry.get("alt_names") or []
            if not isinstance(alt_names, list | tuple) or not all(isinstance(a, str) for a in alt_names):
                raise ScreeningFormatError(f"entries[{position}]: 'alt_names' must be a list of strings")
            self._by_id.setdefault(entry_id, position)
            seen: set[str] = set()
            for text in (primary, *alt_names):
                normalised = normalize(text)
                # An empty normalised name ("Corp", "Co., Ltd.") would match anything or nothing.
                if not normalised or normalised in seen:
                    continue
                seen.add(normalised)
                name = _prepare(position, text, normalised)
                index = len(self._names)
                self._names.append(name)
                for token in set(name.tokens):
                    self._postings.setdefault(token, []).append(index)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, entry_id: str) -> Mapping[str, Any] | None:
        """The entry with this id, for showing what a hit refers to."""
        position = self._by_id.get(entry_id)
        return None if position is None else self._entries[position]

    def match(self, name: str) -> ScreeningHit | None:
        """The best hit at or above the review threshold, or None; cached per normalised name."""
        key = normalize(name)
        if key in self._cache:  # misses are cached too: most names screen clean
            self._cache.move_to_end(key)
            return self._cache[key]
        hits = self._hits(key, min_score=self.review_threshold, limit=1)
        hit = hits[0] if hits else None
        if self._cache_size:
            self._cache[key] = hit
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return hit

    def lookup(self, name: str) -> ScreeningHit | None:
        """What :meth:`match` answers, without its cache: safe from any thread (an impact preview's)."""
        hits = self._hits(normalize(name), min_score=self.review_threshold, limit=1)
        return hits[0] if hits else None

    def search(self, name: str, *, limit: int = 10, min_score: float = 0.5) -> list[ScreeningHit]:
        """Up to ``limit`` entries scoring at least ``min_score``, best first (one hit per entry)."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if not 0 <= min_score <= 1:
            raise ValueError("min_score must be between 0 and 1")
        return self._hits(normalize(name), min_score=min_score, limit=limit)

    def _hits(self, normalised: str, *, min_score: float, limit: int) -> list[ScreeningHit]:
        query = _prepare(-1, normalised, normalised)
        if query.token_chars < _MIN_QUERY_CHARS or not self._names:
            return []
        best: dict[int, tuple[float, int]] = {}  # entry -> (score, name index)
        for index in self._candidates(query, min_score=min_score, limit=limit):
            name = self._names[index]
            score = round(_score(query, name), 4)
            if score < min_score:
                continue
            current = best.get(name.entry)
            if current is None or score > current[0]:
                best[name.entry] = (score, index)
        ranked = sorted(best.items(), key=lambda item: (-item[1][0], item[0]))[:limit]
        return [self._hit(entry, score, index) for entry, (score, index) in ranked]

    def _candidates(self, query: _Name, *, min_score: float, limit: int) -> set[int]:
        """Names worth scoring exactly: similar as a whole, or sharing similar tokens."""
        width = max(limit * 4, _WHOLE_CANDIDATES)
        candidates = self._whole_candidates(query.flat, min_score=min_score, width=width)
        overlap: dict[int, float] = {}
        for token in set(query.tokens):
            for similar, similarity in self._similar_tokens(token):
                weight = similarity * (_weight(token) + _weight(similar))
                for index in self._postings[similar]:
                    overlap[index] = overlap.get(index, 0.0) + weight
        # Rank by an optimistic token score, so common words ("trading") reach
        # only the names they could make up most of.
        names = self._names
        estimates = ((weight / (query.weight + names[index].weight), index) for index, weight in overlap.items())
        for estimate, index in heapq.nlargest(max(limit * 4, _TOKEN_CANDIDATES), estimates):
            if estimate >= min_score * 0.5:
                candidates.add(index)
        return candidates

    def _whole_candidates(self, flat: str, *, min_score: float, width: int) -> set[int]:
        bucket = self._flat_buckets.get(flat[0])
        if bucket is None:
            return set()
        lengths, flats, indices = bucket
        # The whole-name score is at most Jaro-Winkler and at most sqrt(length
        # ratio), so names outside this length window or below this cutoff can
        # only reach min_score through their tokens, which the token path finds.
        if min_score > 0:
            low = bisect.bisect_left(lengths, math.floor(len(flat) * min_score**2))
            high = bisect.bisect_right(lengths, math.ceil(len(flat) / min_score**2))
        else:
            low, high = 0, len(lengths)
        found = process.extract(
            flat,
            flats[low:high],
            scorer=JaroWinkler.normalized_similarity,
            score_cutoff=min_score,
            limit=width,
        )
        return {indices[low + position] for _, _, position in found}

    def _similar_tokens(self, token: str) -> list[tuple[str, float]]:
        if len(token) <= 2:
            # Two letters leave Jaro-Winkler nothing to work with: exact only.
            return [(token, 1.0)] if token in self._postings else []
        bucket = self._vocabulary.get(token[0], [])
        found = process.extract(
            token,
            bucket,
            scorer=JaroWinkler.normalized_similarity,
            score_cutoff=_VOCAB_CUTOFF,
            limit=_VOCAB_PER_TOKEN,
        )
        return [(similar, similarity) for similar, similarity, _ in found]

    def _hit(self, entry: int, score: float, index: int) -> ScreeningHit:
        record = self._entries[entry]
        return ScreeningHit(
            entry_id=str(record["id"]),
            name=str(record["name"]),
            matched_name=self._names[index].text,
            source=str(record.get("source") or ""),
            score=score,
            blocked=score >= self.block_threshold,
        )


def rescreen(
    index: ScreeningIndex | None,
    api_keys: Mapping[str, Mapping[str, Any]],
    partners: Mapping[str, Any],
    previous: Mapping[str, Any],
    version: int,
    now_iso: str,
) -> dict[str, Any]:
    """Every API key's (``org_name`` and ``org``) and partner's name screened against ``index``: the
    document ``GET /admin/v1/screening/hits`` answers. A hit is ``new`` when ``previous`` (the last such
    document) did not hold it for the same key or partner and listed entry; ``first_found`` says when
    it was first seen. Review-band hits are listed too, with ``blocked`` false."""
    seen = {
        (hit.get("kind"), hit.get("id"), (hit.get("match") or {}).get("entry_id")): hit
        for hit in previous.get("hits") or ()
    }
    hits: list[dict[str, Any]] = []

    def screen(kind: str, ident: str, names: Sequence[tuple[str, str | None]], **about: Any) -> None:
        if index is None:
            return
        best: tuple[ScreeningHit, str] | None = None
        for field_name, name in names:
            hit = index.match(name) if name else None
            if hit is not None and (best is None or (hit.blocked, hit.score) > (best[0].blocked, best[0].score)):
                best = (hit, field_name)
        if best is None:
            return
        hit, field_name = best
        earlier = seen.get((kind, ident, hit.entry_id))
        hits.append(
            {
                "kind": kind,
                "id": ident,
                **about,
                "screened": field_name,
                "blocked": hit.blocked,
                "match": hit.to_dict(),
                "new": earlier is None,
                "first_found": earlier.get("first_found", now_iso) if earlier is not None else now_iso,
            }
        )

    for key_id, record in sorted(api_keys.items()):
        org, org_name = record.get("org"), record.get("org_name")
        names = [("org_name", org_name), ("org", org if org != org_name else None)]
        screen("api_key", key_id, names, subject=record.get("subject"), org=org, org_name=org_name)
    for org in sorted(partners):
        screen("partner", org, [("org", org)], org=org)
    return {"version": version, "screened_at": now_iso, "hits": hits}
