"""Staged customers → encoded, hashed, checked contacts in one columnar pass (DuckDB), chunk by chunk.

DuckDB reads the staged NDJSON on its own threads (no worker processes: it runs the same in a Celery worker),
takes out only the loyalty fields the mapping uses, converts each with its format's SQL (ometria/format_sql.py),
encodes each contact body from the columns and hashes it. A customer with a value the SQL does not carry
exactly (another kind than its format, a blank at an edge, an escape, Antavo's `_held` reasons, a failing
check) takes the pandas path (transform.py, payload.py, quality.py) within its chunk, which converts it as
always or quarantines it with every reason. Both paths write the same bytes (tests/test_engine_golden.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from antavo_ometria.antavo.records import HELD
from antavo_ometria.ometria.contract import MAX_RECORD_BYTES
from antavo_ometria.ometria.format_sql import Sql, Value, literal, quoted
from antavo_ometria.ometria.formats import FORMATS
from antavo_ometria.ometria.payload import encode_contact_array, envelope, member_name, payload_hash, place
from antavo_ometria.sync.contacts.quality import (
    ALL_TEXT,
    NOT_TEXT,
    SOURCE,
    UNIQUE_IN_CHUNK,
    GateResult,
    check_rows,
    row_checks,
)
from antavo_ometria.sync.contacts.transform import customer_columns, transform
from antavo_ometria.sync.tables.mapping import ContactMapping

CHUNK_ROWS = 50_000  # customers DuckDB hands over at a time: the fewer it holds ahead, the less memory
THREADS = "ANTAVO_OMETRIA_TRANSFORM_THREADS"  # DuckDB threads that transform (default: the cores, at most four)


def transform_threads() -> int:
    """How many threads transform: $ANTAVO_OMETRIA_TRANSFORM_THREADS, or one per core this process may use
    (at most four)."""
    value = os.environ.get(THREADS, "").strip()
    if value and not (value.isdigit() and int(value) >= 1):
        raise ValueError(f"{THREADS} must be a whole number of threads, at least 1; it is {value!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return int(value) if value else min(cores, 4)


@dataclass
class PreparedChunk:
    """One chunk of staged customers, mapped, encoded and checked: row for row."""

    ids: list
    encoded: pa.BinaryArray
    hashes: pa.StringArray
    gate: GateResult | None  # the verdict, for a GxBlock to confirm; None when only transformed


# a JSON value's kind from its first character, and a string's text (cut out of its JSON when it has no escape)
KIND = ("CASE left({v}, 1) WHEN '\"' THEN 'VARCHAR' WHEN '{{' THEN 'OBJECT' WHEN '[' THEN 'ARRAY' WHEN 't' THEN "
        "'BOOLEAN' WHEN 'f' THEN 'BOOLEAN' WHEN 'n' THEN 'NULL' ELSE 'NUMBER' END")
TEXT = ("CASE WHEN {t} <> 'VARCHAR' THEN {v} WHEN contains({v}, '\\') THEN json_extract_string({v}, '$') "
        "ELSE {v}[2:-2] END")


def _json_path(path: str) -> str:
    return "$." + ".".join('"' + part.replace('"', '\\"') + '"' for part in path.split("."))


def _key(name: str) -> str:
    return literal(json.dumps(name, ensure_ascii=False).replace("/", "\\/") + ":")


@dataclass(frozen=True)
class Query:
    """The columnar pass as SQL: one select over the staged file, a column per output."""

    sql: str
    checks: list[str]  # the check frame's columns it computes


@dataclass(frozen=True)
class Column:
    """One mapped value in the query: where it goes, its format's SQL, and the name of its converted column."""

    name: str  # remote field (or `id`)
    sql: Sql
    column: str


