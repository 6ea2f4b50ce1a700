"""Ometria contact records from a payload frame, in the legacy or the v2 shape.

Both shapes carry `@type`, `@collection`, `@merge`, `id` (the Antavo customer ID) and, when a list
is configured, `@add_to_lists`. v2 puts Ometria's built-in fields top-level and every custom field
under `properties`; legacy writes all mapped fields flat at the top level. An empty value is left out,
so it cannot blank what Ometria holds, unless the mapping row says `overwrite_empty = yes`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd

from antavo_ometria.mapping import ContactMapping


def contact_records(frame: pd.DataFrame, mapping: ContactMapping) -> Iterator[tuple[str, dict]]:
    """(id, record) for every row of the payload frame, in order."""
    settings = mapping.settings
    envelope: dict = {"@type": "contact", "@collection": settings.collection, "@merge": True}
    if settings.list_id:
        envelope["@add_to_lists"] = [int(settings.list_id)]
    fields = list(mapping.fields)
    top = [(i, f.remote_field, f.overwrite_empty) for i, f in enumerate(fields) if f.builtin or not settings.v2]
    nested = [(i, f.remote_field, f.overwrite_empty) for i, f in enumerate(fields) if not f.builtin and settings.v2]
    columns = [frame["id"]] + [frame[f.remote_field] for f in fields]
    for record_id, *values in zip(*columns):
        record = dict(envelope)
        record["id"] = record_id
        for i, name, overwrite in top:
            value = values[i]
            if value is not None or overwrite:
                record[name] = value
        if nested:
            properties = {
                name: values[i] for i, name, overwrite in nested if values[i] is not None or overwrite
            }
            if properties:
                record["properties"] = properties
        yield record_id, record
