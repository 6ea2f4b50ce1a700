"""Ometria's value formats, one registry entry each: how a value is converted to it, how the quality gate
checks it, how errors describe it, and which formats a loyalty field of it may be written as.

Adding a format means adding one `Format` here (and, for the sandbox, its own check from the documentation).
Converters take a pandas Series and the configured language, and return (values with None for empty,
mask of values that could not be converted); a value that cannot be converted is left as it was, so
that the quality gate reports it with the offending value.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import pandas as pd

from antavo_ometria.ometria import format_sql as sql
from antavo_ometria.ometria.contract import (
    CALENDAR_DATE,
    CONTROL_CHARACTERS,
    EMAIL,
    GENDERS,
    ISO_DATETIME,
    MAX_EXACT_NUMBER,
    OPTIN,
    PHONE_E164,
    iso_countries,
)
from antavo_ometria.values import translated

GENDER_WORDS = {"male": "m", "female": "f", "m": "m", "f": "f"}
UNKNOWN_GENDERS = {"other", "unknown", "not_specified", "prefer_not_to_say", "x", "u", "n/a", "none"}
TRUE_WORDS = {"true", "yes", "1"}
FALSE_WORDS = {"false", "no", "0"}
# -- converters: Series in, (values with None for empty, mask of unconvertible values) out -----
Converted = tuple[pd.Series, pd.Series]


def _is_text(s: pd.Series) -> bool:
    """A typed string column (pandas `str`), as the columnar reader gives: fast vectorised paths."""
    return s.dtype != object and pd.api.types.is_string_dtype(s)


def _empty(s: pd.Series) -> pd.Series:
    if _is_text(s):
        return s.isna() | (s.str.strip() == "")
    if s.dtype == object:
        return s.isna() | s.map(lambda v: isinstance(v, str) and not v.strip())
    return s.isna()


def as_text(s: pd.Series, language: str) -> pd.Series:
    """Text (`str` dtype, NaN when empty), with translations such as {"en": "Gold"} resolved."""
    if _is_text(s):
        text = s
    elif pd.api.types.is_datetime64_any_dtype(s):
        text = _utc(s).dt.strftime("%Y-%m-%dT%H:%M:%S+00:00").astype("str")
    elif pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        text = _whole_as_int(s.astype(float)).map(str, na_action="ignore").astype("str")
    else:
        values = s.astype(object)
        is_dict = values.map(lambda v: isinstance(v, dict))
        if is_dict.any():
            values = values.copy()
            values[is_dict] = values[is_dict].map(lambda d: translated(d, language))
        text = values.map(lambda v: v if v is None or isinstance(v, str) else str(v)).astype("str")
    return text.where(text.str.strip() != "")


def _utc(s: pd.Series) -> pd.Series:
    return s.dt.tz_localize("UTC") if s.dt.tz is None else s.dt.tz_convert("UTC")


def plain(values: pd.Series) -> pd.Series:
    """Plain Python values with None for missing (pandas 3 string columns use NaN)."""
    return values.astype(object).where(values.notna(), None)


def _result(values: pd.Series, bad: pd.Series) -> Converted:
    return plain(values.where(~bad)), bad


def to_string(s: pd.Series, language: str) -> Converted:
    text = as_text(s, language)
    bad = text.str.contains(CONTROL_CHARACTERS, regex=True).fillna(False).astype(bool)
    return _result(text.str.strip(), bad | _not_text(s))


def _not_text(s: pd.Series) -> pd.Series:
    """Values no text field should carry: lists, objects other than translations, booleans, inf and NaN."""
    if pd.api.types.is_float_dtype(s):
        return s.notna() & ~np.isfinite(s.to_numpy(dtype=float, na_value=0.0))
    if s.dtype != object:
        return pd.Series(pd.api.types.is_bool_dtype(s), index=s.index) & s.notna()

    def wrong(v) -> bool:
        if isinstance(v, dict):
            return not all(isinstance(x, str) for x in v.values())
        if isinstance(v, float):
            return not np.isfinite(v)
        return isinstance(v, (list, tuple, np.ndarray, bool, np.bool_))

    return s.map(wrong).astype(bool)


def to_email(s: pd.Series, language: str) -> Converted:
    text = as_text(s, language).str.strip()
    return _result(text, text.notna() & ~text.fillna("").str.match(EMAIL))


def to_gender(s: pd.Series, language: str) -> Converted:
    text = as_text(s, language).str.strip().str.lower()
    unknown = text.isin(UNKNOWN_GENDERS)
    mapped = text.map(GENDER_WORDS)
    return _result(mapped.where(~unknown, None), text.notna() & ~unknown & mapped.isna())


def to_country(s: pd.Series, language: str) -> Converted:
    text = as_text(s, language).str.strip().str.upper()
    return _result(text, text.notna() & ~text.isin(iso_countries()))


def to_phone(s: pd.Series, language: str) -> Converted:
    text = as_text(s, language).str.replace(r"[\s\-().]", "", regex=True).str.replace(r"^00", "+", regex=True)
    return _result(text, text.notna() & ~text.fillna("").str.match(PHONE_E164))


def _timestamps(s: pd.Series, language: str) -> tuple[pd.Series, pd.Series]:
    """(UTC timestamps, present-but-unparseable mask) from ISO strings, unix seconds or typed timestamps."""
    if pd.api.types.is_datetime64_any_dtype(s):
        return _utc(s), pd.Series(False, index=s.index)
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        stamps = pd.to_datetime(s.round(), unit="s", utc=True, errors="coerce")
        return stamps, s.notna() & stamps.isna()
    present = ~_empty(s)
    stamps = pd.Series(pd.NaT, index=s.index, dtype="datetime64[us, UTC]")
    is_number = s.map(lambda v: isinstance(v, (int, float, np.number)) and not isinstance(v, bool)) \
        if s.dtype == object else pd.Series(False, index=s.index)
    if is_number.any():
        seconds = pd.to_numeric(s[is_number], errors="coerce").round()  # Ometria takes whole seconds
        stamps[is_number] = pd.to_datetime(seconds, unit="s", utc=True, errors="coerce").astype(stamps.dtype)
    text = as_text(s[present & ~is_number], language)
    if len(text):
        parsed = pd.to_datetime(text.str.strip(), format="ISO8601", utc=True, errors="coerce")
        stamps[text.index] = parsed.dt.floor("s").astype(stamps.dtype)
    return stamps, present & stamps.isna()


def to_date(s: pd.Series, language: str) -> Converted:
    stamps, bad = _timestamps(s, language)
    return _result(stamps.dt.strftime("%Y-%m-%d"), bad)


def to_datetime(s: pd.Series, language: str) -> Converted:
    stamps, bad = _timestamps(s, language)
    return _result(stamps.dt.strftime("%Y-%m-%dT%H:%M:%S+00:00"), bad)


def _numbers(s: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Numbers as floats, and the values that are no usable number (text, booleans, inf, beyond ±2**53)."""
    if pd.api.types.is_bool_dtype(s):
        return pd.Series(np.nan, index=s.index), s.notna()
    if pd.api.types.is_numeric_dtype(s):
        numbers = s.astype(float)
        return numbers, numbers.notna() & ~(numbers.abs() <= MAX_EXACT_NUMBER)
    present = ~_empty(s)
    is_bool = s.map(lambda v: isinstance(v, (bool, np.bool_))) if s.dtype == object else False
    numbers = pd.to_numeric(s.where(~is_bool), errors="coerce").astype(float)
    return numbers, present & (numbers.isna() | is_bool | ~(numbers.abs() <= MAX_EXACT_NUMBER))


