"""What a mapping does, shown to the analyst who edits it: samples side by side, and mapping diffs."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from antavo_ometria.antavo.records import normalise_customer
from antavo_ometria.sync.contacts.prepare import prepare_contacts
from antavo_ometria.sync.contacts.transform import customer_columns
from antavo_ometria.sync.tables.mapping import PAYLOAD_SETTINGS, ContactMapping, FieldMapping


def load_customers(path: Path | None, count: int) -> list[dict]:
    """Customers from a JSON/NDJSON file of Antavo customers, or the sandbox population."""
    if path is None:
        from antavo_ometria_tools.population import make_population

        raw = make_population(count)
    else:
        text = path.read_text(encoding="utf-8").strip()
        raw = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line]
    return [normalise_customer(c) for c in raw[:count]]


def payloads(customers: list[dict], mapping: ContactMapping) -> tuple[dict[str, dict], dict[str, str]]:
    """(id → record for the sendable customers, id → reasons for the held-back ones)."""
    frame, encoded, gate = prepare_contacts(customer_columns(customers, mapping.loyalty_fields), mapping)
    ids = [str(i) for i in frame["id"]]
    held = {ids[row]: "; ".join(f["message"] for f in fails) for row, fails in gate.failures.items()}
    return {i: json.loads(body) for i, body in zip(ids, encoded) if i not in held}, held


def _flat(record: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def render_preview(customers: list[dict], mapping: ContactMapping) -> str:
    records, held = payloads(customers, mapping)
    columns = customer_columns(customers, mapping.loyalty_fields)
    blocks = []
    for position, customer in enumerate(customers):
        cid = str(customer.get("id"))
        lines = [f"── customer {cid} ─ " + ("READY" if cid in records else f"HELD BACK: {held.get(cid, '')}")]
        flat = _flat(records.get(cid, {}))
        for field in mapping.fields:
            antavo = columns.iloc[position][field.loyalty_field]
            target = f"properties.{field.remote_field}" if mapping.settings.v2 and not field.builtin else field.remote_field
            sent = flat.get(target, "(left out)")
            lines.append(f"  {field.loyalty_field:36} {_show(antavo):28} → {target:30} {_show(sent)}")
        if cid in records:
            lines.append("  record: " + json.dumps(records[cid], ensure_ascii=False))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


ROW_COLUMNS = ("loyalty_field", "format", "overwrite_empty")  # a row is known by its remote field, mapped once


@dataclass(frozen=True)
class RowChange:
    """One row of the mapping table that differs: added, removed, or changed in some of its columns."""

    remote_field: str
    kind: str  # "+", "-" or "~"
    before: FieldMapping | None
    after: FieldMapping | None
    columns: tuple[tuple[str, str, str], ...] = ()  # (column, old cell, new cell) of a changed row


def _cells(field: FieldMapping) -> dict[str, str]:
    return {"loyalty_field": field.loyalty_field, "format": field.format,
            "overwrite_empty": "yes" if field.overwrite_empty else "no"}


def row_changes(before: ContactMapping, after: ContactMapping) -> list[RowChange]:
    """The rows that differ, matched by remote field, in the order of the edited table (removed ones last)."""
    old = {f.remote_field: f for f in before.fields}
    new = {f.remote_field: f for f in after.fields}
    changes = []
    for remote in [*new, *(r for r in old if r not in new)]:
        a, b = old.get(remote), new.get(remote)
        if a is None or b is None:
            changes.append(RowChange(remote, "+" if a is None else "-", a, b))
            continue
        columns = tuple((c, _cells(a)[c], _cells(b)[c]) for c in ROW_COLUMNS if _cells(a)[c] != _cells(b)[c])
        if columns:
            changes.append(RowChange(remote, "~", a, b, columns))
    return changes


def _target(mapping: ContactMapping, field: FieldMapping) -> str:
    """Where the field's value sits in the flattened record."""
    return f"properties.{field.remote_field}" if mapping.settings.v2 and not field.builtin else field.remote_field


NOT_SENT, HELD_BACK = "(not sent)", "(held back)"


def _sent(cid: str, records: dict[str, dict], held: dict[str, str], key: str | None) -> str:
    if cid in held:
        return HELD_BACK
    value = _flat(records.get(cid, {})).get(key, NOT_SENT) if key else NOT_SENT
    return value if value == NOT_SENT else _show(value, 40, quote=True)


