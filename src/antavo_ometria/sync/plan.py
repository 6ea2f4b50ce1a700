"""The plan step: full or incremental (first run, mapping changed, full_resync asked, a re-sync left unfinished), and the window."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

from antavo_ometria.sync.mapping import ContactMapping
from antavo_ometria.sync.records import Plan
from antavo_ometria.sync.state import StateStore

log = logging.getLogger(__name__)

def plan_run(
    store: StateStore,
    mapping: ContactMapping,
    dag_id: str,
    run_id: str,
    interval: tuple[datetime | None, datetime | None] = (None, None),
    run_type: str = "scheduled",
    full_resync: bool = False,
    dry_run: bool = False,
) -> Plan:
    """Full or incremental, and over which window. A changed mapping re-syncs every contact."""
    for warning in mapping.warnings:
        log.warning("mapping: %s", warning)
    last = store.last_successful_run(dag_id)
    reason = None
    unfinished = store.pending_full_resync(dag_id) if last is not None else None
    if full_resync:
        reason = "full re-sync requested"
    elif unfinished is not None:
        reason = f"the full re-sync of run {unfinished} did not complete: it is done again"
    elif last is None:
        reason = "first run: nothing has been synced yet"
    elif not mapping.is_version(last["mapping_version"]):
        reason = (f"the mapping changed ({last['mapping_version']} → {mapping.version}): "
                  "every contact is re-sent with the new mapping")
    start, end = interval
    if end is None or run_type == "manual":  # a run started by hand syncs up to the moment it starts
        end = datetime.now(UTC)
    synced = store.synced_until(dag_id) if last is not None else None
    resumed = None
    if start is None:  # a manual run without a data interval resumes where syncing got to
        start = synced
    elif synced is not None and synced < start and run_type != "backfill":
        resumed = (f"resuming from {synced.isoformat()}, where syncing last got to: the runs for "
                   f"{synced.isoformat()} → {start.isoformat()} did not complete")
        log.warning("%s", resumed)
        start = synced
    mode = "full" if reason or start is None else "incremental"
    if reason:
        log.warning("%s FULL RE-SYNC: %s %s", "=" * 20, reason, "=" * 20)
    since = start - timedelta(minutes=mapping.settings.overlap_minutes) if mode == "incremental" else None
    last_full = store.last_successful_run(dag_id, full_only=True)
    plan = Plan(
        dag_id=dag_id, run_id=run_id, attempt=uuid.uuid4().hex[:12], mode=mode, full_resync_reason=reason,
        resumed=resumed if mode == "incremental" else None,
        send_unchanged=reason is not None or run_type == "backfill",  # a backfill re-syncs what it covers
        dry_run=dry_run, mapping_version=mapping.version, since=since.isoformat() if since else None,
        until=end.isoformat(), previous_full_count=last_full["extracted"] if last_full else None,
    )
    store.start_run(dag_id, run_id, mode=mode, full_resync_reason=reason, dry_run=dry_run,
                    mapping_version=mapping.version, interval_start=start, interval_end=end)
    log.info("plan: %s", {k: v for k, v in plan.as_dict().items() if v is not None})
    return plan