def build_query(mapping: ContactMapping, source: str, gate: bool) -> Query:
    """Layer by layer, so each expression is computed once: parse the wanted paths; each value's type and text;
    each value converted; the body and the check columns; the hash."""
    paths = list(dict.fromkeys(["id", HELD, *mapping.loyalty_fields]))
    at = {p: i + 1 for i, p in enumerate(paths)}
    extract = f"json_extract(json, [{', '.join(literal(_json_path(p)) for p in paths)}])"
    typed = ", ".join(f"x[{i}]::VARCHAR AS v{i}, {KIND.format(v=f'x[{i}]::VARCHAR')} AS t{i}" for i in at.values())
    texts = ", ".join(f"v{i}, t{i}, {TEXT.format(v=f'v{i}', t=f't{i}')} AS s{i}" for i in at.values())
    wanted = [("id", "string", "id"), *((f.remote_field, f.format, f.loyalty_field) for f in mapping.fields)]
    columns, converted = {}, []
    for k, (name, fmt, path) in enumerate(wanted):
        x = Value(f"v{at[path]}", f"t{at[path]}", f"s{at[path]}", mapping.settings.language)
        sql, empty = FORMATS[fmt].sql(x), f"(v{at[path]} IS NULL OR t{at[path]} = 'NULL' OR s{at[path]} = '')"
        converted.append(f"CASE WHEN NOT {empty} THEN {sql.text} END AS c{k}")
        converted.append(f"({empty} OR coalesce({sql.ok}, false)) AS ok{k}")
        columns[name] = Column(name, sql, f"c{k}")
    fast = " AND ".join([f"ok{k}" for k in range(len(wanted))] + ["c0 IS NOT NULL", "held IS NULL"])
    if "email" in columns:
        fast += f" AND {columns['email'].column} IS NOT NULL"
    checks = _check_columns(mapping, columns) if gate else {}
    selected = "".join(f", {expr} AS {_name(name)}" for name, expr in checks.items())
    sql = (f"WITH parsed AS (SELECT json AS line, {extract} AS x FROM read_json_objects({literal(source)}, "
           f"format = 'newline_delimited')), kinds AS (SELECT line, {typed} FROM parsed), "
           f"typed AS (SELECT line, {texts} FROM kinds), "
           f"converted AS (SELECT line, v{at[HELD]} AS held, {', '.join(converted)} FROM typed), "
           f"encoded AS (SELECT line, c0 AS id, {fast} AS fast, {_body(mapping, columns)} AS body{selected} "
           "FROM converted), "
           # a record over Ometria's limit takes the pandas path, which holds it back with its reason
           f"sized AS (SELECT * REPLACE (fast AND strlen(body) <= {MAX_RECORD_BYTES} AS fast) FROM encoded) "
           "SELECT id, fast, CASE WHEN fast THEN NULL ELSE line END "
           "AS line, CASE WHEN fast THEN body END AS body, CASE WHEN fast THEN left(sha256(body), 32) END AS hash"
           + "".join(f", {_name(c)}" for c in checks) + (", strlen(body) AS record_bytes" if gate else "")
           + " FROM sized")
    return Query(sql, ["id", *checks, "record_bytes"] if gate else [])


