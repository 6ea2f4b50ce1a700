"""Antavo customers → a payload frame, one column per remote field, by pandas column operations.

Values are normalised to Ometria's formats (gender m/f, dates YYYY-MM-DD, timestamps ISO 8601 with
offset, translated names in the configured language, E.164 phones, ISO 3166-1 countries, typed
numbers and booleans). A value that cannot be converted is left as it was; the quality gate
(`quality.py`) then holds its record back with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from antavo_ometria.mapping import ContactMapping

EMAIL = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
PHONE_E164 = r"^\+[1-9]\d{6,14}$"
GENDERS = {"male": "m", "female": "f", "m": "m", "f": "f"}
UNKNOWN_GENDERS = {"other", "unknown", "not_specified", "prefer_not_to_say", "x", "u", "n/a", "none"}
OPTIN = {"EXPLICITLY_OPTEDIN", "EXPLICITLY_OPTEDOUT", "NOT_SPECIFIED"}
TRUE_WORDS = {"true", "yes", "1"}
FALSE_WORDS = {"false", "no", "0"}


@cache
def iso_countries() -> frozenset[str]:
    text = resources.files("antavo_ometria").joinpath("data", "iso3166_alpha2.txt").read_text()
    return frozenset(line for line in text.split() if len(line) == 2)


# -- reading customers into columns ------------------------------------------------------------
def customer_columns(customers: Iterable[dict], paths: list[str]) -> pd.DataFrame:
    """One column per dot path (plus `id`), walked once per customer."""
    wanted = ["id"] + [p for p in paths if p != "id"]
    split = [p.split(".") for p in wanted]
    rows = []
    for customer in customers:
        row = []
        for parts in split:
            value = customer
            for part in parts:
                value = value.get(part) if isinstance(value, dict) else None
            row.append(value)
        rows.append(row)
    return pd.DataFrame(rows, columns=wanted, dtype=object)


def read_customers(path: Path, paths: list[str]) -> pd.DataFrame:
    """The staged customers (NDJSON, one customer a line) as columns."""
    with path.open("rb") as handle:
        return customer_columns((json.loads(line) for line in handle if line.strip()), paths)


# -- converters: Series in, (values with None for empty, mask of unconvertible values) out -----
Converted = tuple[pd.Series, pd.Series]


def _empty(s: pd.Series) -> pd.Series:
    text = s.map(lambda v: isinstance(v, str) and not v.strip()) if s.dtype == object else False
    return s.isna() | text


def _text(s: pd.Series, language: str) -> pd.Series:
    """Strings, with translation objects such as {"en": "Gold"} resolved to one language."""
    s = s.astype(object)
    is_dict = s.map(lambda v: isinstance(v, dict))
    if is_dict.any():
        s = s.copy()
        s[is_dict] = s[is_dict].map(lambda d: d.get(language) or next(iter(d.values()), None))
    return _objects(s.where(~_empty(s), None).map(lambda v: v if v is None or isinstance(v, str) else str(v)))


def _objects(values: pd.Series) -> pd.Series:
    """Plain Python values with None for missing (pandas 3 string columns use NaN)."""
    return values.astype(object).where(values.notna(), None)


def _result(values: pd.Series, bad: pd.Series) -> Converted:
    return _objects(values.where(~bad)), bad


def to_string(s: pd.Series, language: str) -> Converted:
    text = _text(s, language)
    bad = text.map(lambda v: isinstance(v, str) and any(ord(c) < 32 and c not in "\t\n\r" for c in v))
    return _result(text.str.strip() if text.notna().any() else text, bad)


def to_email(s: pd.Series, language: str) -> Converted:
    text = _text(s, language).str.strip()
    return _result(text, text.notna() & ~text.fillna("").str.match(EMAIL))


def to_gender(s: pd.Series, language: str) -> Converted:
    text = _text(s, language).str.strip().str.lower()
    unknown = text.isin(UNKNOWN_GENDERS)
    mapped = text.map(GENDERS)
    return _result(mapped.where(~unknown, None), text.notna() & ~unknown & mapped.isna())


def to_country(s: pd.Series, language: str) -> Converted:
    text = _text(s, language).str.strip().str.upper()
    return _result(text, text.notna() & ~text.isin(iso_countries()))


def to_phone(s: pd.Series, language: str) -> Converted:
    text = _text(s, language).str.replace(r"[\s\-().]", "", regex=True).str.replace(r"^00", "+", regex=True)
    return _result(text, text.notna() & ~text.fillna("").str.match(PHONE_E164))


def _timestamps(s: pd.Series, language: str) -> tuple[pd.Series, pd.Series]:
    """(UTC timestamps, present-but-unparseable mask) from ISO strings or unix seconds."""
    present = ~_empty(s)
    is_number = s.map(lambda v: isinstance(v, (int, float, np.number)) and not isinstance(v, bool))
    stamps = pd.Series(pd.NaT, index=s.index, dtype="datetime64[us, UTC]")
    if is_number.any():
        seconds = pd.to_numeric(s[is_number], errors="coerce")
        stamps[is_number] = pd.to_datetime(seconds, unit="s", utc=True, errors="coerce")
    text = _text(s[present & ~is_number], language)
    if len(text):
        parsed = pd.to_datetime(text.str.strip(), format="ISO8601", utc=True, errors="coerce")
        stamps[text.index] = parsed
    return stamps, present & stamps.isna()


def to_date(s: pd.Series, language: str) -> Converted:
    stamps, bad = _timestamps(s, language)
    return _result(stamps.dt.strftime("%Y-%m-%d"), bad)


def to_datetime(s: pd.Series, language: str) -> Converted:
    stamps, bad = _timestamps(s, language)
    return _result(stamps.dt.strftime("%Y-%m-%dT%H:%M:%S+00:00"), bad)


def _numbers(s: pd.Series) -> tuple[pd.Series, pd.Series]:
    present = ~_empty(s)
    is_bool = s.map(lambda v: isinstance(v, (bool, np.bool_)))
    numbers = pd.to_numeric(s.where(~is_bool), errors="coerce")
    return numbers, present & (numbers.isna() | is_bool)


def _whole_as_int(numbers: pd.Series) -> pd.Series:
    values = numbers.astype(object)
    whole = numbers.notna() & (numbers % 1 == 0)
    values[whole] = numbers[whole].astype("int64").astype(object)
    return values


def to_number(s: pd.Series, language: str) -> Converted:
    numbers, bad = _numbers(s)
    return _result(_whole_as_int(numbers), bad)


def to_integer(s: pd.Series, language: str) -> Converted:
    numbers, bad = _numbers(s)
    bad = bad | (numbers.notna() & (numbers % 1 != 0))
    return _result(_whole_as_int(numbers), bad)


def _booleans(s: pd.Series) -> tuple[pd.Series, pd.Series]:
    def read(v):
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        word = str(v).strip().lower()
        return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None

    present = ~_empty(s)
    values = s.where(present).map(read, na_action="ignore")
    return values, present & values.isna()


def to_boolean(s: pd.Series, language: str) -> Converted:
    return _result(*_booleans(s))


def to_optin(s: pd.Series, language: str) -> Converted:
    as_enum = s.map(lambda v: v.strip().upper() if isinstance(v, str) else None)
    is_enum = as_enum.isin(OPTIN)
    flags, bad = _booleans(s.where(~is_enum))
    values = flags.map({True: "EXPLICITLY_OPTEDIN", False: "EXPLICITLY_OPTEDOUT"}).where(~is_enum, as_enum)
    return _result(values, bad & ~is_enum)


def to_list(s: pd.Series, language: str) -> Converted:
    def read(v):
        if isinstance(v, (list, tuple, np.ndarray)):
            return [str(x) for x in v if x is not None] or None
        return [v.strip()] if isinstance(v, str) and v.strip() else None

    present = ~_empty(s)
    values = s.where(present).map(read, na_action="ignore")
    bad = present & s.map(lambda v: isinstance(v, dict))
    return _result(values, bad)


CONVERTERS: dict[str, Callable[[pd.Series, str], Converted]] = {
    "string": to_string, "email": to_email, "gender": to_gender, "country": to_country,
    "phone": to_phone, "date": to_date, "datetime": to_datetime, "number": to_number,
    "integer": to_integer, "boolean": to_boolean, "optin": to_optin, "list": to_list,
}


def transform(columns: pd.DataFrame, mapping: ContactMapping) -> pd.DataFrame:
    """Customer columns → payload frame: `id` and one column per remote field, in Ometria's formats.

    A value that cannot be converted is kept as it was, so that the quality gate reports it with
    the offending value; nothing here decides whether a record may be sent.
    """
    language = mapping.settings.language
    payload = {"id": _text(columns["id"], language)}
    for field in mapping.fields:
        source = columns[field.loyalty_field]
        values, bad = CONVERTERS[field.format](source, language)
        payload[field.remote_field] = values.where(~bad, _objects(source)) if bad.any() else values
    return pd.DataFrame(payload, index=columns.index)
