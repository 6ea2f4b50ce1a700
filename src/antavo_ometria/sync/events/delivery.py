"""Event triggers: matching Antavo events → Ometria custom events, each pushed once when Ometria's answer arrives.

For one rule: read the Antavo events of its action over Ometria's 4-hour window (or from the rule's cursor, when
catching up from further back), drop those the rule already pushed (state store, by the rule's own id
`<rule>:<Antavo event id>`), look up each customer and, where the rule needs it, the claimed reward; push the
contact first for a customer Ometria has not received yet; apply Ometria's timing rules (an event over 4 hours old
cannot start an automation: send and warn, or skip; more than 1,000 events on one second, counting those earlier
deliveries sent with that timestamp, are staggered in 5-minute steps); push each event on its own, record the
accepted ones, hold the rejected ones (retried while they can still start an automation, then held as expired) and
move the cursor. A push whose answer was lost (a timeout, a dropped connection, a gateway's 502 or 504: Ometria may
have stored it) is not sent again in that delivery: it is held as `event_answer_lost` with the reason, the delivery
fails, and the next one sends it again with the same id and counts it as re-sent after a lost answer. An event held
for its contact (Ometria rejected it, the quality gate held it back) stays owed whatever its age: once Ometria has
accepted the contact, the next delivery sends the event from the state store, under the late-event policy.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from antavo_ometria.antavo.client import AntavoClient
from antavo_ometria.antavo.records import HELD as HELD_REASONS
from antavo_ometria.antavo.records import event_time
from antavo_ometria.ometria.client import OmetriaClient
from antavo_ometria.ometria.contract import LATE_AFTER, hours
from antavo_ometria.ometria.payload import encode_record
from antavo_ometria.ometria.push import PushOutcome, push_isolating
from antavo_ometria.sync.contact_push import ContactsFirst, push_contacts_first, ready_contacts
from antavo_ometria.sync.events.report import format_event_report
from antavo_ometria.sync.events.rules import Rule, custom_event, ometria_event_id, stagger, unsendable, whole_second
from antavo_ometria.sync.store.state import StateStore
from antavo_ometria.sync.tables.mapping import ContactMapping

log = logging.getLogger(__name__)

OVERLAP = timedelta(minutes=15)  # catching up from an old cursor re-reads this much before it
# every run re-reads Ometria's whole window: an event Antavo lists late is still sent while it can start an
# automation, and a rejected one is retried; pushed events are skipped by their per-rule id
LOOKBACK = LATE_AFTER
HELD, REJECTED, EXPIRED = "event_held", "event_rejected", "event_expired"  # kinds of held-back events
ANSWER_LOST = "event_answer_lost"  # pushed, but Ometria's answer did not arrive: sent again by the next delivery
RETRIED_KINDS = (HELD, REJECTED)  # held again (or delivered) each time the event is re-read
LEASE_TTL = timedelta(minutes=10)  # a delivery killed mid-way blocks the rule's others at most this long
LEASE_WAIT = timedelta(minutes=2)  # how long a delivery waits for another one of its rule to finish
# an event held for its contact is tried again as soon as Ometria accepts the contact, and at the latest after this
# wait while the contact stays accepted (the reason it was held may have passed without a new push of the contact)
HELD_RETRY = timedelta(hours=1)
HELD_LISTED = 20  # held events a summary names; the state store keeps every one
# how far after its own second staggering looks for what earlier deliveries sent: 48 steps of 5 minutes, room for
# 48,000 events of one second
STAGGER_SPAN = timedelta(hours=4)
# the fast path also wakes for an event this much before a rule's cursor that the rule has not decided on: one on the
# cursor's own second, or listed a little late; one listed later waits for the delivery at the end of the quiet wait
WAKE_OVERLAP = timedelta(minutes=1)
WAKE_SETTLED_MAX = 1000  # ids of decided events the sensor hands its trigger, at most (they travel in its kwargs)


class EventsNotDelivered(Exception):
    """Some events could not be pushed; the rule's cursor stays before them, so the next try sends them."""

    retryable = True


