"""The load step: push the staged contacts, journal every push, and remember what Ometria received."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from antavo_ometria.ometria.client import OmetriaClient
from antavo_ometria.ometria.payload import encode_record
from antavo_ometria.ometria.push import batches, push_isolating, record_status, split_oversized
from antavo_ometria.sync.contact_push import Recorder
from antavo_ometria.sync.records import Loaded, Plan
from antavo_ometria.sync.settings import SyncSettings
from antavo_ometria.sync.staging import (
    ASYNC_ERRORS,
    DEFERRED,
    LEAVERS,
    OVERSIZED,
    Journal,
    Progress,
    read_contacts,
    read_journal,
    read_ndjson,
    write_ndjson,
)
from antavo_ometria.sync.state import DEFERRED as DEFERRED_STATUS
from antavo_ometria.sync.state import Backoff, StateStore
from antavo_ometria.transport import ApiError, AuthenticationFailed

log = logging.getLogger(__name__)

MIN_SHARED_CAUSE = 10  # new rejections that can show a shared cause: a whole batch of them, or a share of the run


class LoadFailed(Exception):
    """Some batches could not be delivered; they are recorded in the load journal.

    `retryable` is false when every failure was permanent (e.g. a refused API key): a retry cannot help.
    """

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def load_staged(staging: Path, client: OmetriaClient, plan: Plan | dict, store: StateStore | None = None,
                settings: SyncSettings = SyncSettings()) -> Loaded:
    """Push the staged contacts in batches of 100; a retry of this attempt skips what it already delivered.

    What counts as delivered is an (id, payload hash) pair that this attempt of the run pushed and Ometria
    accepted, so a re-planned run (Clear, backfill) sends again, and a changed payload is always sent.
    A batch with records Ometria rejected is split until each rejected record stands alone. A rejected or
    undelivered contact stays owed in the state store and is tried again by later runs (settings' backoff).
    The load fails, and stops sending, when Ometria refuses a whole batch of records (most likely a field
    missing in the account) or more than `max_rejected_share` of the run's contacts.
    """
    plan = Plan.of(plan)
    contacts = read_contacts(staging)
    leavers = read_ndjson(staging / LEAVERS)
    if plan.dry_run:
        log.info("dry run: %d contacts would be sent and %d removed from the list; nothing was sent",
                 len(contacts), len(leavers))
        return Loaded(0, 0, 0, 0, 0, 0, dry_run=True, would_send=len(contacts))
    journal = Journal(staging)
    earlier = [e for e in journal_entries(staging, plan) if not e.get("removal")]  # contacts, not list removals
    hashes_of = {i: h for i, _, h in contacts}
    record = Recorder(store, plan.mapping_version, plan.run_id,
                      Backoff(settings.retry_first_hours, settings.retry_max_hours), {i: b for i, b, _ in contacts})
    latest = {(i, h): accepted(e) for e in earlier for i, h in zip(e["ids"], e["hashes"])}  # the newest word counts
    delivered = {pair for pair, ok in latest.items() if ok}
    if delivered:  # a retry: the store may have missed what was delivered before a crash
        record([still_delivered(e, delivered) for e in earlier if accepted(e)])
    pending = [(i, b, h) for i, b, h in contacts if (i, h) not in delivered]
    fits, oversized = split_oversized((i, b) for i, b, _ in pending)
    # owed by earlier runs (in any mode): rejected again, they stay held, and do not make the load fail
    owed = set(plan.retry_ids) if store is None else store.owed_among([i for i, _, _ in contacts], plan.run_id)
    fits, deferred = within_cap(fits, settings.max_contacts_per_run, len(contacts) - len(pending), owed)
    write_ndjson(staging / DEFERRED, ({"id": i} for i, _ in deferred))
    if deferred:
        log.warning("%d contacts are over max_contacts_per_run (%d): they stay owed and the next run sends them",
                    len(deferred), settings.max_contacts_per_run)
        if store is not None:
            store.record_owed([(i, hashes_of[i]) for i, _ in deferred], DEFERRED_STATUS,
                              f"deferred: over sync.max_contacts_per_run ({settings.max_contacts_per_run:,}) in run "
                              f"{plan.run_id}", plan.mapping_version, plan.run_id, Backoff())
    if delivered:
        log.info("resuming: %d contacts were delivered by an earlier try of this run; %d to send",
                 len(contacts) - len(pending), len(fits))
    progress = Progress("load", "contacts", total=len(fits))
    refused_whole = None
    for ids, bodies in batches(fits):
        entries = push_isolating(client, ids, bodies, [hashes_of[i] for i in ids])
        journal.append([{"attempt": plan.attempt, **e} for e in entries])
        record(entries)
        progress.advance(len(ids))
        refused_whole = entries[0] if len(entries) == 1 and refused_as_a_whole(entries[0], owed) else None
        if refused_whole is not None:
            log.error("Ometria rejected every record of a batch of %d: sending stopped", len(refused_whole["ids"]))
            break
    progress.advance(0, force=True)
    write_ndjson(staging / OVERSIZED, ({"id": o.id, "reasons": [o.reason]} for o in oversized))
    if refused_whole is None:
        push_leavers(client, staging, plan, store, settings, journal, leavers)
    errors = new_push_errors(client, store)
    (staging / ASYNC_ERRORS).write_text(json.dumps(errors, ensure_ascii=False), encoding="utf-8")
    summary = summarise_load(staging, plan, {i for i, _, _ in contacts})
    verdict = rejection_verdict(summary, owed, refused_whole, errors, settings.max_rejected_share,
                                store.last_push_errors() if store is not None else ())
    if verdict:
        raise LoadFailed(verdict, retryable=False)
    # with no rejection in Ometria's answers, errors on the run's fields cannot be those of its rejected records
    late = [] if summary["rejected"] else reported_later(errors, [b for _, b, _ in contacts],
                                                         len(summary["accepted_ids"]), settings.max_rejected_share)
    if late:
        unconfirmed = {"attempt": plan.attempt, "ids": summary["accepted_ids"], "status": "FAILED", "retryable": False,
                       "hashes": [hashes_of[i] for i in summary["accepted_ids"]], "accepted": 0, "rejected": 0,
                       "error": f"accepted, then listed invalid by Ometria ({len(late)} errors at /v2/push/_errors, "
                                "which do not say which record)"}
        journal.append([unconfirmed])  # a retry sends them again: nothing of this try counts as delivered
        record([unconfirmed])
        raise LoadFailed(f"Ometria accepted the contacts, then listed {len(late)} validation errors on fields they "
                         f"carry. {likely_cause(late)} The {len(summary['accepted_ids'])} contacts this try sent stay "
                         "owed and are sent again: fix the cause, then clear the run or wait for the next one.",
                         retryable=False)
    stuck = len(summary["failed_removal_ids"])
    if stuck:
        if store is not None:  # the next run reads everyone, and removes them again
            store.request_reconciliation(plan.dag_id, plan.run_id, f"{stuck} leaver(s) could not be removed from the list")
        raise LoadFailed(f"{stuck} member(s) who left the programme could not be removed from the list; a retry, or "
                         "the next run (a reconciliation), removes them", retryable=True)
    if summary["failed"]:
        failures = [e for e in journal_entries(staging, plan) if e["status"] != "OK"]
        retryable = any(e.get("retryable", True) for e in failures)
        raise LoadFailed(f"{summary['failed']} contact(s) were not delivered ({failures[-1].get('error')}); see "
                         f"{journal.folder}. A retry re-sends only those.", retryable=retryable)
    retried = [i for i, _, _ in contacts if i in owed]
    return Loaded(**{k: v for k, v in summary.items() if not k.endswith("_ids")}, async_errors=len(errors),
                  delivered_earlier=len(contacts) - len(pending), deferred=len(deferred), retried=len(retried),
                  retried_accepted=len(set(retried) & set(summary["accepted_ids"])))


def still_delivered(entry: dict, delivered: set[tuple[str, str]]) -> dict:
    """An accepted journal entry, without the records a later entry took back (listed invalid afterwards)."""
    kept = [(i, h) for i, h in zip(entry["ids"], entry["hashes"]) if (i, h) in delivered]
    return {**entry, "ids": [i for i, _ in kept], "hashes": [h for _, h in kept], "accepted": len(kept)}


def within_cap(fits: list[tuple[str, bytes]], cap: int, delivered: int, owed: set[str]
               ) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """(what this try sends, what it defers) under `max_contacts_per_run` (0: no cap), counting what earlier
    tries of the run delivered; owed contacts go first, so a cap never starves the longest owed."""
    if not cap:
        return fits, []
    ordered = sorted(fits, key=lambda fit: fit[0] not in owed)
    room = max(cap - delivered, 0)
    return ordered[:room], ordered[room:]


def accepted(entry: dict) -> bool:
    return record_status(entry) == "sent"


def refused_as_a_whole(entry: dict, owed: set[str]) -> bool:
    """Ometria rejected every record of a batch with many new ones: not a few bad records, a cause they share."""
    fresh = sum(i not in owed for i in entry["ids"])
    return entry["status"] == "OK" and fresh >= MIN_SHARED_CAUSE and entry["rejected"] >= len(entry["ids"])


def rejection_verdict(summary: dict, owed: set[str], refused_whole: dict | None, errors: list[dict],
                      max_share: float, listed: list[dict] = ()) -> str:
    """Why the load fails for what Ometria rejected, or "" when the rejections are few and stay held (owed)."""
    rejected = sum(i not in owed for i in summary["rejected_ids"])
    tried = rejected + sum(i not in owed for i in summary["accepted_ids"])
    share = rejected / tried if tried else 0.0
    if refused_whole is not None:
        why = f"Ometria rejected every record of a batch of {len(refused_whole['ids'])}; sending stopped"
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
    for body in bodies[:1000]:  # the fields a run sends show in its first contacts
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
            journal.append([{"attempt": plan.attempt, "removal": True, **e} for e in entries])
            done = [i for e in entries if accepted(e) for i in e["ids"]]
            if store is not None and done:
                store.record_left(done, plan.run_id, "left the programme: removed from the list")
        return
    if store is not None:
        store.record_left(ids, plan.run_id, "left the programme (no list configured)")


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
    seen = Counter((str(e.get("error_path")), str(e.get("error_message"))) for e in store.last_push_errors())
    fresh = []
    for error in errors:
        key = (str(error.get("error_path")), str(error.get("error_message")))
        if seen[key] > 0:
            seen[key] -= 1
        else:
            fresh.append(error)
    store.remember_push_errors(errors)
    return fresh


def journal_entries(staging: Path, plan: Plan) -> list[dict]:
    """This attempt's entries of the load journal (earlier attempts of the same run id are ignored)."""
    return [e for e in read_journal(staging) if e.get("attempt") == plan.attempt]


def summarise_load(staging: Path, plan: Plan, staged: set[str]) -> dict:
    """Counts and ids from this attempt's load journal, per contact of the `staged` ones: its latest push decides."""
    entries = [e for e in journal_entries(staging, plan) if not e.get("removal")]
    removed = {i: accepted(e) for e in journal_entries(staging, plan) if e.get("removal") for i in e["ids"]}
    latest = {i: record_status(e) for e in entries for i in e["ids"] if i in staged}
    by_status: dict[str, list[str]] = {"sent": [], "rejected": [], "failed": []}
    for contact_id, status in latest.items():
        by_status[status].append(contact_id)
    return {
        "batches": sum(1 for e in entries if e["status"] == "OK"),
        "sent": len(by_status["sent"]) + len(by_status["rejected"]),
        "accepted": len(by_status["sent"]),
        "rejected": len(by_status["rejected"]),
        "failed": len(by_status["failed"]),
        "refused_oversized": len(read_ndjson(staging / OVERSIZED)),
        "removed_from_list": sum(removed.values()),
        "failed_removal_ids": [i for i, done in removed.items() if not done],
        "rejected_ids": by_status["rejected"],
        "accepted_ids": by_status["sent"],
        "failed_ids": by_status["failed"],
    }
