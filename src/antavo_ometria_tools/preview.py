"""What a mapping does, shown to the analyst who edits it: samples side by side, and mapping diffs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from antavo_ometria.antavo.records import normalise_customer
from antavo_ometria.sync.mapping import ContactMapping
from antavo_ometria.sync.prepare import prepare_contacts
from antavo_ometria.sync.transform import customer_columns


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


def render_diff(customers: list[dict], before: ContactMapping, after: ContactMapping, examples: int = 3) -> str:
    old, old_held = payloads(customers, before)
    new, new_held = payloads(customers, after)
    changes: Counter = Counter()
    shown: dict[str, list[str]] = {}
    changed_records = 0
    for cid in sorted(set(old) | set(new)):
        a, b = _flat(old.get(cid, {})), _flat(new.get(cid, {}))
        differs = False
        for key in sorted(set(a) | set(b)):
            if a.get(key, "∅") == b.get(key, "∅"):
                continue
            differs = True
            kind = "added" if key not in a else "removed" if key not in b else "changed"
            changes[(key, kind)] += 1
            shown.setdefault(f"{kind} {key}", [])
            if len(shown[f"{kind} {key}"]) < examples:
                shown[f"{kind} {key}"].append(f"{cid}: {_show(a.get(key, '∅'))} → {_show(b.get(key, '∅'))}")
        changed_records += differs
    before_rows = {(f.loyalty_field, f.remote_field, f.format, f.overwrite_empty) for f in before.fields}
    after_rows = {(f.loyalty_field, f.remote_field, f.format, f.overwrite_empty) for f in after.fields}
    lines = [f"mapping {before.version} → {after.version} "
             f"({before.settings.payload_mode} → {after.settings.payload_mode} mode)"]
    lines += [f"  - row {r[0]} → {r[1]}" for r in sorted(before_rows - after_rows)]
    lines += [f"  + row {r[0]} → {r[1]}" for r in sorted(after_rows - before_rows)]
    dropped = sorted({r[1] for r in before_rows} - {r[1] for r in after_rows})
    if dropped:
        lines.append(f"  Removing a row stops sending {', '.join(dropped)}, but does not clear what Ometria already "
                     "holds (a push merges). To clear it, keep the row with overwrite_empty = yes and map a field that "
                     "is empty, or clear the field in Ometria.")
    lines.append(f"On {len(customers)} sample customers: {changed_records} records change; "
                 f"held back {len(old_held)} → {len(new_held)}.")
    for (key, kind), count in sorted(changes.items()):
        lines.append(f"  {kind:8} {key:40} in {count} records")
        lines += [f"      {example}" for example in shown[f"{kind} {key}"]]
    if before.version != after.version:
        lines.append("The mapping version changes: the next run re-sends every contact.")
    return "\n".join(lines)


def _show(value: object, limit: int = 28) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 1] + "…"
