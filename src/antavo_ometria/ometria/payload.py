"""Ometria contact records from a payload frame, in the legacy or the v2 shape, encoded as JSON.

Both shapes carry `@type`, `@collection`, `@merge`, `id` (the Antavo customer ID) and, when a list
is configured, `@add_to_lists`. v2 puts Ometria's built-in fields top-level and every custom field
under `properties`; legacy writes all mapped fields flat at the top level. SMS preferences
(`channels.sms.*`) go under `channels` in both. An empty value is left out, so it cannot blank what
Ometria holds, unless the mapping row says `overwrite_empty = yes`. When Antavo is the consent authority,
a record that carries `marketing_optin` also carries `@force_optin` (Ometria's rule: else any opt-out wins).

Encoding is columnar: rows are grouped by which fields they carry, and each group is serialised by
pandas' JSON writer in one call, so no Python dict is built per record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd


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
    if frame.empty:
        return []
    v2 = shape.v2
    fields = list(shape.fields)
    prefix = json.dumps(envelope(shape), ensure_ascii=False, separators=(",", ":"))[:-1] + ","
    # which fields each row carries: present, or empty but allowed to overwrite
    carried = np.column_stack([frame[f.remote_field].notna().to_numpy() | f.overwrite_empty for f in fields]) \
        if fields else np.zeros((len(frame), 0), dtype=bool)
    forced = frame["marketing_optin"].notna().to_numpy() if shape.force_optin and "marketing_optin" in frame \
        else np.zeros(len(frame), dtype=bool)
    keys = carried.astype(np.int64) @ (1 << np.arange(len(fields), dtype=np.int64)) if fields else \
        np.zeros(len(frame), dtype=np.int64)
    keys = keys | forced.astype(np.int64) << len(fields)
    out: list[str] = [""] * len(frame)
    for key, rows in pd.Series(keys).groupby(keys).indices.items():
        chosen = [f for i, f in enumerate(fields) if key >> i & 1]
        sms = [f.remote_field for f in chosen if f.remote_field.startswith(SMS)]
        top = ["id"] + [f.remote_field for f in chosen if (f.builtin or not v2) and not f.remote_field.startswith(SMS)]
        nested = [f.remote_field for f in chosen if not f.builtin and v2]
        head = prefix + ('"@force_optin":true,' if key >> len(fields) & 1 else "")
        part = frame.iloc[rows]
        tops = _json_lines(part[top])
        channels = _json_lines(part[sms].rename(columns=lambda name: name.removeprefix(SMS))) if sms else None
        props = _json_lines(part[nested]) if nested else None
        for j, row in enumerate(rows):
            out[row] = (head + tops[j][1:-1] + (',"channels":{"sms":' + channels[j] + "}" if channels else "")
                        + (',"properties":' + props[j] if props else "") + "}")
    return [line.encode() for line in out]


def _json_lines(part: pd.DataFrame) -> list[str]:
    text = part.to_json(orient="records", lines=True, force_ascii=False, double_precision=15)
    return text.rstrip("\n").split("\n")
