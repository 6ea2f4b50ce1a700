"""The load step: push the staged contacts, journal every push, and remember what Ometria received."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Container, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from itertools import islice
from pathlib import Path

import numpy as np

from antavo_ometria.ometria.client import OmetriaClient
from antavo_ometria.ometria.contract import MAX_BATCH_RECORDS, MAX_RECORD_BYTES
from antavo_ometria.ometria.payload import encode_record
from antavo_ometria.ometria.push import (
    ANSWERED,
    NOT_ANSWERED,
    JournalEntry,
    OversizedRecord,
    PushOutcome,
    batches,
    oversized,
    push_isolating,
)
from antavo_ometria.sync.contact_push import Recorder
from antavo_ometria.sync.contacts.staged_files import (
    ASYNC_ERRORS,
    DEFERRED,
    LEAVERS,
    OVERSIZED,
    Journal,
    Progress,
    StagedIndex,
    contact_index,
    contacts_at,
    first_bodies,
    read_journal,
    read_ndjson,
    staged_count,
    write_ndjson,
)
from antavo_ometria.sync.contacts.step_results import Loaded, Plan
from antavo_ometria.sync.store.state import Backoff, ContactStatus, StateStore
from antavo_ometria.sync.tables.settings import SyncSettings
from antavo_ometria.transport import ApiError, AuthenticationFailed

log = logging.getLogger(__name__)

MIN_SHARED_CAUSE = 10  # new rejections that can show a shared cause: a whole batch of them, or a share of the run
OUTCOME = "load_outcome.json"  # the load's account of its attempt, for the report
FIELDS_SAMPLE = 1000  # the fields a run sends show in its first contacts


class LoadFailed(Exception):
    """Some batches could not be delivered; they are recorded in the load journal.

    `retryable` is false when every failure was permanent (e.g. a refused API key): a retry cannot help.
    """

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class LoadOutcome:
    """What this attempt's load journal says of the staged contacts (for each, its latest push decides), of the
    removals from the list, and of the oversized records held back."""

    batches: int = 0  # pushes Ometria answered
    accepted_ids: list[str] = field(default_factory=list)
    rejected_ids: list[str] = field(default_factory=list)
    failed_ids: list[str] = field(default_factory=list)  # not delivered
    refused_oversized: int = 0
    removed_from_list: int = 0
    failed_removal_ids: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # id → the error of its latest push, when it had one
    reached: frozenset[str] = frozenset()  # ids that some push of this attempt carried

    @property
    def sent(self) -> int:
        return len(self.accepted_ids) + len(self.rejected_ids)

    def counts(self) -> dict[str, int]:
        return {"batches": self.batches, "sent": self.sent, "accepted": len(self.accepted_ids),
                "rejected": len(self.rejected_ids), "failed": len(self.failed_ids),
                "refused_oversized": self.refused_oversized, "removed_from_list": self.removed_from_list}

    def as_dict(self) -> dict:
        return {**asdict(self), "reached": sorted(self.reached)}

    @classmethod
    def of(cls, value: dict) -> LoadOutcome:
        return cls(**{**value, "reached": frozenset(value["reached"])})


@dataclass(frozen=True)
class Selection:
    """What this try of the load sends, and what it does not: a pure decision over the staged contacts' ids,
    hashes and sizes (the bodies are read as they are sent)."""

    send: np.ndarray  # row positions of the staged contacts to push, in the order they are pushed
    oversized: list[OversizedRecord]  # over Ometria's record size: held back
    deferred: list[tuple[str, str]]  # (id, hash) over the run's cap: owed, the next run sends them
    delivered_earlier: int  # delivered by an earlier try of this attempt: not sent again


def select(staged: StagedIndex, delivered: set[tuple[str, str]], owed: set[str], cap: int) -> Selection:
    """The contacts this try sends: not those an earlier try delivered, nor oversized ones, within the cap."""
    pending = ~staged.pairs_among(delivered) if delivered else np.ones(len(staged), bool)
    big = staged.sizes > MAX_RECORD_BYTES
    held = np.flatnonzero(pending & big)
    too_large = [oversized(i, int(size)) for (i, _), size in zip(staged.pairs_at(held), staged.sizes[held])]
    earlier = len(staged) - int(pending.sum())
    send, deferred = within_cap(pending & ~big, cap, earlier, staged.among(owed))
    return Selection(send, too_large, staged.pairs_at(deferred), earlier)


class _LoadRun:
    """One try of the load: its staging folder, journal and recorder, and the steps that act."""

    def __init__(self, staging: Path, client: OmetriaClient, plan: Plan, store: StateStore | None,
                 settings: SyncSettings, staged: StagedIndex, rows: int | None):
        self.staging, self.client, self.plan, self.store, self.settings = staging, client, plan, store, settings
        self.staged, self.rows, self.journal = staged, rows, Journal(staging)
        self.record = Recorder(store, plan.mapping_version, plan.run_id,
                               Backoff(settings.retry_first_hours, settings.retry_max_hours))

    @cached_property
    def ids(self) -> set[str]:
        return set(self.staged.ids.to_pylist())

    def resume(self) -> set[tuple[str, str]]:
        """The (id, hash) pairs an earlier try of this attempt delivered, recorded again (the store may have
        missed them before a crash)."""
        earlier = [e for e in journal_entries(self.staging, self.plan) if not e.removal]  # not list removals
        latest = {(i, h): accepted(e) for e in earlier for i, h in zip(e.ids, e.hashes)}  # the newest word counts
        delivered = {pair for pair, ok in latest.items() if ok}
        if delivered and self.store is not None:
            self.record_again([still_delivered(e, delivered) for e in earlier if accepted(e)])
        return delivered

    def record_again(self, entries: list[JournalEntry]) -> None:
        """Record accepted entries again, with their payloads, read from the staged file a batch at a time."""
        wanted = {i for e in entries for i in e.ids}
        for contacts in contacts_at(self.staging, np.flatnonzero(self.staged.among(wanted)), self.rows):
            bodies = {i: body for i, body, _ in contacts}
            self.record([part for e in entries if (part := only(e, bodies)).ids], bodies)
        unstaged = wanted - self.ids  # no longer staged: recorded without a payload
        if unstaged:
            self.record([part for e in entries if (part := only(e, unstaged)).ids])

    def owed(self) -> set[str]:
        """Contacts owed by earlier runs (in any mode): rejected again, they stay held, and do not fail the load."""
        if self.store is None:
            return set(self.plan.retry_ids)
        return self.store.contacts.owed_among(self.staged.ids.to_pylist(), self.plan.run_id)

    def defer(self, deferred: list[tuple[str, str]]) -> None:
        write_ndjson(self.staging / DEFERRED, ({"id": i} for i, _ in deferred))
        if not deferred:
            return
        cap = self.settings.max_contacts_per_run
        log.warning("%d contacts are over max_contacts_per_run (%d): they stay owed and the next run sends them",
                    len(deferred), cap)
        if self.store is not None:
            self.store.contacts.record_owed(
                deferred, ContactStatus.DEFERRED,
                f"deferred: over sync.max_contacts_per_run ({cap:,}) in run {self.plan.run_id}",
                self.plan.mapping_version, self.plan.run_id, Backoff())

    def push(self, send: np.ndarray, owed: set[str]) -> JournalEntry | None:
        """Push the staged contacts at these rows in batches, each on record before the next, their bodies read a
        batch at a time; the batch Ometria refused whole, which stops it."""
        progress = Progress("load", "contacts", total=len(send))
        refused_whole = None
        for ids, bodies, hashes in push_batches(contacts_at(self.staging, send, self.rows)):
            entries = push_isolating(self.client, ids, bodies, hashes)
            self.journal.append([e.tagged(self.plan.attempt).as_dict() for e in entries])
            self.record(entries, dict(zip(ids, bodies)))
            progress.advance(len(ids))
            if len(entries) == 1 and refused_as_a_whole(entries[0], owed):
                refused_whole = entries[0]
                log.error("Ometria rejected every record of a batch of %d: sending stopped", len(refused_whole.ids))
                break
        progress.advance(0, force=True)
        return refused_whole

    def take_back(self, outcome: LoadOutcome, late: list[dict]) -> LoadFailed:
        """Ometria listed the accepted contacts invalid afterwards: nothing of this try counts as delivered."""
        ids = outcome.accepted_ids
        hashes = dict(self.staged.pairs_at(np.flatnonzero(self.staged.among(ids))))
        unconfirmed = JournalEntry(ids, [hashes[i] for i in ids], NOT_ANSWERED, retryable=False,
                                   attempt=self.plan.attempt,
                                   error=f"accepted, then listed invalid by Ometria ({len(late)} errors at "
                                         "/v2/push/_errors, which do not say which record)")
        self.journal.append([unconfirmed.as_dict()])  # a retry sends them again
        self.record([unconfirmed])
        keep_outcome(self.staging, self.plan, summarise_load(self.staging, self.plan, self.ids))
        return LoadFailed(f"Ometria accepted the contacts, then listed {len(late)} validation errors on fields they "
                          f"carry. {likely_cause(late)} The {len(ids)} contacts this try sent stay owed and are sent "
                          "again: fix the cause, then clear the run or wait for the next one.", retryable=False)

    def undelivered(self, outcome: LoadOutcome) -> LoadFailed | None:
        """Why the load fails for what it could not deliver (leavers not removed, contacts not sent), or None."""
        stuck = len(outcome.failed_removal_ids)
        if stuck:
            if self.store is not None:  # the next run reads everyone, and removes them again
                self.store.runs.request_reconciliation(self.plan.dag_id, self.plan.run_id,
                                                       f"{stuck} leaver(s) could not be removed from the list")
            return LoadFailed(f"{stuck} member(s) who left the programme could not be removed from the list; a "
                              "retry, or the next run (a reconciliation), removes them", retryable=True)
        if outcome.failed_ids:
            failures = [e for e in journal_entries(self.staging, self.plan) if e.status != ANSWERED]
            return LoadFailed(f"{len(outcome.failed_ids)} contact(s) were not delivered ({failures[-1].error}); see "
                              f"{self.journal.folder}. A retry re-sends only those.",
                              retryable=any(e.retryable for e in failures))
        return None


def load_staged(staging: Path, client: OmetriaClient, plan: Plan | dict, store: StateStore | None = None,
                rows: int | None = None) -> Loaded:
    """Push the staged contacts in batches of 100; a retry of this attempt skips what it already delivered.

    What counts as delivered is an (id, payload hash) pair that this attempt of the run pushed and Ometria
    accepted, so a re-planned run (Clear, backfill) sends again, and a changed payload is always sent.
    A batch with records Ometria rejected is split until each rejected record stands alone. A rejected or
    undelivered contact stays owed in the state store and is tried again by later runs (settings' backoff).
    The load fails, and stops sending, when Ometria refuses a whole batch of records (most likely a field
    missing in the account) or more than `max_rejected_share` of the run's contacts.
    The staged file is read `rows` contacts at a time (default: `read_rows()`): the load holds every contact's
    id and hash, never every body.
    """
    plan = Plan.of(plan)
    settings = plan.run_settings
    leavers = read_ndjson(staging / LEAVERS)
    if plan.dry_run:
        staged = staged_count(staging)
        log.info("dry run: %d contacts would be sent and %d removed from the list; nothing was sent",
                 staged, len(leavers))
        return Loaded(0, 0, 0, 0, 0, 0, dry_run=True, would_send=staged)
    staged = contact_index(staging, rows)
    keep_outcome(staging, plan, None)
    run = _LoadRun(staging, client, plan, store, settings, staged, rows)
    owed = run.owed()
    chosen = select(staged, run.resume(), owed, settings.max_contacts_per_run)
    run.defer(chosen.deferred)
    if chosen.delivered_earlier:
        log.info("resuming: %d contacts were delivered by an earlier try of this run; %d to send",
                 chosen.delivered_earlier, len(chosen.send))
    refused_whole = run.push(chosen.send, owed)
    write_ndjson(staging / OVERSIZED, ({"id": o.id, "reasons": [o.reason]} for o in chosen.oversized))
    if refused_whole is None:
        push_leavers(client, staging, plan, store, settings, run.journal, leavers)
    errors = new_push_errors(client, store)
    (staging / ASYNC_ERRORS).write_text(json.dumps(errors, ensure_ascii=False), encoding="utf-8")
    outcome = summarise_load(staging, plan, run.ids)
    verdict, late = _verdicts(outcome, owed, refused_whole, errors, first_bodies(staging, FIELDS_SAMPLE), settings,
                              store.push_errors.last_polled() if store is not None else ())
    if not late:  # else the account waits for the take-back: a crash meanwhile leaves the journal to tell
        keep_outcome(staging, plan, outcome)
    if verdict:
        raise LoadFailed(verdict, retryable=False)
    failure = run.take_back(outcome, late) if late else run.undelivered(outcome)
    if failure is not None:
        raise failure
    return Loaded(**outcome.counts(), async_errors=len(errors), delivered_earlier=chosen.delivered_earlier,
                  deferred=len(chosen.deferred), retried=int(staged.among(owed).sum()),
                  retried_accepted=len(owed & set(outcome.accepted_ids)))


def _verdicts(outcome: LoadOutcome, owed: set[str], refused_whole: JournalEntry | None, errors: list[dict],
              bodies: list[bytes], settings: SyncSettings, listed_before: list[dict]) -> tuple[str | None, list[dict]]:
    """Why the load fails for what Ometria rejected (or None), and the errors it listed later on the run's fields
    (`bodies`: the run's first contacts, whose fields it sends)."""
    verdict = rejection_verdict(outcome, owed, refused_whole, errors, settings.max_rejected_share, listed_before)
    if verdict or outcome.rejected_ids:  # with rejections in its answers, its errors may be theirs
        return verdict, []
    return None, reported_later(errors, bodies, len(outcome.accepted_ids), settings.max_rejected_share)


def push_batches(contacts: Iterable[list[tuple[str, bytes, str]]]
                 ) -> Iterator[tuple[list[str], list[bytes], list[str]]]:
    """Staged contacts (id, body, hash), as read a batch at a time, in batches of a push: ids, bodies, hashes."""
    rows = (contact for read in contacts for contact in read)
    while batch := list(islice(rows, MAX_BATCH_RECORDS)):
        ids, bodies, hashes = zip(*batch, strict=True)
        yield list(ids), list(bodies), list(hashes)


def still_delivered(entry: JournalEntry, delivered: set[tuple[str, str]]) -> JournalEntry:
    """An accepted journal entry, without the records a later entry took back (listed invalid afterwards)."""
    return _keeping(entry, [(i, h) for i, h in zip(entry.ids, entry.hashes) if (i, h) in delivered])


def only(entry: JournalEntry, ids: Container[str]) -> JournalEntry:
    """An accepted journal entry, with only the records of these ids."""
    return _keeping(entry, [(i, h) for i, h in zip(entry.ids, entry.hashes) if i in ids])


def _keeping(entry: JournalEntry, kept: list[tuple[str, str]]) -> JournalEntry:
    return replace(entry, ids=[i for i, _ in kept], hashes=[h for _, h in kept], accepted=len(kept))


def within_cap(fits: np.ndarray, cap: int, delivered: int, owed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the rows this try sends, in order; the rows it defers) of those that `fits` marks, under
    `max_contacts_per_run` (0: no cap), counting what earlier tries of the run delivered; owed contacts (marked
    by `owed`) go first, so a cap never starves the longest owed."""
    if not cap:
        return np.flatnonzero(fits), np.zeros(0, np.int64)
    ordered = np.concatenate([np.flatnonzero(fits & owed), np.flatnonzero(fits & ~owed)])
    room = max(cap - delivered, 0)
    return ordered[:room], ordered[room:]


def accepted(entry: JournalEntry) -> bool:
    return entry.outcome == PushOutcome.SENT


def refused_as_a_whole(entry: JournalEntry, owed: set[str]) -> bool:
    """Ometria rejected every record of a batch with many new ones: not a few bad records, a cause they share."""
    fresh = sum(i not in owed for i in entry.ids)
    return entry.outcome == PushOutcome.REJECTED and fresh >= MIN_SHARED_CAUSE


def rejection_verdict(outcome: LoadOutcome, owed: set[str], refused_whole: JournalEntry | None, errors: list[dict],
                      max_share: float, listed: list[dict] = ()) -> str:
    """Why the load fails for what Ometria rejected, or "" when the rejections are few and stay held (owed)."""
    rejected = sum(i not in owed for i in outcome.rejected_ids)
    tried = rejected + sum(i not in owed for i in outcome.accepted_ids)
    share = rejected / tried if tried else 0.0
    if refused_whole is not None:
        why = f"Ometria rejected every record of a batch of {len(refused_whole.ids)}; sending stopped"
    elif share > max_share and rejected >= MIN_SHARED_CAUSE:  # a quiet hour's one reject is held, not a cause
        why = (f"Ometria rejected {rejected} of {tried} contacts ({share:.1%}, more than "
               f"max_rejected_share {max_share:.0%})")
    else:
        return ""
    return (f"{why}. {likely_cause(errors, listed)} Those contacts stay owed and are sent again once Ometria accepts "
            "them: fix the cause, then clear the run or wait for the next one.")


def reported_later(errors: list[dict], bodies: list[bytes], accepted: int, max_share: float) -> list[dict]:
    """Ometria's new validation errors on fields these contacts carry, when too many to be another source's (the
    list is account-wide): Ometria counted the records accepted, then listed them invalid, without saying which."""
    carried = set()
    for body in bodies[:FIELDS_SAMPLE]:  # the fields a run sends show in its first contacts
        record = json.loads(body)
        carried.update(f"root > {key}" for key in record)
        carried.update(f"root > properties > {key}" for key in record.get("properties", {}))
        carried.update(f"root > channels > sms > {key}" for key in record.get("channels", {}).get("sms", {}))
    ours = [e for e in errors if str(e.get("error_path")) in carried]
    return ours if len(ours) >= MIN_SHARED_CAUSE and len(ours) > max_share * max(accepted, 1) else []


def likely_cause(errors: list[dict], listed_before: list[dict] = ()) -> str:
    """A likely cause from Ometria's newest validation errors (`error_path`, `error_message`): those new since
    the last poll, else the newest listed (its entries carry no time: they may be older than this run)."""
    older = not errors and bool(listed_before)
    newest = (errors or list(listed_before))[-5:]
    if not newest:
        return "Ometria listed no validation error at /v2/push/_errors."
    listed = "; ".join(f"{e.get('error_path')}: {e.get('error_message')}" for e in newest)
    missing = sorted({str(e.get("error_path")) for e in newest if "unknown" in str(e.get("error_message")).lower()})
    hint = (f"A custom field may be missing in Ometria: {', '.join(missing)} (create it, or fix its row in "
            "contacts.csv). " if missing else "")
    if older:
        return (f"{hint}Ometria's error list shows nothing new since the last poll (it keeps the newest 100, "
                f"without times); its newest entries, maybe older than this run: {listed}.")
    return f"{hint}Ometria's newest errors: {listed}."


def push_leavers(client: OmetriaClient, staging: Path, plan: Plan, store: StateStore | None,
                 settings: SyncSettings, journal: Journal, leavers: list[dict]) -> None:
    """Members who left the programme leave the configured list (`@remove_from_lists`); consent untouched."""
    if not leavers:
        return
    ids = [r["id"] for r in leavers]
    if settings.list_id:
        head = {"@type": "contact", "@collection": settings.collection, "@merge": True,
                "@remove_from_lists": [int(settings.list_id)]}
        removals = [(i, encode_record({**head, "id": i})) for i in ids]
        for batch_ids, bodies in batches(removals):
            entries = push_isolating(client, batch_ids, bodies)
            journal.append([e.tagged(plan.attempt, removal=True).as_dict() for e in entries])
            done = [i for e in entries if accepted(e) for i in e.ids]
            if store is not None and done:
                store.contacts.record_left(done, plan.run_id, "left the programme: removed from the list")
        return
    if store is not None:
        store.contacts.record_left(ids, plan.run_id, "left the programme (no list configured)")


def new_push_errors(client: OmetriaClient, store: StateStore | None) -> list[dict]:
    """Ometria's validation errors reported since the last poll (its list is account-wide, the newest 100)."""
    try:
        errors = client.push_errors()
    except AuthenticationFailed:
        raise
    except ApiError as exc:
        return [{"error_path": "", "error_message": f"could not read /v2/push/_errors: {exc}"}]
    if store is None:
        return errors
    seen = Counter((str(e.get("error_path")), str(e.get("error_message"))) for e in store.push_errors.last_polled())
    fresh = []
    for error in errors:
        key = (str(error.get("error_path")), str(error.get("error_message")))
        if seen[key] > 0:
            seen[key] -= 1
        else:
            fresh.append(error)
    store.push_errors.remember(errors)
    return fresh


def journal_entries(staging: Path, plan: Plan) -> list[JournalEntry]:
    """This attempt's entries of the load journal (earlier attempts of the same run id are ignored)."""
    return [JournalEntry.of(e) for e in read_journal(staging) if e.get("attempt") == plan.attempt]


def summarise_load(staging: Path, plan: Plan, staged: set[str]) -> LoadOutcome:
    """What this attempt's load journal says of the `staged` contacts: for each, its latest push decides."""
    everything = journal_entries(staging, plan)
    contacts = [e for e in everything if not e.removal]
    by_outcome = _latest_outcomes(contacts, staged)
    removed = _removals(everything)
    return LoadOutcome(
        batches=sum(1 for e in contacts if e.status == ANSWERED),
        accepted_ids=by_outcome[PushOutcome.SENT], rejected_ids=by_outcome[PushOutcome.REJECTED],
        failed_ids=by_outcome[PushOutcome.FAILED],
        refused_oversized=len(read_ndjson(staging / OVERSIZED)),
        removed_from_list=sum(removed.values()), failed_removal_ids=[i for i, done in removed.items() if not done],
        errors=_latest_errors(everything), reached=frozenset(i for e in everything for i in e.ids),
    )


def _latest_errors(entries: list[JournalEntry]) -> dict[str, str]:
    latest = {i: e.error for e in entries for i in e.ids}
    return {i: error for i, error in latest.items() if error}


def keep_outcome(staging: Path, plan: Plan, outcome: LoadOutcome | None) -> None:
    """Write the load's account of its attempt for the report (None: a try is under way, its outcome unknown)."""
    kept = json.dumps({"attempt": plan.attempt, "outcome": outcome.as_dict() if outcome is not None else None},
                      ensure_ascii=False)
    if not isinstance(staging, Path):  # object storage: a put is whole or nothing
        (staging / OUTCOME).write_text(kept, encoding="utf-8")
        return
    written = staging / f"{OUTCOME}.partial"  # a kill while writing leaves the previous account whole
    written.write_text(kept, encoding="utf-8")
    written.replace(staging / OUTCOME)


def load_outcome(staging: Path, plan: Plan, staged: set[str]) -> LoadOutcome:
    """The load's account of this attempt; from its journal when the load stopped before giving one (a crash, a
    refused API key)."""
    path = staging / OUTCOME
    kept = json.loads(path.read_text()) if path.exists() else {}
    if kept.get("attempt") == plan.attempt and kept.get("outcome") is not None:
        return LoadOutcome.of(kept["outcome"])
    return summarise_load(staging, plan, staged)


def _latest_outcomes(entries: list[JournalEntry], staged: set[str]) -> dict[PushOutcome, list[str]]:
    """The staged contacts by the outcome of their latest push."""
    latest = {i: e.outcome for e in entries for i in e.ids if i in staged}
    by_outcome: dict[PushOutcome, list[str]] = {outcome: [] for outcome in PushOutcome}
    for contact_id, outcome in latest.items():
        by_outcome[outcome].append(contact_id)
    return by_outcome


def _removals(entries: list[JournalEntry]) -> dict[str, bool]:
    """Leaver id → whether Ometria accepted its removal from the list (its latest push decides)."""
    return {i: accepted(e) for e in entries if e.removal for i in e.ids}
