"""Antavo customers → a payload frame, one column per remote field, by pandas column operations.

Values are normalised to Ometria's formats (gender m/f, dates YYYY-MM-DD, timestamps ISO 8601 with
offset, translated names in the configured language, E.164 phones, ISO 3166-1 countries, typed
numbers and booleans). A value that cannot be converted is left as it was; the quality gate
(`quality.py`) then holds its record back with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from antavo_ometria.ometria.formats import FORMATS, as_text, plain
from antavo_ometria.sync.tables.mapping import ContactMapping
from antavo_ometria.values import walk


# -- reading customers into columns ------------------------------------------------------------
def customer_columns(customers: Iterable[dict], paths: list[str]) -> pd.DataFrame:
    """One column per dot path (plus `id`), walked once per customer."""
    wanted = ["id"] + [p for p in paths if p != "id"]
    return pd.DataFrame([[walk(customer, path) for path in wanted] for customer in customers], columns=wanted,
                        dtype=object)


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