@dataclass
class Pushed:
    """What pushing one rule's built events did, event by event."""

    accepted: list[dict] = field(default_factory=list)
    rejected: list[tuple[dict, str]] = field(default_factory=list)  # (event, Ometria's answer)
    failed: list[dict] = field(default_factory=list)  # not delivered: sent again by the next try
    lost: list[tuple[dict, str]] = field(default_factory=list)  # (event, why): also failed; Ometria may have it
    already: list[dict] = field(default_factory=list)  # pushed by another delivery since this one read the feed
    failure: str | None = None


def back_off(failing_since: datetime | None, now: datetime, first: timedelta, most: timedelta) -> timedelta:
    """How long the next delivery attempt waits: none when the last one succeeded; else as long as deliveries
    have been failing (so the waits double), within [first, most]. Nothing is lost meanwhile: the cursor stays
    before what was not delivered, and the next delivery reads from there."""
    if failing_since is None:
        return timedelta(0)
    return min(most, max(first, now - failing_since))


def event_key(rule: Rule, event: dict) -> str | None:
    """The rule's id for an Antavo event: its Ometria custom event id and its key in the state store."""
    return ometria_event_id(rule.name, event["id"]) if event["id"] else None


def read_start(cursor: datetime, now: datetime) -> datetime:
    """Ometria's whole window back from now, or from just before the cursor when catching up from further back."""
    return min(cursor - OVERLAP, now - LOOKBACK)


@dataclass(frozen=True)
class Feed:
    """One read of Antavo's event feed that serves every rule on it: the events of each rule's action."""

    since: datetime
    until: datetime
    by_action: dict[str, list[dict]]

    def events(self, action: str, since: datetime) -> list[dict]:
        """The events of `action` after `since` (and those too broken to have a timestamp)."""
        return [e for e in self.by_action.get(action, []) if e["timestamp"] is None or event_time(e) > since]

    def newer_than(self, since: dict[str, datetime], settled: dict[str, list[str]] | None = None) -> list[dict]:
        """The events that wake the fast path: of each action, those after that action's own `since` (the earliest
        start of its rules, see `watch`) but not `settled` (every rule of the action pushed or decided on them),
        so that events another action's rules already delivered wake nothing. An event without an id or a readable
        timestamp wakes nothing: it cannot be recorded as decided, so it would wake every poll; the delivery at the
        end of the quiet wait holds it with the reason."""
        settled = settled or {}
        return [e for action, moment in since.items() for e in self.by_action.get(action, [])
                if e["id"] and e["timestamp"] is not None and event_time(e) > moment
                and e["id"] not in settled.get(action, ())]


def read_feed(client: AntavoClient, actions: set[str], since: datetime, until: datetime) -> Feed:
    """Antavo's events of these actions with a timestamp after `since` and before `until`, in one read (and
    those too broken to have a timestamp: they are held back with the reason)."""
    found: dict[str, dict] = {action: {} for action in actions}
    for page in client.iter_events(since, until):
        for e in page:
            if e["action"] in found and (e["timestamp"] is None or event_time(e) > since):
                found[e["action"]][e["id"] or id(e)] = e  # an event listed twice is one event
    return Feed(since, until, {action: list(events.values()) for action, events in found.items()})


def new_matching_events(client: AntavoClient, action: str, since: datetime, until: datetime) -> list[dict]:
    """Events of `action` after `since` and before `until` (see read_feed)."""
    return read_feed(client, {action}, since, until).by_action[action]


def not_pushed(store: StateStore, rule: Rule, events: list[dict]) -> list[dict]:
    """The events this rule has not pushed (or decided on) yet."""
    ids = [e["id"] for e in events if e["id"]]
    # an event pushed before ids were per rule is recorded under its bare Antavo id: it is not sent again
    done = store.pushed_event_ids([ometria_event_id(rule.name, i) for i in ids] + ids)
    return [e for e in events if not e["id"] or (event_key(rule, e) not in done and e["id"] not in done)]


def not_decided(store: StateStore, rule: str, events: list[dict], held: set[str]) -> list[dict]:
    """The events (with ids) a rule has neither pushed, skipped or expired (the state store's events) nor holds back
    now (`held`: held for their contact or their content, or rejected: they are retried by the deliveries anyway)."""
    keys = {e["id"]: ometria_event_id(rule, e["id"]) for e in events}
    done = store.pushed_event_ids(list(keys.values()) + list(keys))
    return [e for e in events if keys[e["id"]] not in done and e["id"] not in done and keys[e["id"]] not in held]


