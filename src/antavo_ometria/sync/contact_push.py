"""Contacts pushed to Ometria and what it answered remembered: the one home both DAGs use for it.

The contact run's load records each batch's answer here (accepted, or owed with the reason and the next try);
event delivery pushes first the contacts Ometria has not accepted from us yet, so that their events find a
profile, and records the answers the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from antavo_ometria.ometria.client import OmetriaClient
from antavo_ometria.ometria.push import JournalEntry, PushOutcome, batches, push_isolating
from antavo_ometria.sync.store.state import Backoff, ContactStatus, HeldKind, StateStore
from antavo_ometria.sync.tables.mapping import ContactMapping

log = logging.getLogger(__name__)


class Recorder:
    """Writes what Ometria answered into the state store: accepted, or owed with the reason and the next try."""

    def __init__(self, store: StateStore | None, mapping_version: str, run_id: str, backoff: Backoff):
        self.store, self.mapping_version, self.run_id = store, mapping_version, run_id
        self.backoff = backoff

    def __call__(self, entries: list[JournalEntry], bodies: dict[str, bytes] | None = None) -> None:
        """Record these entries; `bodies`: the payloads of their records (id → body), kept with those accepted."""
        if self.store is None:
            return
        for entry in entries:
            self.record(entry, bodies or {})

    def record(self, entry: JournalEntry, bodies: dict[str, bytes]) -> None:
        pairs, outcome = list(zip(entry.ids, entry.hashes)), entry.outcome
        if outcome == PushOutcome.SENT:
            self.store.contacts.record_accepted(pairs, self.mapping_version, self.run_id, entry.request_id,
                                                {i: bodies[i] for i in entry.ids if i in bodies} or None)
            self.store.held.release(entry.ids, (HeldKind.QUARANTINED, HeldKind.FAILED, HeldKind.REJECTED))
            return
        rejected = outcome == PushOutcome.REJECTED
        reason = (f"rejected by Ometria (request {entry.request_id}); see /v2/push/_errors"
                  if rejected else f"not delivered: {entry.error}")
        status = ContactStatus.REJECTED if rejected else ContactStatus.FAILED
        self.store.contacts.record_owed(pairs, status, reason, self.mapping_version, self.run_id, self.backoff,
                                        entry.request_id)


def remember_sent(store: StateStore, entries: list[JournalEntry], mapping_version: str, run_id: str,
                  bodies: dict[str, bytes] | None = None) -> None:
    """Record what Ometria answered for these journal entries (accepted, or owed)."""
    Recorder(store, mapping_version, run_id, Backoff())(entries, bodies)


@dataclass
class ReadyContacts:
    """Customers as Ometria contacts: the encoded ones that pass the checks, and why the others do not."""

    valid: list[tuple[str, bytes]]  # (Antavo id, encoded contact)
    problems: dict[str, str]  # Antavo id → the checks its contact fails
    identities: dict[str, dict]  # Antavo id → the identity fields that name the contact in Ometria


def ready_contacts(customers: list[dict], paths: list[str], mapping: ContactMapping) -> ReadyContacts:
    """Encode and check a few customers' contacts as the contact run does (its transform and checks)."""
    from antavo_ometria.sync.contacts.prepare import prepare_contacts  # pandas and the quality gate: only when used
    from antavo_ometria.sync.contacts.transform import customer_columns

    frame, encoded, gate = prepare_contacts(customer_columns(customers, paths), mapping)
    ids = frame["id"].tolist()
    problems = {ids[row]: "; ".join(f["message"] for f in fails) for row, fails in gate.failures.items()}
    identities = {row["id"]: {k: v for k, v in (("identity_email", row.get("email")),
                                                ("identity_account_id", row.get("customer_id"))) if v}
                  for row in frame.to_dict("records")}
    return ReadyContacts([(ids[i], encoded[i]) for i in range(len(ids)) if gate.valid.iloc[i]], problems, identities)


@dataclass
class ContactsFirst:
    """What pushing contacts ahead of their events did: Antavo ids by outcome, and the last delivery error."""

    sent: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # not delivered: their events wait for the next try
    error: str | None = None


def push_contacts_first(store: StateStore, ometria: OmetriaClient, mapping_version: str, run_id: str,
                        contacts: list[tuple[str, bytes]]) -> ContactsFirst:
    """Push the contacts Ometria has not accepted from us yet, recording each answer as the contact run does."""
    known = store.contacts.accepted_hashes([i for i, _ in contacts])
    unknown = [(i, body) for i, body in contacts if i not in known]
    outcome = ContactsFirst()
    for ids, bodies in batches(unknown):
        entries = push_isolating(ometria, ids, bodies)
        remember_sent(store, entries, mapping_version, run_id, dict(zip(ids, bodies)))
        for entry in entries:
            getattr(outcome, entry.outcome.value).extend(entry.ids)
            outcome.error = entry.error or outcome.error
    if unknown:
        log.info("pushed %d contact(s) first: their events refer to customers Ometria did not have; %d not delivered",
                 len(outcome.sent), len(outcome.failed))
    return outcome
