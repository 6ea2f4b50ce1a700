"""Event triggers: matching Antavo events → Ometria custom events, each pushed exactly once.

For one rule: read the Antavo events of its action since the rule's cursor (with an overlap), drop
those already pushed (state store), look up each customer and, where the rule needs it, the claimed
reward; push the contact first for a customer Ometria has not received yet; apply Ometria's timing
rules (an event over 4 hours old cannot start an automation: send and warn, or skip; more than 1,000
events on one timestamp are staggered in 5-minute steps); push the events in batches of custom
events only; remember them and move the cursor.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from antavo_ometria.antavo import AntavoClient
from antavo_ometria.event_rules import LATE_AFTER, Rule, custom_event, event_timestamp, stagger
from antavo_ometria.mapping import ContactMapping
from antavo_ometria.ometria import OmetriaClient, batches, encode_record
from antavo_ometria.pipeline import prepare_contacts, push_isolating, remember_sent
from antavo_ometria.state import StateStore, payload_hash
from antavo_ometria.transform import customer_columns

log = logging.getLogger(__name__)

OVERLAP = timedelta(minutes=15)  # re-read this much before the cursor; pushed events are skipped by ID


def new_matching_events(client: AntavoClient, action: str, since: datetime, until: datetime) -> list[dict]:
    """Events of `action` with a timestamp after `since` and before `until`."""
    return [e for page in client.iter_events(since, until) for e in page
            if e["action"] == action and event_timestamp(e) > since]


def deliver(
    rule: Rule,
    antavo: AntavoClient,
    ometria: OmetriaClient,
    store: StateStore,
    mapping: ContactMapping,
    run_id: str,
    until: datetime | None = None,
    late_policy: str = "send",
    now: datetime | None = None,
) -> dict:
    now = now or datetime.now(UTC)
    until = until or now
    cursor = store.event_cursor(rule.name) or now - LATE_AFTER
    events = new_matching_events(antavo, rule.action, cursor - OVERLAP, until)
    done = store.pushed_event_ids([e["id"] for e in events])
    fresh = [e for e in events if e["id"] not in done]
    summary = {"rule": rule.name, "event_type": rule.event_type, "matched": len(events),
               "already_pushed": len(events) - len(fresh), "sent": 0, "accepted": 0, "rejected": 0,
               "late": 0, "skipped_late": 0, "held": 0, "contacts_pushed_first": 0,
               "since": (cursor - OVERLAP).isoformat(), "until": until.isoformat()}
    if fresh:
        summary |= _deliver_fresh(rule, fresh, antavo, ometria, store, mapping, run_id, late_policy, now)
    if events:
        store.set_event_cursor(rule.name, max(event_timestamp(e) for e in events))
    log.info("rule %s: %s", rule.name, summary)
    return summary


def _deliver_fresh(rule, events, antavo, ometria, store, mapping, run_id, late_policy, now) -> dict:
    customer_ids = sorted({e["customer_id"] for e in events})
    customers = {c["id"]: c for c in antavo.get_customers(customer_ids)}
    paths = sorted(set(mapping.loyalty_fields) | set(rule.customer_paths))
    frame, encoded, gate = prepare_contacts(customer_columns(list(customers.values()), paths), mapping)
    ids = frame["id"].tolist()
    valid = dict(zip(ids, gate.valid))
    reasons = {ids[row]: "; ".join(f["message"] for f in fails) for row, fails in gate.failures.items()}
    contacts_pushed = _push_unknown_contacts(
        store, ometria, mapping, run_id, [(ids[i], encoded[i]) for i in range(len(ids)) if gate.valid.iloc[i]])
    identities = {row["id"]: {k: v for k, v in (("identity_email", row.get("email")),
                                                 ("identity_account_id", row.get("customer_id"))) if v}
                  for row in frame.to_dict("records")}
    rewards = {cid: {r.get("id"): r for r in antavo.get_claimed_rewards(cid)} for cid in customer_ids
               } if rule.needs_rewards else {}

    late_cut = now - LATE_AFTER
    sendable, held, skipped = [], [], []
    for event in events:
        cid = event["customer_id"]
        if cid not in customers or not valid.get(cid):
            held.append((event, reasons.get(cid, "the customer was not found in Antavo")))
        elif event_timestamp(event) < late_cut and late_policy == "skip":
            skipped.append(event)
        else:
            sendable.append(event)
    late = sum(event_timestamp(e) < late_cut for e in sendable)
    if late:
        log.warning("%d %s event(s) are over 4 hours old: Ometria will not start an automation for them",
                    late, rule.event_type)
    language = mapping.settings.language
    stamps = stagger([event_timestamp(e) for e in sendable])
    built = []
    for event, stamp in zip(sendable, stamps):
        props = event.get("properties", {})
        reward = rewards.get(event["customer_id"], {}).get(props.get("reward") or props.get("reward_id"))
        built.append((event, encode_record(custom_event(rule, event, customers[event["customer_id"]], reward,
                                                         identities[event["customer_id"]], language, stamp))))
    sent = accepted = rejected = 0
    by_id = {e["id"]: e for e, _ in built}
    for ids, bodies in batches((e["id"], body) for e, body in built):
        for entry in push_isolating(ometria, ids, bodies):
            status = "sent" if entry["status"] == "OK" and not entry.get("rejected") else (
                "rejected" if entry["status"] == "OK" else None)
            if status is None:  # not delivered: leave unrecorded so the next run tries again
                continue
            sent += len(entry["ids"])
            accepted += entry["accepted"]
            rejected += entry["rejected"]
            store.record_events([_event_row(rule, by_id[i], status, late_cut, entry["request_id"], run_id)
                                 for i in entry["ids"]])
    store.record_events([_event_row(rule, e, "skipped_late", late_cut, None, run_id) for e in skipped])
    store.clear_held(f"{run_id}:{rule.name}", "event_held")
    if held:
        store.record_held(f"{run_id}:{rule.name}", "event_held", [
            {"id": e["id"], "reasons": [f"customer {e['customer_id']}: {why}"], "payload": e} for e, why in held])
    return {"sent": sent, "accepted": accepted, "rejected": rejected, "late": late, "skipped_late": len(skipped),
            "held": len(held), "contacts_pushed_first": contacts_pushed}


def _push_unknown_contacts(store, ometria, mapping, run_id, contacts: list[tuple[str, bytes]]) -> int:
    """Push the contacts Ometria has not received from us yet, so their events find a profile."""
    known = store.sent_hashes([i for i, _ in contacts])
    unknown = [(i, body) for i, body in contacts if i not in known]
    plan = {"mapping_version": mapping.version, "run_id": run_id}
    hashes = {i: payload_hash(body) for i, body in unknown}
    for ids, bodies in batches(unknown):
        entries = push_isolating(ometria, ids, bodies)
        remember_sent(store, entries, hashes, plan)
    if unknown:
        log.info("pushed %d contact(s) first: their events refer to customers Ometria did not have", len(unknown))
    return len(unknown)


def _event_row(rule: Rule, event: dict, status: str, late_cut: datetime, request_id, run_id: str) -> dict:
    moment = event_timestamp(event)
    return {"event_id": event["id"], "rule": rule.name, "event_type": rule.event_type,
            "customer_id": event["customer_id"], "event_time": moment, "late": moment < late_cut,
            "status": status, "request_id": request_id, "run_id": run_id}


def format_summary(summary: dict) -> str:
    return (f"{summary['rule']} → {summary['event_type']}: {summary['matched']} matching event(s), "
            f"{summary['already_pushed']} already pushed, {summary['sent']} sent ({summary['accepted']} accepted, "
            f"{summary['rejected']} rejected), {summary['late']} late, {summary['skipped_late']} skipped as late, "
            f"{summary['held']} held back, {summary['contacts_pushed_first']} contact(s) pushed first")

