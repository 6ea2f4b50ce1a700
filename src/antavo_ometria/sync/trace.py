"""One customer's story: "did Ometria get her, when, with what, and if not, why?"

For an Antavo customer id or email: what the current mapping makes of her today (read live from Antavo,
or from the latest staging file that holds her when Antavo cannot be reached), field by field with the
quality checks' verdicts; what was last sent to Ometria (when, by which run and mapping version, the
request id, and the fields that differ from what the mapping produces now); every time she was held back
or rejected, and whether she still is; her events per trigger rule; and one closing line in plain words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from antavo_ometria.antavo.client import AntavoClient
from antavo_ometria.antavo.records import HELD, NOT_FOUND
from antavo_ometria.ometria.payload import payload_hash
from antavo_ometria.sync.contacts.prepare import prepare_contacts
from antavo_ometria.sync.contacts.staged_files import CUSTOMERS
from antavo_ometria.sync.contacts.transform import customer_columns
from antavo_ometria.sync.store.state import DEFERRED, OWED, StateStore
from antavo_ometria.sync.tables.mapping import ContactMapping
from antavo_ometria.transport import ApiError


@dataclass
class Trace:
    query: str
    customer_id: str | None
    source: str  # where today's data came from
    fields: list[dict] = field(default_factory=list)  # remote field, loyalty field, Antavo value, Ometria value, verdict
    record: dict | None = None  # the Ometria record the mapping makes of her now
    problems: list[str] = field(default_factory=list)  # why the quality gate holds her back now
    last_sent: dict | None = None
    differs: list[str] = field(default_factory=list)  # fields of the last sent record that differ from now
    history: list[dict] = field(default_factory=list)  # held back or rejected, newest first
    events: list[dict] = field(default_factory=list)
    verdict: str = ""
    record_hash: str | None = None


CONTACT_KINDS = ("quarantined", "failed", "rejected")


def trace(query: str, store: StateStore, mapping: ContactMapping, antavo: AntavoClient | None = None,
          staging_root: Path | None = None) -> Trace:
    """Everything the sync knows of one customer, with a closing verdict."""
    query = query.strip()
    if not query:
        raise ValueError("give an Antavo customer id or email")
    customer, source, customer_id, reachable = _find(query, antavo, staging_root, mapping)
    result = Trace(query, customer_id, source)
    if customer_id is None:
        result.verdict = (f"Antavo has no customer with the email {query!r}" if "@" in query and reachable else
                          f"never seen by the sync: no customer {query!r} in Antavo or in the staging files")
        return result
    if customer is not None:
        _today(result, customer, mapping)
    result.last_sent = store.contacts.get(customer_id)
    result.history = store.held.find(antavo_id=customer_id, kind=CONTACT_KINDS, history=True, limit=50)
    result.events = _events(store, customer_id)
    sent = result.last_sent
    if sent and sent.get("payload") and result.record:
        result.differs = _differences(sent["payload"], result.record)
    result.verdict = _verdict(result, customer, reachable)
    return result


def _find(query: str, antavo: AntavoClient | None, staging_root: Path | None, mapping: ContactMapping):
    """(customer, where it came from, customer id, whether Antavo answered): live from Antavo, else from the
    newest staging file that holds her."""
    unreachable = "no Antavo connection"
    if antavo is not None:
        try:
            ids = antavo.ids_by_email(query) if "@" in query else [query]
            customers = antavo.get_customers(ids[:1], mapping.loyalty_fields)
        except ApiError as exc:
            unreachable = f"Antavo could not be read ({exc})"
        else:
            if not ids:
                return None, "Antavo (live)", None, True
            live = f"Antavo (live, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC)"
            if len(ids) > 1:
                live += f"; the email belongs to {len(ids)} customers ({', '.join(ids)}): this is {ids[0]}"
            return (None if customers[0].get(NOT_FOUND) else customers[0]), live, ids[0], True
    found = _from_staging(query, staging_root)
    if found is None:
        return None, f"{unreachable}; no staging file holds {query!r}", None if "@" in query else query, False
    customer, path = found
    when = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    return customer, f"{unreachable}; staging file {path} of {when:%Y-%m-%d %H:%M} UTC", customer.get("id"), False


def _from_staging(query: str, staging_root: Path | None) -> tuple[dict, Path] | None:
    if staging_root is None or not staging_root.exists():
        return None
    key = "email" if "@" in query else "id"
    needle = json.dumps(query, ensure_ascii=False)
    for path in sorted(staging_root.glob(f"*/*/{CUSTOMERS}"), key=lambda p: p.stat().st_mtime, reverse=True):
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if needle in line:
                    customer = json.loads(line)
                    if customer.get(key) == query:
                        return customer, path
    return None


def _today(result: Trace, customer: dict, mapping: ContactMapping) -> None:
    columns = customer_columns([customer], [*mapping.loyalty_fields, HELD])
    frame, encoded, gate = prepare_contacts(columns, mapping)
    result.record = json.loads(encoded[0])
    failures = gate.failures.get(0, [])
    result.problems = [f["message"] for f in failures]
    for f in mapping.fields:
        mine = [x["message"] for x in failures if x.get("field") == f.remote_field]
        result.fields.append({"remote_field": f.remote_field, "loyalty_field": f.loyalty_field,
                              "antavo": columns.iloc[0][f.loyalty_field], "ometria": frame.iloc[0][f.remote_field],
                              "verdict": "; ".join(mine) or "ok"})
    result.record_hash = payload_hash(encoded[0])


def _events(store: StateStore, customer_id: str) -> list[dict]:
    """Her events: what was pushed or skipped, then those held back (the newest verdict per event only: an
    event re-read in the overlap is held again by each run)."""
    done = store.events.of_customer(customer_id)
    events = [{"event_id": e["event_id"], "rule": e["rule"], "when": e["event_time"], "status": e["status"]
               + (" (late: no automation)" if e["late"] and e["status"] == "sent" else "")} for e in done]
    seen = {e["event_id"] for e in done}
    kinds = ("event_held", "event_rejected", "event_expired", "event_answer_lost")
    for held in store.held.find(antavo_id=customer_id, kind=kinds, history=True, limit=200):
        if held["antavo_id"] not in seen:
            seen.add(held["antavo_id"])
            events.append({"event_id": held["antavo_id"], "rule": held["run_id"].rsplit(":", 1)[-1],
                           "when": (json.loads(held["payload"]) if held.get("payload") else {}).get("timestamp"),
                           "status": "held: " + "; ".join(held["reasons"])})
    return events


def _differences(sent: dict, now: dict) -> list[str]:
    flat_sent, flat_now = _flat(sent), _flat(now)
    return [f"{key}: {flat_sent.get(key, '∅')!r} → {flat_now.get(key, '∅')!r}"
            for key in sorted(set(flat_sent) | set(flat_now)) if flat_sent.get(key, "∅") != flat_now.get(key, "∅")]


def _flat(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _verdict(result: Trace, customer: dict | None, reachable: bool) -> str:
    sent = result.last_sent
    last = f"last sent {sent['synced_at']:%Y-%m-%d %H:%M} UTC by run {sent['run_id']}" if sent else "never sent"
    if customer is None:
        if not reachable:
            return f"unknown today: Antavo could not be read and no staging file holds her ({last})"
        if sent:
            return f"sent before, but Antavo no longer has her: nothing more is sent ({last})"
        return f"never seen by the sync: Antavo has no customer {result.customer_id}"
    if result.problems:
        return f"held back: {'; '.join(result.problems)}"
    if sent is None:
        return "not sent yet: she is new since the last run, or not among the customers a full load reads"
    if sent["status"] in OWED:
        if sent["payload_hash"] != result.record_hash:
            return f"changed since her last try: the next run sends it ({_owed(sent)})"
        return _owed(sent)
    if sent["status"] == "left":
        return f"left the programme: removed from the list {sent['synced_at']:%Y-%m-%d %H:%M} UTC"
    current = sent.get("accepted_hash") == result.record_hash
    if current:
        return f"sent and current ({last})"
    return "sent, but changed since: the next run sends it"


def _owed(sent: dict) -> str:
    """A contact Ometria has not accepted yet: why, when it is tried next, and what to do."""
    reason = sent.get("reason") or ("rejected by Ometria" if sent["status"] == "rejected" else "not delivered")
    retry = sent.get("retry_at")
    when = f"tried again from {retry:%Y-%m-%d %H:%M} UTC" if retry else "tried again by the next run"
    if sent["status"] == DEFERRED:
        return f"owed: {reason}; {when}"
    return (f"owed: {reason} ({sent.get('attempts', 0)} tries); {when}. "
            "If Ometria refuses it for a field, fix the field in Ometria or its row in contacts.csv; "
            "`make run CONF='{\"reconcile\": true}'` retries every owed contact now")


def format_trace(t: Trace) -> str:
    lines = [f"Customer {t.customer_id or t.query}", f"  today, from {t.source}"]
    if t.fields:
        lines.append(f"    {'Ometria field':24} {'loyalty field':32} {'Antavo value':24} {'Ometria value':24} check")
        for f in t.fields:
            lines.append(f"    {f['remote_field']:24} {f['loyalty_field']:32} {_short(f['antavo']):24} "
                         f"{_short(f['ometria']):24} {f['verdict']}")
    for problem in t.problems:
        lines.append(f"    held back: {problem}")
    sent = t.last_sent
    if sent:
        lines.append(f"  last sent {sent['synced_at']:%Y-%m-%d %H:%M:%S} UTC by run {sent['run_id']}, mapping "
                     f"{sent['mapping_version']}, Ometria request {sent['request_id'] or '—'} ({sent['status']})")
        lines += [f"    differs now: {d}" for d in t.differs] or (["    the same as the mapping makes now"]
                                                                   if sent.get("payload") else [])
    else:
        lines.append("  never sent to Ometria")
    for h in t.history:
        state = f"released {h['released_at']:%Y-%m-%d %H:%M}" if h["released_at"] else "not released"
        lines.append(f"  {h['created_at']:%Y-%m-%d %H:%M} {h['kind']:11} run {h['run_id']}: "
                     f"{'; '.join(h['reasons'])} [{state}]")
    for e in t.events:
        lines.append(f"  event {e['event_id']} ({e['rule']}) at {e['when']}: {e['status']}")
    lines.append(f"→ {t.verdict}")
    return "\n".join(lines)


def _short(value: object, limit: int = 24) -> str:
    text = "∅" if value is None else value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"