@dataclass(frozen=True)
class Watch:
    """What the fast path watches Antavo's feed for: per action, events after `since` that are not `settled`; and
    the events new already (`new`: the sensor wakes the delivery at once)."""

    since: dict[str, datetime]
    settled: dict[str, list[str]]
    new: list[dict]


def watch(store: StateStore, antavo: AntavoClient, rules: dict[str, str], now: datetime) -> Watch:
    """One read of the feed from the earliest rule's start (its cursor less WAKE_OVERLAP; for a rule's first run,
    Ometria's window): the events some rule has not decided on yet are new. When none is, the trigger watches from
    WAKE_OVERLAP ago (what is older was just read), whatever the cursors, so a poll never reads further back; per
    action, the ids of those all its rules decided on are settled, the newest WAKE_SETTLED_MAX of them (`since`
    moves past older ones)."""
    starts = {}
    for rule in rules:
        cursor = store.event_cursor(rule)
        starts[rule] = cursor - WAKE_OVERLAP if cursor else now - LATE_AFTER
    feed = read_feed(antavo, set(rules.values()), min(starts.values(), default=now), now)
    held = store.held_ids(HELD) | store.held_ids(REJECTED)
    new = {e["id"]: e for rule, action in rules.items()
           for e in not_decided(store, rule, feed.newer_than({action: starts[rule]}), held)}
    since: dict[str, datetime] = {}
    for rule, action in rules.items():
        since[action] = min(since.get(action, starts[rule]), starts[rule])
    if not new:  # all that was read is decided: the trigger watches from a minute ago, whatever the cursors
        since = {action: max(moment, now - WAKE_OVERLAP) for action, moment in since.items()}
    settled: dict[str, list[str]] = {}
    for action, moment in since.items():
        done = sorted((e for e in feed.newer_than({action: moment}) if e["id"] not in new), key=event_time,
                      reverse=True)
        if len(done) > WAKE_SETTLED_MAX and not new:  # what is older than the ids handed over is not watched
            since[action] = event_time(done[WAKE_SETTLED_MAX])
        settled[action] = [e["id"] for e in done[:WAKE_SETTLED_MAX]]
    return Watch(since, settled, list(new.values()))


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
    feed: Feed | None = None,
    attempt: int | None = None,
) -> dict:
    """Push the rule's new events. Raises EventsNotDelivered, after recording what was delivered, when
    some could not be pushed; the cursor never moves past an event that was neither delivered nor held.

    Holds the rule's lease in the state store meanwhile: a delivery of the same rule by another run (two runs
    overlapping, `make events` next to the deployment) waits for it, then finds those events already pushed.
    With `feed` (one read for every rule) it reads Antavo's feed only when the feed starts after its cursor.
    `attempt` (the task's try) names this delivery in the lease, beside the run id."""
    holder = lease_holder(run_id, attempt)
    take_lease(store, rule, holder)
    try:
        return _deliver(rule, antavo, ometria, store, mapping, (run_id, holder), until, late_policy, now, feed)
    finally:
        store.release_lease(rule.name, holder)


def lease_holder(run_id: str, attempt: int | None = None) -> str:
    """This delivery alone, as the holder of a rule's lease: its run, its try (an Airflow retry is not the stuck try
    before it) and a random token (two deliveries under one run id are two holders)."""
    tried = f" try {attempt}" if attempt is not None else ""
    return f"{run_id[:250]}{tried} #{secrets.token_hex(4)}"