def _name(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def _json(column: Column) -> str:
    return quoted(column.column) if column.sql.quoted else column.column


def _body(mapping: ContactMapping, columns: dict[str, Column]) -> str:
    """The contact's JSON, as encode_contact_array writes it (a customer with marketing_optin takes the pandas
    path, so no body here carries @force_optin)."""
    shape = mapping.shape
    prefix = json.dumps(envelope(shape), ensure_ascii=False, separators=(",", ":"))[:-1] + ","
    top, sms, nested = [f"{_key('id')} || {_json(columns['id'])}"], [], []
    for f in shape.fields:
        value = _json(columns[f.remote_field])
        value = f"coalesce({value}, 'null')" if f.overwrite_empty else value
        place(f"{_key(member_name(f))} || {value}", f, shape.v2, top, sms, nested)
    parts = [literal(prefix), f"concat_ws(',', {', '.join(top)})"]
    for members, before, after in ((sms, ',"channels":{"sms":{', "}}"), (nested, ',"properties":{', "}")):
        if members:
            inner = f"concat_ws(',', {', '.join(members)})"
            parts.append(f"CASE WHEN {inner} <> '' THEN {literal(before)} || {inner} || {literal(after)} ELSE '' END")
    return "(" + " || ".join([*parts, "'}'"]) + ")"


def _check_columns(mapping: ContactMapping, columns: dict[str, Column]) -> dict[str, str]:
    """The check frame's columns (see quality.check_frame) for a customer on the SQL path (but `id`, selected
    anyway)."""
    checks = {}
    for f in mapping.fields:
        fmt, value = FORMATS[f.format], columns[f.remote_field]
        typed = f"CASE WHEN {value.column} IS NOT NULL THEN {value.sql.kind} END"
        checks[f"{f.remote_field}:type" if fmt.types else f.remote_field] = typed if fmt.types else value.column
        if fmt.numeric:
            checks[f"{f.remote_field}:range"] = f"CASE WHEN {value.column} IS NOT NULL THEN 'ok' END"
    checks[SOURCE] = "NULL::VARCHAR"
    text = [columns[f.remote_field].column for f in mapping.fields if FORMATS[f.format].text]
    if text:
        checks[NOT_TEXT] = "NULL::VARCHAR"
        checks[ALL_TEXT] = " || '\t' || ".join(f"coalesce({t}, '')" for t in text)
    return checks


def prepared_chunks(path: Path, mapping: ContactMapping, gate: bool = True, rows: int = CHUNK_ROWS,
                    threads: int | None = None) -> Iterator[PreparedChunk]:
    """The staged customers, prepared chunk by chunk of `rows`, in order; DuckDB streams them on `threads`."""
    import duckdb

    query = build_query(mapping, _location(path), gate)
    with duckdb.connect(config={"threads": threads or transform_threads()}) as db:
        db.execute("SET enable_progress_bar = false")
        db.execute("SET TimeZone = 'UTC'")  # date-times are written in UTC whatever the worker's zone
        if not isinstance(path, Path):  # object storage: DuckDB reads through the path's filesystem
            db.register_filesystem(path.fs)
        for batch in db.sql(query.sql).to_arrow_reader(rows):
            yield prepare_batch(batch, mapping, query.checks, gate)


def _location(path: Path) -> str:
    return str(path) if isinstance(path, Path) else f"{path.protocol}://{path.path}"


def prepare_batch(batch: pa.RecordBatch, mapping: ContactMapping, checks: list[str], gate: bool) -> PreparedChunk:
    """One batch of the query: its customers on the SQL path as they are, the others through the pandas path."""
    ids = batch.column("id").to_pylist()
    fast = batch.column("fast").to_numpy(zero_copy_only=False) & ~pd.Series(ids).duplicated(keep=False).to_numpy()
    slow = np.flatnonzero(~fast)
    body, hashes = batch.column("body"), batch.column("hash")
    result = None
    if len(slow):
        lines = batch.column("line").take(pa.array(slow)).to_pylist()
        frame, encoded, result = _pandas_path(lines, mapping, gate)
        mask = pa.array(~fast)
        body = pc.replace_with_mask(body.cast(pa.binary()), mask, encoded)
        hashes = pc.replace_with_mask(hashes, mask, pa.array([payload_hash(b) for b in encoded.to_pylist()], pa.string()))
        for row, slow_id in zip(slow.tolist(), frame["id"].tolist(), strict=True):
            ids[row] = slow_id
    verdict = _verdict(batch, mapping, checks, slow, result) if gate else None
    return PreparedChunk(ids, body.cast(pa.binary()), hashes, verdict)


def _pandas_path(lines: list[str], mapping: ContactMapping, gate: bool):
    columns = customer_columns((json.loads(line) for line in lines), [*mapping.loyalty_fields, HELD])
    frame = transform(columns, mapping)
    encoded = encode_contact_array(frame, mapping.shape)
    problems = columns[HELD] if HELD in columns else None
    result = check_rows(frame, mapping, pc.binary_length(encoded).to_numpy(), (), problems) if gate else None
    return frame, encoded, result


def _verdict(batch: pa.RecordBatch, mapping: ContactMapping, checks: list[str], slow: np.ndarray,
             result: GateResult | None) -> GateResult:
    """The chunk's verdict: customers on the SQL path pass every check; the pandas path's verdict on the others
    is put at their rows, and so are their columns of the check frame GX validates."""
    rows, rules = batch.num_rows, row_checks(mapping.fields)
    fast = np.ones(rows, dtype=bool)
    fast[slow] = False
    gate = GateResult(valid=pd.Series(True, index=range(rows)), failures={}, checked=rows)
    gate.non_null = {f.remote_field: rows - len(slow) - batch.column(_checked(f)).filter(pa.array(fast)).null_count
                     for f in mapping.fields}
    needed = list(dict.fromkeys(["id", *(r.column for r in rules if r.column != UNIQUE_IN_CHUNK)]))
    gate.expected = [np.zeros(0, dtype=np.int64) for _ in rules]
    columns = {c: batch.column(c) for c in needed}
    if result is not None:
        mask = pa.array(~fast)
        for column in needed:
            values = pa.array(result.checks[column].to_numpy(dtype=object), columns[column].type, from_pandas=True)
            columns[column] = pc.replace_with_mask(columns[column], mask, values)
        gate.failures = {int(slow[row]): fails for row, fails in result.failures.items()}
        gate.expected = [slow[found] for found in result.expected]
        gate.valid.iloc[list(gate.failures)] = False
        gate.non_null = {name: count + result.non_null[name] for name, count in gate.non_null.items()}
    gate.checks = pa.table(columns).to_pandas()
    return gate


def _checked(f) -> str:
    return f"{f.remote_field}:type" if FORMATS[f.format].types else f.remote_field