def _row_lines(change: RowChange, before: ContactMapping, after: ContactMapping, ids: list[str],
               old: tuple[dict, dict], new: tuple[dict, dict], examples: int) -> list[str]:
    """A row's change, column by column, and what it does to the same sample customers."""
    field = change.after or change.before
    if change.kind == "~":
        lines = [f"  ~ row {change.remote_field} (line {field.line}): "
                 + "; ".join(f"{column} {a or '(empty)'} → {b or '(empty)'}" for column, a, b in change.columns)]
    else:
        lines = [f"  {change.kind} row {field.loyalty_field} → {change.remote_field}"]
    key_old = _target(before, change.before) if change.before else None
    key_new = _target(after, change.after) if change.after else None
    pairs = [(cid, _sent(cid, *old, key_old), _sent(cid, *new, key_new)) for cid in ids]
    differ = [(cid, a, b) for cid, a, b in pairs if a != b]
    if not differ:
        lines.append(f"      the same value for all {len(ids)} sample customers")
        return lines
    lines.append(f"      {len(differ)} of {len(ids)} sample customers get another value (old mapping → new):")
    lines += [f"        {cid}: {a} → {b}" for cid, a, b in differ[:examples]]
    return lines


def render_diff(customers: list[dict], before: ContactMapping, after: ContactMapping, examples: int = 3) -> str:
    """What the edited mapping changes: each changed row column by column, with the values the same sample
    customers get from the old and the new mapping, then every record field that changes and in how many."""
    old, old_held = payloads(customers, before)
    new, new_held = payloads(customers, after)
    ids = [str(c.get("id")) for c in customers]
    rows = row_changes(before, after)
    lines = [f"mapping {before.version} → {after.version} "
             f"({before.settings.payload_mode} → {after.settings.payload_mode} mode)"]
    lines += _settings_lines(before, after)
    for change in rows:
        lines += _row_lines(change, before, after, ids, (old, old_held), (new, new_held), examples)
    lines += _dropped_lines(rows)
    shown = {_target(m, f) for c in rows for m, f in ((before, c.before), (after, c.after)) if f is not None}
    changes = _field_changes(old, new, shown, examples)
    lines.append(f"On {len(customers)} sample customers: {changes.records} records change; "
                 f"held back {len(old_held)} → {len(new_held)}.")
    for (key, kind), count in sorted(changes.counts.items()):
        lines.append(f"  {kind:8} {key:40} in {count} records")
        lines += [f"      {example}" for example in changes.samples[(key, kind)]]
    if before.version != after.version:
        lines.append("The mapping version changes: the next run re-sends every contact.")
    return "\n".join(lines)


def _settings_lines(before: ContactMapping, after: ContactMapping) -> list[str]:
    """The settings that shape payloads and differ."""
    old, new = asdict(before.settings), asdict(after.settings)
    return [f"  ~ settings {name}: {_show(old[name], 40, True)} → {_show(new[name], 40, True)}"
            for name in PAYLOAD_SETTINGS if old[name] != new[name]]


def _dropped_lines(rows: list[RowChange]) -> list[str]:
    dropped = [c.remote_field for c in rows if c.kind == "-"]
    if not dropped:
        return []
    return [f"  Removing a row stops sending {', '.join(dropped)}, but does not clear what Ometria already "
            "holds (a push merges). To clear it, keep the row with overwrite_empty = yes and map a field that "
            "is empty, or clear the field in Ometria."]


@dataclass
class FieldChanges:
    """Record fields that change between two mappings' records: how often, with examples, and in how many records."""

    counts: Counter  # (field, "added"/"removed"/"changed") → records
    samples: dict[tuple[str, str], list[str]]
    records: int


def _change_kind(key: str, old: dict, new: dict) -> str | None:
    """How a flattened record field changes ("added", "removed", "changed"); None when it does not."""
    if key not in old:
        return "added"
    if key not in new:
        return "removed"
    return "changed" if old[key] != new[key] or type(old[key]) is not type(new[key]) else None


def _field_changes(old: dict[str, dict], new: dict[str, dict], shown: set[str], examples: int) -> FieldChanges:
    """Every record field that changes, with up to `examples` customers for each one no row change has shown."""
    result = FieldChanges(Counter(), {}, 0)
    for cid in sorted(set(old) | set(new)):
        a, b = _flat(old.get(cid, {})), _flat(new.get(cid, {}))
        kinds = [(key, _change_kind(key, a, b)) for key in sorted(set(a) | set(b))]
        differs = [(key, kind) for key, kind in kinds if kind is not None]
        for key, kind in differs:
            result.counts[(key, kind)] += 1
            found = result.samples.setdefault((key, kind), [])
            if key not in shown and len(found) < examples:
                found.append(f"{cid}: {_sent(cid, old, {}, key)} → {_sent(cid, new, {}, key)}")
        result.records += bool(differs)
    return result


def _show(value: object, limit: int = 28, quote: bool = False) -> str:
    """A value as the analyst reads it; with `quote`, as JSON, so that 26 and "26" look different."""
    text = json.dumps(value, ensure_ascii=False) if quote or not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 1] + "…"