def deliver_all(rules: list[Rule], antavo: AntavoClient, ometria: OmetriaClient, store: StateStore,
                mapping: ContactMapping, run_id: str, late_policy: str = "send",
                attempt: int | None = None) -> list[dict]:
    """Every rule's new events from one read of Antavo's feed, rule by rule; a rule that cannot deliver does not
    stop the others, and EventsNotDelivered names every such rule at the end."""
    now = datetime.now(UTC)
    since = min((read_start(store.event_cursor(r.name) or now - LATE_AFTER, now) for r in rules), default=now)
    feed = read_feed(antavo, {r.action for r in rules}, since, now)
    summaries, failures = [], []
    for rule in rules:
        try:
            summaries.append(deliver(rule, antavo, ometria, store, mapping, run_id, until=now, late_policy=late_policy,
                                      now=now, feed=feed, attempt=attempt))
        except Exception as exc:  # the rule's cursor stays put; the task fails once all have run
            log.error("rule %s: not delivered: %s", rule.name, exc)
            failures.append(exc)
    if failures:  # any other error first: e.g. refused credentials, which retrying does not mend
        first = next((exc for exc in failures if not isinstance(exc, EventsNotDelivered)), None)
        if first is not None:
            raise first
        raise EventsNotDelivered("\n\n".join(str(exc) for exc in failures))
    return summaries


def take_lease(store: StateStore, rule: Rule, holder: str, wait: float | None = None) -> None:
    """Wait until no other delivery of the rule is under way; raise EventsNotDelivered (retried) after `wait`."""
    deadline = time.monotonic() + (LEASE_WAIT.total_seconds() if wait is None else wait)
    while not store.take_lease(rule.name, holder, LEASE_TTL):
        if time.monotonic() >= deadline:
            raise EventsNotDelivered(f"another delivery of rule {rule.name} ({store.lease_holder(rule.name)}) is "
                                     f"still under way; this one tries again, and nothing was sent twice")
        time.sleep(0.5)


def _deliver(rule, antavo, ometria, store, mapping, who, until, late_policy, now, feed) -> dict:
    """Deliver the rule's events as `who` (the run id, and the holder of the rule's lease)."""
    run_id = who[0]
    now = now or datetime.now(UTC)
    until = until or now
    expired = expire_rejected(store, rule, now - LATE_AFTER, run_id)
    since = read_start(store.event_cursor(rule.name) or now - LATE_AFTER, now)
    if feed is not None and feed.since <= since:  # the run's one read covers this rule
        events, until = feed.events(rule.action, since), feed.until
    else:
        events = new_matching_events(antavo, rule.action, since, until)
    fresh = not_pushed(store, rule, events)
    owed = contact_now_accepted(store, rule, {e["id"] for e in events})
    owed_keys = {event_key(rule, e) for e in owed}
    retried = store.held_ids(REJECTED).intersection(event_key(rule, e) for e in fresh) | owed_keys
    answer_lost_before = store.held_ids(ANSWER_LOST)
    summary = {"rule": rule.name, "event_type": rule.event_type, "matched": len(events),
               "already_pushed": len(events) - len(fresh), "sent": 0, "accepted": 0, "rejected": 0,
               "retried": len(retried), "retried_accepted": 0, "expired": expired,
               "late": 0, "skipped_late": 0, "held": 0, "failed": 0, "failure": None, "contacts_pushed_first": 0,
               "held_reasons": [], "answer_lost": 0, "answer_lost_ids": [], "resent_after_lost_answer": 0,
               "since": since.isoformat(), "until": until.isoformat()}
    undelivered: list[dict] = []
    if fresh or owed:
        outcome, undelivered = _deliver_fresh(rule, fresh + owed, antavo, ometria, store, mapping, who,
                                              late_policy, now)
        accepted_keys = outcome.pop("accepted_keys")
        summary["already_pushed"] += outcome.pop("already_pushed_now")
        summary |= outcome
        summary["retried_accepted"] = len(retried.intersection(accepted_keys))
        summary["resent_after_lost_answer"] = len(answer_lost_before.intersection(accepted_keys))
    # the owed ones not delivered are still held: read again from there
    move_cursor(store, rule, events, [e for e in undelivered if event_key(rule, e) not in owed_keys], until)
    log.info("rule %s: %d matching, %d already sent, %d sent, %d held, %d not delivered", rule.name,
             summary["matched"], summary["already_pushed"], summary["sent"], summary["held"], summary["failed"])
    if undelivered:
        raise EventsNotDelivered(f"{len(undelivered)} {rule.event_type} event(s) were not delivered "
                                 f"({summary['failure']}); the next try sends them.\n{format_event_report([summary])}")
    return summary


