"""Ometria contact records from a payload frame, in the legacy or the v2 shape, encoded as JSON.

Both shapes carry `@type`, `@collection`, `@merge`, `id` (the Antavo customer ID) and, when a list
is configured, `@add_to_lists`. v2 puts Ometria's built-in fields top-level and every custom field
under `properties`; legacy writes all mapped fields flat at the top level. SMS preferences
(`channels.sms.*`) go under `channels` in both. An empty value is left out, so it cannot blank what
Ometria holds, unless the mapping row says `overwrite_empty = yes`. When Antavo is the consent authority,
a record that carries `marketing_optin` also carries `@force_optin` (Ometria's rule: else any opt-out wins).

Encoding is columnar: each field's values are serialised by pandas' JSON writer in one call per chunk, and
the members every record carries are joined by Arrow, so no Python dict or string is built per record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


class ContactField(Protocol):
    remote_field: str  # an Ometria built-in contact field or a custom field ID
    builtin: bool
    overwrite_empty: bool  # an empty value is sent (and clears Ometria's) rather than left out


@dataclass(frozen=True)
class ContactShape:
    """What shapes a contact record: where it goes, which fields it carries, legacy or v2."""

    collection: str
    list_id: str | None
    v2: bool
    fields: Sequence[ContactField]
    force_optin: bool = False  # a record's marketing_optin is forced over other sources' opt-outs


SMS = "channels.sms."  # the SMS preferences: `"channels": {"sms": {…}}`


def envelope(shape: ContactShape) -> dict:
    head: dict = {"@type": "contact", "@collection": shape.collection, "@merge": True}
    if shape.list_id:
        head["@add_to_lists"] = [int(shape.list_id)]
    return head


def encode_record(record: dict) -> bytes:
    """Compact JSON; a non-finite number raises ValueError rather than becoming `NaN`, which is not JSON."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def payload_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:32]


def encode_contacts(frame: pd.DataFrame, shape: ContactShape) -> list[bytes]:
    """One encoded Ometria contact per row of the payload frame, in order."""
    return encode_contact_array(frame, shape).to_pylist()


def encode_contact_array(frame: pd.DataFrame, shape: ContactShape) -> pa.BinaryArray:
    """encode_contacts as one Arrow array: it crosses processes and reaches Parquet as a few buffers."""
    if frame.empty:
        return pa.array([], pa.binary())
    rows = len(frame)
    top, sms, nested = _field_members(frame, shape)
    parts = [_head(frame, shape), _joined(top, "", "")]
    if sms:
        parts.append(_joined(sms, ',"channels":{"sms":{', "}}"))
    if nested:
        parts.append(_joined(nested, ',"properties":{', "}"))
    parts.append(pa.array(np.full(rows, "}", dtype=object), pa.string()))
    return pc.binary_join_element_wise(*parts, "", null_handling="skip").cast(pa.binary())


def _head(frame: pd.DataFrame, shape: ContactShape) -> pa.Array:
    """The envelope's members per row, with `@force_optin` where the record carries consent and the mode forces it."""
    rows = len(frame)
    prefix = json.dumps(envelope(shape), ensure_ascii=False, separators=(",", ":"))[:-1] + ","
    forced = frame["marketing_optin"].notna().to_numpy() if shape.force_optin and "marketing_optin" in frame \
        else np.zeros(rows, dtype=bool)
    if forced.any():
        return pc.if_else(forced, prefix + '"@force_optin":true,', prefix)
    return pa.array(np.full(rows, prefix, dtype=object), pa.string())


