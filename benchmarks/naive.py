"""The same contact transformation written the naive way, for comparison only.

A per-record Python loop, as per-event transformers work: parse each line with the standard
library, walk each dot path, format each value, build each payload dict, check it field by field,
and serialise batches of 100 with `json.dumps`.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

from antavo_ometria.ometria.contract import CALENDAR_DATE, EMAIL, PHONE_E164, iso_countries
from antavo_ometria.ometria.formats import GENDER_WORDS as GENDERS
from antavo_ometria.ometria.payload import envelope
from antavo_ometria.sync.tables.mapping import ContactMapping

EMAIL_RE, PHONE_RE, DATE_RE = re.compile(EMAIL), re.compile(PHONE_E164), re.compile(CALENDAR_DATE)


def _value(fmt: str, value, language: str):
    if isinstance(value, dict) and fmt == "string":
        value = value.get(language) or next(iter(value.values()), None)
    if value is None or value == "":
        return None
    if fmt in ("string", "email"):
        return str(value).strip()
    if fmt == "gender":
        return GENDERS.get(str(value).lower())
    if fmt == "country":
        return str(value).upper()
    if fmt == "phone":
        return re.sub(r"[\s\-().]", "", str(value))
    if fmt == "date":
        try:
            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).strftime("%Y-%m-%d")
        except ValueError:
            return value
    if fmt == "datetime":
        try:
            moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")
        except ValueError:
            return value
    if fmt in ("number", "integer"):
        return int(value) if isinstance(value, (int, float)) and float(value).is_integer() else value
    if fmt == "list":
        return [str(v) for v in value] if isinstance(value, list) else value
    return value


def _valid(fmt: str, value) -> bool:
    if value is None:
        return True
    if fmt == "email":
        return bool(EMAIL_RE.match(value))
    if fmt == "phone":
        return bool(PHONE_RE.match(value))
    if fmt == "country":
        return value in iso_countries()
    if fmt == "date":
        return bool(DATE_RE.match(value))
    if fmt in ("number", "integer"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def transform_file(path: Path, mapping: ContactMapping) -> tuple[int, int, int]:
    """(customers, contacts ready, bytes of JSON batches) for the staged file."""
    fields = [(f.loyalty_field.split("."), f.remote_field, f.format, f.builtin) for f in mapping.fields]
    head, v2, language = envelope(mapping.shape), mapping.settings.v2, mapping.settings.language
    customers = ready = size = 0
    batch: list[dict] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            customer = json.loads(line)
            customers += 1
            record, properties, ok = {**head, "id": customer.get("id")}, {}, bool(customer.get("id"))
            for parts, remote, fmt, builtin in fields:
                value = customer
                for part in parts:
                    value = value.get(part) if isinstance(value, dict) else None
                value = _value(fmt, value, language)
                ok = ok and _valid(fmt, value)
                if value is not None:
                    (record if builtin or not v2 else properties)[remote] = value
            if properties:
                record["properties"] = properties
            if ok and record.get("email"):
                ready += 1
                batch.append(record)
            if len(batch) == 100:
                size += len(json.dumps(batch, ensure_ascii=False))
                batch = []
    if batch:
        size += len(json.dumps(batch, ensure_ascii=False))
    return customers, ready, size