def move_cursor(store: StateStore, rule: Rule, events: list[dict], undelivered: list[dict], until: datetime) -> None:
    """To the end of what was read (`until`) when every event read was delivered or held, so that a rule whose action
    is quiet is not read further back each time; otherwise just before the first undelivered one."""
    if not undelivered:
        store.set_event_cursor(rule.name, max([until] + [event_time(e) for e in events if e["timestamp"] is not None]))
        return
    moments = [event_time(e) for e in undelivered if e["timestamp"] is not None]
    if moments:
        store.set_event_cursor(rule.name, min(moments) - timedelta(microseconds=1))


def contact_now_accepted(store: StateStore, rule: Rule, read: set[str]) -> list[dict]:
    """The rule's events held for their contact (not in this read of the feed) whose contact Ometria has accepted
    since they were held, or at least HELD_RETRY ago (the reason may have passed without a new push of the
    contact): owed, they are delivered now, whatever their age. One a delivery pushed but could not release (it
    was stopped in between) is released here."""
    rows = [r for r in store.held.events_owed(HELD, rule.name, HELD_RETRY)
            if r["reasons"][-1].startswith(f"customer {r['customer_id']}:") and r["payload"]["id"] not in read]
    owed = list({r["id"]: r["payload"] for r in rows}.values())
    due = not_pushed(store, rule, owed)
    done = {event_key(rule, e) for e in owed} - {event_key(rule, e) for e in due}
    if done:
        store.release_held(sorted(done), (HELD,))
    return due


def expire_rejected(store: StateStore, rule: Rule, late_cut: datetime, run_id: str) -> int:
    """Held as expired: the rule's rejected events whose window has passed (they can no longer start an
    automation, so they are not retried); recorded `expired`, so that a catch-up read never sends them."""
    rows = [r for r in store.held_records(kind=REJECTED, limit=100_000) if r["run_id"].endswith(f":{rule.name}")]
    stale = [(r, json.loads(r["payload"])) for r in rows if r.get("payload")]
    stale = [(r, e) for r, e in stale if e.get("timestamp") and event_time(e) < late_cut]
    if not stale:
        return 0
    store.release_held([r["antavo_id"] for r, _ in stale], (REJECTED,))
    store.record_held(f"{run_id}:{rule.name}", EXPIRED, [
        {"id": r["antavo_id"], "customer_id": r["customer_id"], "payload": e,
         "reasons": [f"{r['reasons'][-1]}; its {hours(LATE_AFTER)} window has passed: it can no longer start "
                     "an automation, so it is not retried"]} for r, e in stale])
    store.record_events([_event_row(rule, e, "expired", late_cut, None, run_id) for _, e in stale])
    log.warning("%d rejected %s event(s) expired (over %s old): held as expired, no longer retried",
                len(stale), rule.event_type, hours(LATE_AFTER))
    return len(stale)


@dataclass
class Customers:
    """What delivering a rule's events needs to know of their customers, read from Antavo (contacts pushed first)."""

    records: dict[str, dict]  # Antavo id → customer, for those Antavo has
    identities: dict[str, dict]  # Antavo id → the identity fields of its Ometria events
    problems: dict[str, str]  # Antavo id → why its events are held (its contact failed a check, Ometria rejected it)
    rewards: dict[str, dict]  # Antavo id → {reward id: claimed reward}, when the rule needs them
    contacts: ContactsFirst


@dataclass
class Decision:
    """What happens to each matching event not pushed yet: the pure part of a delivery."""

    sendable: list[dict] = field(default_factory=list)
    held: list[tuple[dict, str]] = field(default_factory=list)  # (event, why)
    skipped: list[dict] = field(default_factory=list)  # over 4 hours old, under late_event_policy = skip
    waiting: list[dict] = field(default_factory=list)  # its contact could not be pushed first: the next try sends both
    late: int = 0  # sendable events over 4 hours old (sent, with a warning)


