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

from antavo_ometria.antavo.client import AntavoClient
from antavo_ometria.antavo.records import HELD, event_time
from antavo_ometria.ometria.client import OmetriaClient
from antavo_ometria.ometria.contract import LATE_AFTER, hours
from antavo_ometria.ometria.payload import encode_record
from antavo_ometria.ometria.push import batches, push_isolating, record_status
from antavo_ometria.sync.event_rules import Rule, custom_event, stagger, unsendable
from antavo_ometria.sync.load import remember_sent
from antavo_ometria.sync.mapping import ContactMapping
from antavo_ometria.sync.prepare import prepare_contacts
from antavo_ometria.sync.state import StateStore
from antavo_ometria.sync.transform import customer_columns

log = logging.getLogger(__name__)

OVERLAP = timedelta(minutes=15)  # re-read this much before the cursor; pushed events are skipped by ID


class EventsNotDelivered(Exception):
    """Some events could not be pushed; the rule's cursor stays before them, so the next try sends them."""

    retryable = True


def new_matching_events(client: AntavoClient, action: str, since: datetime, until: datetime) -> list[dict]:
    """Events of `action` with a timestamp after `since` and before `until` (and those of `action` too broken
    to have a timestamp: they are held back with the reason)."""
    matching = [e for page in client.iter_events(since, until) for e in page
                if e["action"] == action and (e["timestamp"] is None or event_time(e) > since)]
    return list({e["id"] or id(e): e for e in matching}.values())  # an event listed twice is one event


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
    """Push the rule's new events. Raises EventsNotDelivered, after recording what was delivered, when
    some could not be pushed; the cursor never moves past an event that was neither delivered nor held."""
    now = now or datetime.now(UTC)
    until = until or now
    cursor = store.event_cursor(rule.name) or now - LATE_AFTER
    events = new_matching_events(antavo, rule.action, cursor - OVERLAP, until)
    done = store.pushed_event_ids([e["id"] for e in events if e["id"]])
    fresh = [e for e in events if e["id"] not in done or not e["id"]]
    summary = {"rule": rule.name, "event_type": rule.event_type, "matched": len(events),
               "already_pushed": len(events) - len(fresh), "sent": 0, "accepted": 0, "rejected": 0,
               "late": 0, "skipped_late": 0, "held": 0, "failed": 0, "failure": None, "contacts_pushed_first": 0,
               "since": (cursor - OVERLAP).isoformat(), "until": until.isoformat()}
    undelivered: list[dict] = []
    if fresh:
        outcome, undelivered = _deliver_fresh(rule, fresh, antavo, ometria, store, mapping, run_id, late_policy, now)
        summary |= outcome
    moments = [event_time(e) for e in (undelivered or events) if e["timestamp"] is not None]
    if moments:
        # past every event when all were delivered or held; otherwise just before the first undelivered one
        store.set_event_cursor(rule.name, min(moments) - timedelta(microseconds=1) if undelivered else max(moments))
    log.info("rule %s: %s", rule.name, summary)
    if undelivered:
        raise EventsNotDelivered(f"{len(undelivered)} {rule.event_type} event(s) were not delivered "
                                 f"({summary['failure']}); the next try sends them. {format_summary(summary)}")
    return summary