def _field_members(frame: pd.DataFrame, shape: ContactShape) -> tuple[list, list, list]:
    """Each mapped field's `"name":value` column, sorted by where it goes: top level, the SMS channel, properties."""
    top, sms, nested = [_members(frame["id"], "id")], [], []
    for f in shape.fields:
        values = frame[f.remote_field]
        # which rows carry the field: present, or empty but allowed to overwrite
        carried = np.ones(len(frame), dtype=bool) if f.overwrite_empty else values.notna().to_numpy()
        if not carried.any():
            continue
        members = _members(values, member_name(f))
        members = members if carried.all() else pc.if_else(carried, members, pa.scalar(None, pa.string()))
        place(members, f, shape.v2, top, sms, nested)
    return top, sms, nested


def member_name(f) -> str:
    """The field's name in the record (an SMS channel field's within its channel)."""
    return f.remote_field.removeprefix(SMS)


def place(member, f, v2: bool, top: list, sms: list, nested: list) -> None:
    """Where a field goes in the record: the SMS channel, the top level (built-ins; everything in legacy mode),
    or `properties` (v2's custom fields)."""
    sms_field = f.remote_field.startswith(SMS)
    if sms_field:
        sms.append(member)
    if (f.builtin or not v2) and not sms_field:
        top.append(member)
    if not f.builtin and v2:
        nested.append(member)


def _members(values: pd.Series, name: str) -> pa.Array:
    """`"name":value` per row: text, whole numbers, booleans and lists of text encoded by Arrow, anything else
    (fractions, mixed kinds) by pandas' JSON writer, whose bytes the Arrow encodings reproduce."""
    key = json.dumps(name, ensure_ascii=False).replace("/", "\\/") + ":"
    try:
        array = pa.array(values.to_numpy(dtype=object), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        array = None
    encoded = None if array is None else _arrow_encoded(array)
    if encoded is None or encoded is _UNSAFE:
        text = values.to_frame(name).to_json(orient="records", lines=True, force_ascii=False, double_precision=15)
        return pc.utf8_slice_codeunits(pa.array(text.rstrip("\n").split("\n"), pa.string()), 1, -1)
    return pc.binary_join_element_wise(key, pc.fill_null(encoded, "null"), "")


def _arrow_encoded(array: pa.Array) -> pa.Array | object | None:
    """The JSON text of each value by Arrow, or None (or _UNSAFE) where pandas' writer must encode them."""
    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _json_strings(array)
    if pa.types.is_integer(kind):
        return pc.cast(array, pa.string())
    if pa.types.is_boolean(kind):
        return pc.if_else(array, "true", "false")
    if pa.types.is_null(kind):
        return pa.nulls(len(array), pa.string())
    if pa.types.is_list(kind) and pa.types.is_string(kind.value_type) and array.values.null_count == 0:
        items = _json_strings(array.values)
        return _UNSAFE if items is _UNSAFE else pc.if_else(pc.is_valid(array), pc.binary_join_element_wise(
            "[", pc.binary_join(pa.ListArray.from_arrays(array.offsets, items), ","), "]", ""), None)
    return None


_UNSAFE = object()  # text with control characters: left to pandas' writer, which escapes them


def _json_strings(text: pa.Array) -> pa.Array:
    """JSON strings as pandas' writer writes them (ensure_ascii off): backslash, quote and slash escaped."""
    if pc.any(pc.match_substring_regex(text, "[\\x00-\\x1f]")).as_py():
        return _UNSAFE
    for plain_text, escaped in (("\\", "\\\\"), ('"', '\\"'), ("/", "\\/")):
        text = pc.replace_substring(text, plain_text, escaped)
    return pc.binary_join_element_wise('"', text, '"', "")


def _joined(members: list[pa.Array], before: str, after: str) -> pa.Array:
    """The members a row carries, joined by commas and wrapped; null for a row that carries none."""
    inner = pc.binary_join_element_wise(*members, ",", null_handling="skip") if len(members) > 1 else members[0]
    carried = pc.is_valid(members[0])
    for more in members[1:]:
        carried = pc.or_(carried, pc.is_valid(more))
    inner = pc.if_else(carried, inner, pa.scalar(None, pa.string()))
    return pc.binary_join_element_wise(before, inner, after, "") if before or after else inner