def classify(events: list[dict], known: set[str], problems: dict[str, str], waiting_for_contact: set[str],
             late_cut: datetime, late_policy: str) -> Decision:
    """Sendable, held (with the reason), skipped as late, or waiting for its contact: each event once."""
    decision = Decision()
    for event in events:
        cid = event["customer_id"]
        if HELD_REASONS in event:
            decision.held.append((event, "; ".join(event[HELD_REASONS])))
        elif cid in waiting_for_contact:
            decision.waiting.append(event)
        elif cid not in known or cid in problems:
            decision.held.append((event, f"customer {cid}: {problems.get(cid, 'not found in Antavo')}"))
        elif event_time(event) < late_cut and late_policy == "skip":
            decision.skipped.append(event)
        else:
            decision.sendable.append(event)
    decision.late = sum(event_time(e) < late_cut for e in decision.sendable)
    return decision


def look_up_customers(rule: Rule, events: list[dict], antavo: AntavoClient, ometria: OmetriaClient,
                      store: StateStore, mapping: ContactMapping, run_id: str) -> Customers:
    """The events' customers from Antavo, their contacts pushed first where Ometria does not have them yet, and
    (when the rule names reward fields) their claimed rewards."""
    customer_ids = sorted({e["customer_id"] for e in events if HELD_REASONS not in e})
    paths = sorted(set(mapping.loyalty_fields) | set(rule.customer_paths) | {HELD_REASONS})
    records = {c["id"]: c for c in antavo.get_customers(customer_ids, paths)}
    ready = ready_contacts(list(records.values()), paths, mapping)
    left = store.contacts.left_among([i for i, _ in ready.valid])  # pushing them would put them back on the list
    contacts = push_contacts_first(store, ometria, mapping.version, run_id, [c for c in ready.valid if c[0] not in left])
    problems = ready.problems | {i: "Ometria rejected the contact" for i in contacts.rejected} | {
        i: "left the programme (removed from the list): their contact is not pushed again" for i in left}
    deliverable = sorted(i for i in records if i not in problems)
    rewards = {cid: {r.get("id"): r for r in antavo.get_claimed_rewards(cid)}
               for cid in deliverable} if rule.needs_rewards else {}
    return Customers(records, ready.identities, problems, rewards, contacts)


def _deliver_fresh(rule, events, antavo, ometria, store, mapping, who, late_policy, now) -> tuple[dict, list]:
    """Deliver events not pushed yet: (summary, the events that could not be delivered)."""
    run_id, late_cut = who[0], now - LATE_AFTER
    customers = look_up_customers(rule, events, antavo, ometria, store, mapping, run_id)
    decision = classify(events, set(customers.records), customers.problems, set(customers.contacts.failed),
                        late_cut, late_policy)
    if decision.late:
        log.warning("%d %s event(s) are over %s old: Ometria will not start an automation for them",
                    decision.late, rule.event_type, hours(LATE_AFTER))
    built, unsendable_ = _build(rule, decision.sendable, customers, mapping.settings.language,
                                sent_per_timestamp(store, rule, decision.sendable))
    pushed = push_events(rule, built, ometria, store, late_cut, who)
    held = decision.held + unsendable_
    store.record_events([_event_row(rule, e, "skipped_late", late_cut, None, run_id) for e in decision.skipped])
    failed = decision.waiting + pushed.failed
    _record_held(store, rule, run_id, events, held, pushed, late_cut, failed, decision.skipped)
    return {"sent": len(pushed.accepted) + len(pushed.rejected), "accepted": len(pushed.accepted),
            "rejected": len(pushed.rejected), "late": decision.late, "skipped_late": len(decision.skipped),
            "held": len(held), "failed": len(failed), "failure": pushed.failure or customers.contacts.error,
            "contacts_pushed_first": len(customers.contacts.sent),
            "held_reasons": _reasons(rule, held, pushed.rejected, late_cut),
            "answer_lost": len(pushed.lost),
            "answer_lost_ids": [event_key(rule, e) for e, _ in pushed.lost[:HELD_LISTED]],
            "already_pushed_now": len(pushed.already),
            "accepted_keys": [event_key(rule, e) for e in pushed.accepted]}, failed


