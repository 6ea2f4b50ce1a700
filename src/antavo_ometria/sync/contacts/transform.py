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
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from antavo_ometria.ometria.formats import FORMATS, as_text, plain
from antavo_ometria.sync.contacts.staged_files import lines_of
from antavo_ometria.sync.tables.mapping import ContactMapping
from antavo_ometria.values import walk

CHUNK_ROWS = 50_000  # customers transformed and checked at a time: memory stays flat as the programme grows
PARSE_BLOCK = 8 << 20  # pyarrow parses a chunk in blocks of this many bytes, on all cores


# -- reading customers into columns ------------------------------------------------------------
def customer_columns(customers: Iterable[dict], paths: list[str]) -> pd.DataFrame:
    """One column per dot path (plus `id`), walked once per customer."""
    wanted = ["id"] + [p for p in paths if p != "id"]
    return pd.DataFrame([[walk(customer, path) for path in wanted] for customer in customers], columns=wanted,
                        dtype=object)


def staged_chunks(path: Path, rows: int = CHUNK_ROWS) -> Iterator[bytes]:
    """The staged customers (NDJSON) in blocks of at most `rows` lines (blank lines skipped): one pass,
    bounded memory."""
    with lines_of(path) as handle:
        lines = (line for line in handle if line.strip())
        while chunk := list(itertools.islice(lines, rows)):
            yield b"".join(line if line.endswith(b"\n") else line + b"\n" for line in chunk)


def customer_frame(data: bytes, paths: list[str]) -> pd.DataFrame:
    """A block of staged customers as a column frame (`id` and the wanted paths).

    pyarrow's JSON reader parses the block and only the wanted paths are taken out of it; a block whose values
    change type between customers (which pyarrow refuses) is parsed line by line."""
    wanted = ["id"] + [p for p in paths if p != "id"]
    try:
        table = pajson.read_json(io.BytesIO(data), read_options=pajson.ReadOptions(block_size=PARSE_BLOCK))
    except pa.ArrowInvalid:
        return customer_columns((json.loads(line) for line in data.splitlines() if line.strip()), wanted)
    return pd.DataFrame({p: _arrow_path(table, p) for p in wanted})


def read_customer_chunks(path: Path, paths: list[str], rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """The staged customers as column frames of at most `rows` customers."""
    for data in staged_chunks(path, rows):
        yield customer_frame(data, paths)


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


def transform(columns: pd.DataFrame, mapping: ContactMapping) -> pd.DataFrame:
    """Customer columns → payload frame: `id` and one column per remote field, in Ometria's formats.

    A value that cannot be converted is kept as it was, so that the quality gate reports it with
    the offending value; nothing here decides whether a record may be sent.
    """
    language = mapping.settings.language
    payload = {"id": plain(as_text(columns["id"], language))}
    for field in mapping.fields:
        source = columns[field.loyalty_field]
        values, bad = FORMATS[field.format].convert(source, language)
        payload[field.remote_field] = values.where(~bad, plain(source)) if bad.any() else values
    return pd.DataFrame(payload, index=columns.index)
