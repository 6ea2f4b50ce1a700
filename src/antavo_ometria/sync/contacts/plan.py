"""The plan step: full or incremental (first run, mapping changed, full_resync asked, a re-sync left unfinished), and the window."""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict
from datetime import UTC, datetime, timedelta

from antavo_ometria.sync.contacts.step_results import Plan
from antavo_ometria.sync.store.state import StateStore, utc
from antavo_ometria.sync.tables.mapping import ContactMapping

log = logging.getLogger(__name__)

MAX_RETRY_READS = 10_000  # owed contacts an incremental run reads again one by one; more make it a reconciliation

def plan_run(
    store: StateStore,
    mapping: ContactMapping,
    dag_id: str,
    run_id: str,
    interval: tuple[datetime | None, datetime | None] = (None, None),
    run_type: str = "scheduled",
    full_resync: bool = False,
    dry_run: bool = False,
    reconcile: bool = False,
) -> Plan:
    """Full or incremental, and over which window. A changed mapping re-syncs every contact; a reconciliation
    (asked for, due by `reconcile_every_hours`, after a run that suspected missed changes, or when more
    contacts are owed than profile reads should fetch) reads every customer and sends only what differs
    from what Ometria accepted. Owed contacts due a retry are read again by an incremental run."""
    for warning in mapping.warnings:
        log.warning("mapping: %s", warning)
    last = store.runs.last_successful(dag_id)
    unfinished = store.runs.pending_full_resync(dag_id) if last is not None else None
    reason = resync_reason(full_resync, unfinished, last, mapping)
    synced = store.runs.synced_until(dag_id) if last is not None else None
    start, end, resumed = run_window(interval, run_type, synced, datetime.now(UTC))
    retry_ids = [] if last is None else store.contacts.owed_ids(due_by=datetime.now(UTC), limit=MAX_RETRY_READS + 1)
    reconcile_reason = None
    if not reason and start is not None and run_type != "backfill":
        reconcile_reason = reconciliation_due(store, dag_id, mapping, reconcile, len(retry_ids))
    mode = "full" if reason or reconcile_reason or start is None else "incremental"
    _announce(reason, reconcile_reason, resumed)
    last_full = store.runs.last_successful(dag_id, full_only=True)
    plan = Plan(
        dag_id=dag_id, run_id=run_id, attempt=uuid.uuid4().hex[:12], mode=mode, full_resync_reason=reason,
        send_unchanged=reason is not None or run_type == "backfill",  # a backfill re-syncs what it covers
        dry_run=dry_run, mapping_version=mapping.version, until=end.isoformat(),
        previous_full_count=last_full["extracted"] if last_full else None, reconcile_reason=reconcile_reason,
        settings=asdict(mapping.settings),
        **_incremental(mode, start, mapping.settings.overlap_minutes, resumed, retry_ids),
    )
    store.runs.start(dag_id, run_id, mode=mode, full_resync_reason=reason, dry_run=dry_run,
                     reconcile_reason=reconcile_reason,
                     mapping_version=mapping.version, interval_start=start, interval_end=end)
    log.info("plan: %s", {k: v for k, v in plan.as_dict().items() if v is not None})
    return plan


def _incremental(mode: str, start: datetime | None, overlap_minutes: float, resumed: str | None,
                 retry_ids: list[str]) -> dict:
    """The plan's fields that only an incremental run has: where it reads from, and the owed it reads again."""
    if mode != "incremental":
        return {"since": None, "resumed": None, "retry_ids": ()}
    since = start - timedelta(minutes=overlap_minutes)
    return {"since": since.isoformat(), "resumed": resumed, "retry_ids": tuple(retry_ids)}


def _announce(reason: str | None, reconcile_reason: str | None, resumed: str | None) -> None:
    if resumed:
        log.warning("%s", resumed)
    if reason:
        log.warning("%s FULL RE-SYNC: %s %s", "=" * 20, reason, "=" * 20)
    elif reconcile_reason:
        log.warning("RECONCILIATION: %s; every customer is read, only what differs is sent", reconcile_reason)


def resync_reason(asked: bool, unfinished: str | None, last: dict | None, mapping: ContactMapping) -> str | None:
    """Why every contact is re-sent (`last`: the last successful run, if any), or None."""
    if asked:
        return "full re-sync requested"
    if unfinished is not None:
        return f"the full re-sync of run {unfinished} did not complete: it is done again"
    if last is None:
        return "first run: nothing has been synced yet"
    if not mapping.is_version(last["mapping_version"]):
        return (f"the mapping changed ({last['mapping_version']} → {mapping.version}): "
                "every contact is re-sent with the new mapping")
    return None


def run_window(interval: tuple[datetime | None, datetime | None], run_type: str, synced: datetime | None,
               moment: datetime) -> tuple[datetime | None, datetime, str | None]:
    """(start, end, why it starts early) of the run's window, given where syncing got to (`synced`)."""
    start, end = interval
    if end is None or run_type == "manual":  # a run started by hand syncs up to the moment it starts
        end = moment
    if start is None:  # a manual run without a data interval resumes where syncing got to
        return synced, end, None
    if synced is not None and synced < start and run_type != "backfill":
        return synced, end, (f"resuming from {synced.isoformat()}, where syncing last got to: the runs for "
                             f"{synced.isoformat()} → {start.isoformat()} did not complete")
    return start, end, None


def reconciliation_due(store: StateStore, dag_id: str, mapping: ContactMapping, asked: bool,
                       owed_due: int) -> str | None:
    """Why this run reconciles (reads every customer), or None."""
    if asked:
        return "reconciliation requested"
    if owed_due > MAX_RETRY_READS:
        return f"more than {MAX_RETRY_READS:,} owed contacts are due a retry: one scan reads them all"
    suspected = store.runs.reconciliation_requested(dag_id)
    if suspected:
        return f"an earlier run suspected missed changes ({suspected})"
    unfinished = store.runs.pending_reconciliation(dag_id)
    if unfinished:
        return f"the reconciliation of run {unfinished} did not complete: it is done again"
    every = mapping.settings.reconcile_every_hours
    last_full = store.runs.last_successful(dag_id, full_only=True)
    if every and last_full is not None:
        age = datetime.now(UTC) - utc(last_full["finished_at"])
        if age >= timedelta(hours=every):
            return (f"the last full read was {age.total_seconds() / 3600:.0f} h ago "
                    f"(reconcile_every_hours = {every:g})")
    return None