def _reasons(rule: Rule, held: list[tuple[dict, str]], rejected: list[tuple[dict, str]], late_cut: datetime,
             limit: int = HELD_LISTED) -> list[dict]:
    """The first held and rejected events with why, for the report (all of them are in the state store)."""
    rows = [{"id": event_key(rule, e) or "?", "kind": HELD, "reason": why} for e, why in held]
    rows += [{"id": event_key(rule, e) or "?", "kind": REJECTED if event_time(e) >= late_cut else EXPIRED,
              "reason": f"Ometria rejected it ({why})"} for e, why in rejected]
    return rows[:limit]


def sent_per_timestamp(store: StateStore, rule: Rule, events: list[dict]) -> dict[datetime, int]:
    """Timestamp → the custom events of the rule's type earlier deliveries sent with it, over the timestamps these
    events may be staggered onto (each one's second and the STAGGER_SPAN after it): a burst split across
    deliveries (the fast path sends what it has read so far) is staggered as one."""
    spans: list[tuple[datetime, datetime]] = []
    for second in sorted({whole_second(event_time(e)) for e in events}):
        if spans and second <= spans[-1][1]:
            spans[-1] = (spans[-1][0], second + STAGGER_SPAN)
        else:
            spans.append((second, second + STAGGER_SPAN))
    return store.events.sent_per_timestamp(rule.event_type, spans) if spans else {}


def _build(rule: Rule, events: list[dict], customers: Customers, language: str,
           already: dict[datetime, int]) -> tuple[list, list]:
    """(event, encoded custom event, the timestamp it carries) for each event, and (event, why) for those that cannot
    be sent as they are; each event's timestamp staggered after the `already` sent with each timestamp."""
    built, held = [], []
    for event, stamp in zip(events, stagger([event_time(e) for e in events], already)):
        cid, props = event["customer_id"], event.get("properties", {})
        reward = customers.rewards.get(cid, {}).get(props.get("reward") or props.get("reward_id"))
        record = custom_event(rule, event, customers.records[cid], reward, customers.identities[cid], language, stamp)
        problems = unsendable(record)
        if problems:
            held.append((event, "; ".join(problems)))
        else:
            built.append((event, encode_record(record), stamp))
    return built, held


def push_events(rule: Rule, built: list[tuple[dict, bytes, datetime]], ometria: OmetriaClient, store: StateStore,
                late_cut: datetime, who: tuple[str, str]) -> Pushed:
    """Push each custom event in a request of its own and record the accepted ones as they go, as `who` (the run
    id, and the holder of the rule's lease).

    One event a request, so that Ometria's answer names the event it rejected: finding it by halving a batch
    would push the accepted events again, and whether a repeated id starts an automation again is not
    documented. Custom events are few (one per reward claim), so the extra requests are cheap. Before each push
    the lease is renewed (a delivery that lost it stops: the holder sends the rest) and the event's id is looked up
    among those pushed (another delivery may have pushed it since this one read the feed)."""
    out = Pushed()
    for n, (event, body, stamp) in enumerate(built):
        if not store.renew_lease(rule.name, who[1], LEASE_TTL):  # one small UPDATE a push
            out.failed.extend(e for e, _, _ in built[n:])  # another delivery took the lease: it sends them
            holder = store.lease_holder(rule.name)
            out.failure = (f"the lease of rule {rule.name} passed to {holder}" if holder else
                           f"the lease of rule {rule.name} expired and another delivery took and released it")
            break
        if store.pushed_event_ids([event_key(rule, event), event["id"]]):
            out.already.append(event)
            continue
        (entry,) = push_isolating(ometria, [event_key(rule, event)], [body], record_type="custom_event",
                                  isolate=False)
        _sort(out, rule, (event, stamp), entry, store, late_cut, who[0])
    if out.rejected:
        log.warning("Ometria rejected %d %s event(s): %s; its reasons are at /v2/push/_errors", len(out.rejected),
                    rule.event_type, ", ".join(event_key(rule, e) or "?" for e, _ in out.rejected[:10]))
    return out


