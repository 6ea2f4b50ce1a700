"""Antavo customers → a payload frame, one column per remote field, by pandas column operations.

Values are normalised to Ometria's formats (gender m/f, dates YYYY-MM-DD, timestamps ISO 8601 with
offset, translated names in the configured language, E.164 phones, ISO 3166-1 countries, typed
numbers and booleans). A value that cannot be converted is left as it was; the quality gate
(`quality.py`) then holds its record back with the reason.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from antavo_ometria.sync.mapping import ContactMapping

CHUNK_ROWS = 50_000  # customers transformed and checked at a time: memory stays flat as the programme grows
PARSE_BLOCK = 8 << 20  # pyarrow parses a chunk in blocks of this many bytes, on all cores
# local part without spaces; a host name of letter-or-digit labels (hyphens inside), ending in a label of letters
EMAIL = r"^[^@\s]+@(?:[^\W_](?:(?:[^\W_]|-)*[^\W_])?\.)+[^\W\d_]{2,}$"
PHONE_E164 = r"^\+[1-9]\d{6,14}$"
GENDERS = {"male": "m", "female": "f", "m": "m", "f": "f"}
UNKNOWN_GENDERS = {"other", "unknown", "not_specified", "prefer_not_to_say", "x", "u", "n/a", "none"}
OPTIN = {"EXPLICITLY_OPTEDIN", "EXPLICITLY_OPTEDOUT", "NOT_SPECIFIED"}
TRUE_WORDS = {"true", "yes", "1"}
FALSE_WORDS = {"false", "no", "0"}
MAX_EXACT = 2**53 - 1  # the largest whole number a JSON number (an IEEE 754 double) carries exactly


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


def read_customer_chunks(path: Path, paths: list[str], rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """The staged customers (NDJSON) as column frames of at most `rows` customers: one pass, bounded memory.

    Each chunk is parsed by pyarrow's JSON reader and only the wanted paths are taken out of it; a
    chunk whose values change type between customers (which pyarrow refuses) is parsed line by line.
    """
    wanted = ["id"] + [p for p in paths if p != "id"]
    with path.open("rb") as handle:
        lines = (line for line in handle if line.strip())
        while chunk := list(itertools.islice(lines, rows)):
            data = b"".join(chunk)
            try:
                table = pajson.read_json(io.BytesIO(data), read_options=pajson.ReadOptions(block_size=PARSE_BLOCK))
            except pa.ArrowInvalid:
                yield customer_columns((json.loads(line) for line in chunk), wanted)
                continue
            yield pd.DataFrame({p: _arrow_path(table, p) for p in wanted})


def _arrow_path(table: pa.Table, path: str) -> pd.Series:
    parts = path.split(".")
    if parts[0] not in table.column_names:
        return pd.Series([None] * table.num_rows, dtype=object)
    array = table.column(parts[0]).combine_chunks()
    for part in parts[1:]:
        if not pa.types.is_struct(array.type) or array.type.get_field_index(part) < 0:
            return pd.Series([None] * table.num_rows, dtype=object)
        array = pc.struct_field(array, part)
    return array.to_pandas()


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


def _text(s: pd.Series, language: str) -> pd.Series:
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
            values[is_dict] = values[is_dict].map(lambda d: d.get(language) or next(iter(d.values()), None))
        text = values.map(lambda v: v if v is None or isinstance(v, str) else str(v)).astype("str")
    return text.where(text.str.strip() != "")


def _utc(s: pd.Series) -> pd.Series:
    return s.dt.tz_localize("UTC") if s.dt.tz is None else s.dt.tz_convert("UTC")


def _objects(values: pd.Series) -> pd.Series:
    """Plain Python values with None for missing (pandas 3 string columns use NaN)."""
    return values.astype(object).where(values.notna(), None)


def _result(values: pd.Series, bad: pd.Series) -> Converted:
    return _objects(values.where(~bad)), bad


def to_string(s: pd.Series, language: str) -> Converted:
    text = _text(s, language)
    bad = text.str.contains(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", regex=True).fillna(False).astype(bool)
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
    text = _text(s[present & ~is_number], language)
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
        return numbers, numbers.notna() & ~(numbers.abs() <= MAX_EXACT)
    present = ~_empty(s)
    is_bool = s.map(lambda v: isinstance(v, (bool, np.bool_))) if s.dtype == object else False
    numbers = pd.to_numeric(s.where(~is_bool), errors="coerce").astype(float)
    return numbers, present & (numbers.isna() | is_bool | ~(numbers.abs() <= MAX_EXACT))


def _whole_as_int(numbers: pd.Series) -> pd.Series:
    values = numbers.astype(object)
    whole = numbers.notna() & (numbers % 1 == 0) & (numbers.abs() <= MAX_EXACT)
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
    payload = {"id": _objects(_text(columns["id"], language))}
    for field in mapping.fields:
        source = columns[field.loyalty_field]
        values, bad = CONVERTERS[field.format](source, language)
        payload[field.remote_field] = values.where(~bad, _objects(source)) if bad.any() else values
    return pd.DataFrame(payload, index=columns.index)
