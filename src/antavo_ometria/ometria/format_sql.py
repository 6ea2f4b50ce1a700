"""Each Ometria format as DuckDB SQL over a JSON value: the columnar engine's converters (sync/contacts/columnar.py).

A format's SQL says, for one loyalty value `v` (DuckDB JSON; `t` its json_type, `s` its text), what the pandas
converter in formats.py makes of it (`text`: the converted value as text; `json`: its JSON encoding, as the
encoder writes it; `kind`: the Python type name the quality gate checks) and when that is exact (`ok`). A value
the SQL does not carry exactly (another kind than declared, a blank at an edge, an escape, a fraction) is not
guessed at: its customer takes the pandas path, which converts it, or quarantines it with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from antavo_ometria.ometria.contract import MAX_EXACT_NUMBER, iso_countries

# code points Python's str.strip() takes off (its whitespace), as a condition on `c`
BLANK = "({c} <= 32 OR {c} IN (133, 160, 5760, 8232, 8233, 8239, 8287, 12288) OR {c} BETWEEN 8192 AND 8202)"
ASCII_EMAIL = r"[^@\s\p{Z}\x{85}]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}"
# only real times take this path: hour 00–23, minutes and seconds 00–59, offsets up to ±14:00 (anything else, which
# DuckDB's cast would roll over into another day, takes the pandas path and its checks)
MOMENT = (r"(1[7-9]|2[01])[0-9]{2}-[0-9]{2}-[0-9]{2}"
          r"(T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-](0[0-9]|1[0-4]):[0-5][0-9]))?")
GENDERS_SQL = {"male": "m", "m": "m", "female": "f", "f": "f"}


@dataclass(frozen=True)
class Sql:
    """SQL expressions for one mapped value (each NULL where the value is empty)."""

    text: str  # the converted value as text
    ok: str  # true when the SQL carries the value exactly
    kind: str | None = None  # the Python type name (typed formats)
    quoted: bool = True  # JSON writes it as a string (else as it is: numbers, booleans, lists)


@dataclass(frozen=True)
class Value:
    """The names of one loyalty value in the query: its JSON text, its kind and its text."""

    v: str  # the value's JSON
    t: str  # its kind: VARCHAR, NUMBER, BOOLEAN, OBJECT, ARRAY or NULL
    s: str  # its text (a string's characters; else its JSON)
    language: str


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def quoted(text: str) -> str:
    """A JSON string of text the encoder writes as it is."""
    return f"('\"' || replace({text}, '/', '\\/') || '\"')"


def plain_text(text: str) -> str:
    """Text the encoder writes as it is (with '/' escaped), given that its JSON had no escape (so no control
    character, quote or backslash): no DEL, no line separator, no blank at either end (Python's strip)."""
    ends = [BLANK.format(c=f"ord(left({text}, 1))"), BLANK.format(c=f"ord(right({text}, 1))")]
    return (f"(NOT contains({text}, chr(127)) AND NOT contains({text}, chr(8232)) AND NOT contains({text}, chr(8233)) "
            f"AND NOT {ends[0]} AND NOT {ends[1]})")


def _translated(x: Value) -> tuple[str, str]:
    """(the text of a text value or of a name given per language, whether it is one of those)."""
    lang = f"json_extract_string({x.v}, {literal('$.' + _key(x.language))})"
    names = (f"({x.t} = 'OBJECT' AND regexp_full_match({x.v}, '\\{{(\"[^\"\\\\]*\":\"[^\"\\\\]*\",?)+\\}}') "
             f"AND coalesce({lang}, '') <> '')")  # every name is text (the JSON has no escape, checked below)
    return f"(CASE WHEN {x.t} = 'OBJECT' THEN {lang} ELSE {x.s} END)", f"({x.t} = 'VARCHAR' OR {names})"


def _key(name: str) -> str:
    return '"' + name.replace('"', '\\"') + '"'


def string(x: Value) -> Sql:
    text, is_text = _translated(x)
    return Sql(text, f"({is_text} AND NOT contains({x.v}, '\\') AND {plain_text(text)})")


def email(x: Value) -> Sql:
    plain = string(x)
    return Sql(plain.text, f"({plain.ok} AND regexp_full_match({plain.text}, {literal(ASCII_EMAIL)}))")


def gender(x: Value) -> Sql:
    from antavo_ometria.ometria.formats import UNKNOWN_GENDERS

    word = f"lower({x.s})"
    cases = " ".join(f"WHEN {literal(k)} THEN {literal(v)}" for k, v in GENDERS_SQL.items())
    text = f"(CASE {word} {cases} END)"
    known = ", ".join(literal(w) for w in [*GENDERS_SQL, *sorted(UNKNOWN_GENDERS)])
    return Sql(text, f"({x.t} = 'VARCHAR' AND regexp_full_match({x.s}, '[A-Za-z_/]+') "
                                   f"AND {word} IN ({known}))")


def country(x: Value) -> Sql:
    codes = "|".join(sorted(iso_countries()))
    text = f"upper({x.s})"
    return Sql(text, f"({x.t} = 'VARCHAR' AND regexp_full_match({x.s}, '[A-Za-z]{{2}}') AND regexp_full_match({text}, '{codes}'))")


def phone(x: Value) -> Sql:
    text = f"regexp_replace(regexp_replace({x.s}, '[ ().-]', '', 'g'), '^00', '+')"
    return Sql(text, f"({x.t} = 'VARCHAR' AND regexp_full_match({x.s}, '[0-9+ ().-]+') "
                                   f"AND regexp_full_match({text}, '\\+[1-9][0-9]{{6,14}}'))")


def _moment(x: Value, pattern: str) -> Sql:
    stamp = f"TRY_CAST({x.s} AS TIMESTAMPTZ)::TIMESTAMP"  # in UTC: the connection's TimeZone (columnar.py)
    text = f"strftime(date_trunc('second', {stamp}), {literal(pattern)})"
    return Sql(text, f"({x.t} = 'VARCHAR' AND regexp_full_match({x.s}, {literal(MOMENT)}) "
                                   f"AND {stamp} IS NOT NULL)")


def date(x: Value) -> Sql:
    return _moment(x, "%Y-%m-%d")


def datetime(x: Value) -> Sql:
    return _moment(x, "%Y-%m-%dT%H:%M:%S+00:00")


def number(x: Value) -> Sql:
    """Whole numbers a JSON number carries exactly, written as integers (fractions take the pandas path)."""
    n = f"TRY_CAST({x.s} AS DOUBLE)"
    text = f"CAST(TRY_CAST({n} AS BIGINT) AS VARCHAR)"
    return Sql(text, f"({x.t} = 'NUMBER' AND isfinite({n}) "
                           f"AND abs({n}) <= {MAX_EXACT_NUMBER} AND {n} = floor({n}))", "'int'", False)


def boolean(x: Value) -> Sql:
    return Sql(x.s, f"({x.t} = 'BOOLEAN')", "'bool'", False)


def text_list(x: Value) -> Sql:
    """A list of text (nulls left out; an empty list is empty); an item with an escape takes the pandas path."""
    items = f"list_filter(from_json({x.v}, '[\"VARCHAR\"]'), lambda i: i IS NOT NULL)"
    joined = f"('[\"' || array_to_string(list_transform({items}, lambda i: replace(i, '/', '\\/')), '\",\"') || '\"]')"
    text = f"(CASE WHEN len({items}) > 0 THEN {joined} END)"
    return Sql(text, f"({x.t} = 'ARRAY' AND json_structure({x.v})::VARCHAR IN ('[\"VARCHAR\"]', '[\"NULL\"]') "
                           f"AND NOT contains({x.s}, '\\'))", "'list'", False)


def never(x: Value) -> Sql:
    """A format the SQL does not convert: every present value takes the pandas path."""
    return Sql("NULL::VARCHAR", "false")


SqlFormat = Callable[[Value], Sql]