def _deliver_fresh(rule, events, antavo, ometria, store, mapping, run_id, late_policy, now) -> tuple[dict, list]:
    """Deliver events not pushed yet: (summary, the events that could not be delivered)."""
    customer_ids = sorted({e["customer_id"] for e in events if HELD not in e})
    paths = sorted(set(mapping.loyalty_fields) | set(rule.customer_paths) | {HELD})
    customers = {c["id"]: c for c in antavo.get_customers(customer_ids, paths)}
    frame, encoded, gate = prepare_contacts(customer_columns(list(customers.values()), paths), mapping)
    ids = frame["id"].tolist()
    reasons = {ids[row]: "; ".join(f["message"] for f in fails) for row, fails in gate.failures.items()}
    contacts = _push_unknown_contacts(store, ometria, mapping, run_id,
                                      [(ids[i], encoded[i]) for i in range(len(ids)) if gate.valid.iloc[i]])
    reasons |= {i: "Ometria rejected the contact" for i in contacts["rejected"]}
    identities = {row["id"]: {k: v for k, v in (("identity_email", row.get("email")),
                                                 ("identity_account_id", row.get("customer_id"))) if v}
                  for row in frame.to_dict("records")}
    deliverable = {e["customer_id"] for e in events
                   if HELD not in e and e["customer_id"] in customers and e["customer_id"] not in reasons}
    rewards = {cid: {r.get("id"): r for r in antavo.get_claimed_rewards(cid)}
               for cid in sorted(deliverable)} if rule.needs_rewards else {}

    late_cut = now - LATE_AFTER
    sendable, held, skipped, failed = [], [], [], []
    for event in events:
        cid = event["customer_id"]
        if HELD in event:
            held.append((event, "; ".join(event[HELD])))
        elif cid in contacts["failed"]:
            failed.append(event)  # its contact could not be pushed first: sent with it on the next try
        elif cid not in deliverable:
            held.append((event, f"customer {cid}: {reasons.get(cid, 'not found in Antavo')}"))
        elif event_time(event) < late_cut and late_policy == "skip":
            skipped.append(event)
        else:
            sendable.append(event)
    late = sum(event_time(e) < late_cut for e in sendable)
    if late:
        log.warning("%d %s event(s) are over %s old: Ometria will not start an automation for them",
                    late, rule.event_type, hours(LATE_AFTER))
    language = mapping.settings.language
    stamps = stagger([event_time(e) for e in sendable])
    built = []
    for event, stamp in zip(sendable, stamps):
        props = event.get("properties", {})
        reward = rewards.get(event["customer_id"], {}).get(props.get("reward") or props.get("reward_id"))
        record = custom_event(rule, event, customers[event["customer_id"]], reward, identities[event["customer_id"]],
                              language, stamp)
        problems = unsendable(record)
        if problems:
            held.append((event, "; ".join(problems)))
        else:
            built.append((event, encode_record(record)))
    sent = accepted = rejected = 0
    failure = contacts["error"]
    by_id = {e["id"]: e for e, _ in built}
    for ids_, bodies in batches((e["id"], body) for e, body in built):
        # not isolated by halving: that would push the accepted events of the batch again
        for entry in push_isolating(ometria, ids_, bodies, record_type="custom_event", isolate=False):
            status = record_status(entry)
            if status == "failed":  # left unrecorded (and the cursor before it) so that the next try sends it
                failed += [by_id[i] for i in entry["ids"]]
                failure = entry.get("error")
                continue
            sent += len(entry["ids"])
            accepted += entry["accepted"]
            rejected += entry["rejected"]
            if entry["rejected"]:
                log.warning("Ometria rejected %d of %d %s event(s) (%s); its reasons are at /v2/push/_errors",
                            entry["rejected"], len(entry["ids"]), rule.event_type, entry.get("error") or "")
            store.record_events([_event_row(rule, by_id[i], status, late_cut, entry["request_id"], run_id)
                                 for i in entry["ids"]])
    store.record_events([_event_row(rule, e, "skipped_late", late_cut, None, run_id) for e in skipped])
    store.clear_held(f"{run_id}:{rule.name}", "event_held")
    store.release_held([e["id"] for e in events], ("event_held",))  # held again below if they still must be
    if held:
        log.warning("%d %s event(s) held back: %s", len(held), rule.event_type,
                    "; ".join(f"{e['id'] or '?'}: {why}" for e, why in held[:5]))
        store.record_held(f"{run_id}:{rule.name}", "event_held", [
            {"id": e["id"], "customer_id": e["customer_id"], "reasons": [why], "payload": e} for e, why in held])
    return {"sent": sent, "accepted": accepted, "rejected": rejected, "late": late, "skipped_late": len(skipped),
            "held": len(held), "failed": len(failed), "failure": failure,
            "contacts_pushed_first": len(contacts["sent"])}, failed


def _push_unknown_contacts(store, ometria, mapping, run_id, contacts: list[tuple[str, bytes]]) -> dict:
    """Push the contacts Ometria has not received from us yet, so their events find a profile.

    Returns the ids that were sent, rejected and not delivered, and the last delivery error."""
    known = store.sent_hashes([i for i, _ in contacts])
    unknown = [(i, body) for i, body in contacts if i not in known]
    outcome: dict = {"sent": [], "rejected": [], "failed": [], "error": None}
    for ids, bodies in batches(unknown):
        entries = push_isolating(ometria, ids, bodies)
        remember_sent(store, entries, mapping.version, run_id, dict(zip(ids, bodies)))
        for entry in entries:
            outcome[record_status(entry)] += entry["ids"]
            outcome["error"] = entry.get("error") or outcome["error"]
    if unknown:
        log.info("pushed %d contact(s) first: their events refer to customers Ometria did not have; %d not delivered",
                 len(outcome["sent"]), len(outcome["failed"]))
    return outcome


def _event_row(rule: Rule, event: dict, status: str, late_cut: datetime, request_id, run_id: str) -> dict:
    moment = event_time(event)
    return {"event_id": event["id"], "rule": rule.name, "event_type": rule.event_type,
            "customer_id": event["customer_id"], "event_time": moment, "late": moment < late_cut,
            "status": status, "request_id": request_id, "run_id": run_id}


def format_summary(summary: dict) -> str:
    return (f"{summary['rule']} → {summary['event_type']}: {summary['matched']} matching event(s), "
            f"{summary['already_pushed']} already pushed, {summary['sent']} sent ({summary['accepted']} accepted, "
            f"{summary['rejected']} rejected), {summary['late']} late, {summary['skipped_late']} skipped as late, "
            f"{summary['held']} held back, {summary['failed']} not delivered, "
            f"{summary['contacts_pushed_first']} contact(s) pushed first")

