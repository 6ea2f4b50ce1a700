"""The load step: push the staged contacts, journal every push, and remember what Ometria received."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from antavo_ometria.ometria.client import OmetriaClient
from antavo_ometria.ometria.push import batches, push_isolating, record_status, split_oversized
from antavo_ometria.sync.records import Loaded, Plan
from antavo_ometria.sync.staging import (
    ASYNC_ERRORS,
    OVERSIZED,
    Journal,
    Progress,
    read_contacts,
    read_journal,
    read_ndjson,
    write_ndjson,
)
from antavo_ometria.sync.state import StateStore
from antavo_ometria.transport import ApiError, AuthenticationFailed

log = logging.getLogger(__name__)


class LoadFailed(Exception):
    """Some batches could not be delivered; they are recorded in the load journal.

    `retryable` is false when every failure was permanent (e.g. a refused API key): a retry cannot help.
    """

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def load_staged(staging: Path, client: OmetriaClient, plan: Plan | dict, store: StateStore | None = None) -> Loaded:
    """Push the staged contacts in batches of 100; a retry of this attempt skips what it already delivered.

    What counts as delivered is an (id, payload hash) pair that this attempt of the run pushed and Ometria
    acknowledged, so a re-planned run (Clear, backfill) sends again, and a changed payload is always sent.
    A batch with records Ometria rejected is split until each rejected record stands alone; those are
    kept (state store) with their payload and not sent again until their payload changes.
    """
    plan = Plan.of(plan)
    contacts = read_contacts(staging)
    if plan.dry_run:
        log.info("dry run: %d contacts would be sent; nothing was sent", len(contacts))
        return Loaded(0, 0, 0, 0, 0, 0, dry_run=True, would_send=len(contacts))
    journal = Journal(staging)
    earlier = journal_entries(staging, plan)
    if store is not None and earlier:  # a retry: the store may have missed what was delivered before a crash
        remember_sent(store, earlier, plan.mapping_version, plan.run_id, {i: b for i, b, _ in contacts})
    delivered = {(i, h) for e in earlier if e["status"] == "OK" for i, h in zip(e["ids"], e["hashes"])}
    pending = [(i, b, h) for i, b, h in contacts if (i, h) not in delivered]
    hashes = {i: h for i, _, h in pending}
    fits, oversized = split_oversized((i, b) for i, b, _ in pending)
    if delivered:
        log.info("resuming: %d contacts were delivered by an earlier try of this run; %d to send",
                 len(contacts) - len(pending), len(fits))
    progress = Progress("load", "contacts", total=len(fits))
    for ids, bodies in batches(fits):
        entries = push_isolating(client, ids, bodies, [hashes[i] for i in ids])
        journal.append([{"attempt": plan.attempt, **e} for e in entries])
        if store is not None:
            remember_sent(store, entries, plan.mapping_version, plan.run_id, dict(zip(ids, bodies)))
        progress.advance(len(ids))
    progress.advance(0, force=True)
    write_ndjson(staging / OVERSIZED, ({"id": o.id, "reasons": [o.reason]} for o in oversized))
    try:
        errors = client.push_errors()
    except AuthenticationFailed:
        raise
    except ApiError as exc:
        errors = [{"error_path": "", "error_message": f"could not read /v2/push/_errors: {exc}"}]
    (staging / ASYNC_ERRORS).write_text(json.dumps(errors, ensure_ascii=False), encoding="utf-8")
    summary = summarise_load(staging, plan, {i for i, _, _ in contacts})
    if summary["failed"]:
        failures = [e for e in journal_entries(staging, plan) if e["status"] != "OK"]
        retryable = any(e.get("retryable", True) for e in failures)
        raise LoadFailed(f"{summary['failed']} contact(s) were not delivered ({failures[-1].get('error')}); see "
                         f"{journal.folder}. A retry re-sends only those.", retryable=retryable)
    return Loaded(**{k: v for k, v in summary.items() if not k.endswith("_ids")}, async_errors=len(errors))


def remember_sent(store: StateStore, entries: list[dict], mapping_version: str, run_id: str,
                  bodies: dict[str, bytes] | None = None) -> None:
    """Record what Ometria received (with the payloads, when given); a contact that arrived is no longer held
    back for an earlier reason."""
    for entry in entries:
        status = record_status(entry)
        if status != "failed":
            store.record_contacts(zip(entry["ids"], entry["hashes"]), status, mapping_version, run_id,
                                  entry["request_id"], bodies)
        if status == "sent":
            store.release_held(entry["ids"], ("quarantined", "failed", "rejected"))


def journal_entries(staging: Path, plan: Plan) -> list[dict]:
    """This attempt's entries of the load journal (earlier attempts of the same run id are ignored)."""
    return [e for e in read_journal(staging) if e.get("attempt") == plan.attempt]


def summarise_load(staging: Path, plan: Plan, staged: set[str]) -> dict:
    """Counts and ids from this attempt's load journal, per contact of the `staged` ones: its latest push decides."""
    entries = journal_entries(staging, plan)
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
        "rejected_ids": by_status["rejected"],
        "failed_ids": by_status["failed"],
    }