def _whole_as_int(numbers: pd.Series) -> pd.Series:
    values = numbers.astype(object)
    whole = numbers.notna() & (numbers % 1 == 0) & (numbers.abs() <= MAX_EXACT_NUMBER)
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



@dataclass(frozen=True)
class Format:
    name: str
    description: str  # how a quarantine reason names it: "… is not an email address"
    convert: Callable[[pd.Series, str], Converted]
    check: str | None = None  # the quality check that holds back a value not in this format
    pattern: str | None = None  # the value must match this …
    values: Callable[[], Collection[str]] | None = None  # … or be one of these …
    types: tuple[str, ...] = ()  # … or be a JSON value of these (Python) types
    numeric: bool = False  # and a finite number JSON carries exactly
    text: bool = False  # a text value: no control characters, no lists or objects
    custom: bool = False  # a custom field can be written in it
    writable_as: frozenset[str] | None = None  # what a loyalty field in this format can be written as (None: any)
    sql: sql.SqlFormat = sql.never  # the same conversion in DuckDB SQL, for the columnar engine


def _fixed(*names: str) -> Callable[[], Collection[str]]:
    return lambda: names


def _as(*names: str) -> frozenset[str]:
    return frozenset(names)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("string", "text", to_string, text=True, custom=True, sql=sql.string, writable_as=_as(
        "string", "email", "gender", "country", "phone", "date", "datetime", "optin", "integer", "number", "boolean")),
    Format("email", "an email address", to_email, "email_format", pattern=EMAIL, text=True, sql=sql.email,
           writable_as=_as("email", "string")),
    Format("integer", "a whole number", to_integer, "type", types=("int",), numeric=True, custom=True,
           sql=sql.number, writable_as=_as("integer", "number", "string")),
    Format("number", "a number", to_number, "type", types=("int", "float"), numeric=True, custom=True,
           sql=sql.number, writable_as=_as("number", "integer", "string")),
    Format("boolean", "true or false", to_boolean, "type", types=("bool",), custom=True, sql=sql.boolean,
           writable_as=_as("boolean", "optin", "string")),
    Format("date", "a YYYY-MM-DD date", to_date, "date_format", pattern=CALENDAR_DATE, custom=True, sql=sql.date,
           writable_as=_as("date", "datetime", "string")),
    Format("datetime", "an ISO 8601 date-time", to_datetime, "datetime_format", pattern=ISO_DATETIME, custom=True,
           sql=sql.datetime, writable_as=_as("datetime", "date", "string")),
    Format("gender", "m or f", to_gender, "gender", values=_fixed(*GENDERS), sql=sql.gender,
           writable_as=_as("gender", "string")),
    Format("country", "an ISO 3166-1 alpha-2 country code", to_country, "country", values=iso_countries,
           sql=sql.country, writable_as=_as("country", "string")),
    Format("phone", "an E.164 phone number", to_phone, "phone", pattern=PHONE_E164, sql=sql.phone,
           writable_as=_as("phone", "string")),
    Format("list", "a list", to_list, "type", types=("list",), custom=True, sql=sql.text_list,
           writable_as=_as("list")),
    Format("optin", "a consent value", to_optin, "consent", values=_fixed(*OPTIN)),
)}
CUSTOM_FORMATS = tuple(name for name, f in FORMATS.items() if f.custom)