def _sort(out: Pushed, rule: Rule, sent: tuple[dict, datetime], entry, store: StateStore, late_cut: datetime,
          run_id: str) -> None:
    """Put one pushed event (and the timestamp it carried) where Ometria's answer (or its lack) puts it; record it
    when accepted."""
    event, stamp = sent
    status = entry.outcome
    if status == PushOutcome.FAILED:  # left unrecorded (and the cursor before it) so that the next try sends it
        out.failed.append(event)
        out.failure = entry.error
        if entry.answer_lost:  # Ometria may have stored it: the next delivery sends it again, under the same id
            out.lost.append((event, f"sent, but Ometria's answer was lost ({entry.error}); Ometria may have stored "
                                    "it: the next delivery sends it again with the same id"))
            log.warning("the answer to the push of %s was lost: %s", event_key(rule, event), entry.error)
    elif status == PushOutcome.REJECTED:  # not recorded as pushed: held, and retried while it can start an automation
        out.rejected.append((event, entry.error or f"request {entry.request_id}"))
    else:
        out.accepted.append(event)
        store.record_events([_event_row(rule, event, "sent", late_cut, entry.request_id, run_id, stamp)])


def _record_held(store: StateStore, rule: Rule, run_id: str, events: list[dict], held: list[tuple[dict, str]],
                 pushed: Pushed, late_cut: datetime, failed: list[dict], skipped: list[dict]) -> None:
    """Hold back what could not be delivered, each with its reason; a rejected event past its window as expired;
    an event whose answer was lost as such (until a delivery has Ometria's answer for it, or finds it pushed).
    What was not delivered for another reason (`failed`) keeps the held record it has."""
    tag, keep = f"{run_id}:{rule.name}", {event_key(rule, e) for e in failed}
    for kind in RETRIED_KINDS:
        store.clear_held(tag, kind, keep)  # a retry of this task records them again
    decided = [k for e in events if (k := event_key(rule, e)) and k not in keep]
    store.release_held(decided, RETRIED_KINDS)  # held again below
    # Ometria answered it now (or another delivery pushed it), its answer was lost again (recorded again below), or
    # it will not be sent again (skipped as late); one held for another reason keeps it until it is sent again
    superseded = pushed.accepted + pushed.already + skipped + [e for e, _ in pushed.rejected + pushed.lost]
    store.release_held([event_key(rule, e) for e in superseded], (ANSWER_LOST,))
    groups = held_groups(held, pushed.rejected, late_cut) | {ANSWER_LOST: pushed.lost}
    for kind, rows in groups.items():
        if rows:
            log.warning("%d %s event(s) held back (%s): %s", len(rows), rule.event_type, kind,
                        "; ".join(f"{event_key(rule, e) or '?'}: {why}" for e, why in rows[:5]))
            store.record_held(tag, kind, [{"id": event_key(rule, e), "customer_id": e["customer_id"],
                                           "reasons": [why], "payload": e} for e, why in rows])
    store.record_events([_event_row(rule, e, "expired", late_cut, None, run_id) for e, _ in groups[EXPIRED]])


def held_groups(held: list[tuple[dict, str]], rejected: list[tuple[dict, str]],
                late_cut: datetime) -> dict[str, list[tuple[dict, str]]]:
    """Kind → (event, reason) of what is held back: held as it was read, rejected and retried while it can start
    an automation, rejected past that window (expired, not retried)."""
    groups: dict[str, list[tuple[dict, str]]] = {HELD: list(held), REJECTED: [], EXPIRED: []}
    for event, why in rejected:
        deadline = (event_time(event) + LATE_AFTER).isoformat(timespec="minutes")
        if event_time(event) >= late_cut:
            groups[REJECTED].append((event, f"Ometria rejected it ({why}); retried on each run until {deadline}"))
        else:
            groups[EXPIRED].append((event, f"Ometria rejected it ({why}); its {hours(LATE_AFTER)} window passed at "
                                           f"{deadline}: it can no longer start an automation, so it is not retried"))
    return groups


def _event_row(rule: Rule, event: dict, status: str, late_cut: datetime, request_id, run_id: str,
               sent_at: datetime | None = None) -> dict:
    moment = event_time(event)
    return {"event_id": event_key(rule, event), "rule": rule.name, "event_type": rule.event_type,
            "customer_id": event["customer_id"], "event_time": moment, "late": moment < late_cut,
            "status": status, "request_id": request_id, "run_id": run_id, "sent_at": sent_at}
