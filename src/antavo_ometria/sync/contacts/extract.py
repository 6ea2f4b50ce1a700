"""The extract step: every customer (full), or those updated in the plan's window (incremental), staged as NDJSON."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from antavo_ometria.antavo.client import PAGE_OVERLAP, READ_API_PAGE_LIMIT, AntavoClient
from antavo_ometria.antavo.records import NOT_FOUND
from antavo_ometria.sync.contacts.staged_files import (
    ASYNC_ERRORS,
    CONTACTS,
    CUSTOMERS,
    GX_RESULT,
    INACTIVE,
    LEAVERS,
    OVERSIZED,
    QUARANTINE,
    REPORT,
    Progress,
    make_folder,
    write_customers,
    write_ndjson,
)
from antavo_ometria.sync.contacts.step_results import Extracted, Plan

log = logging.getLogger(__name__)


PROFILE_CHUNK = 1000  # increments fetch full profiles this many at a time

def extract(client: AntavoClient, staging: Path, plan: Plan | dict, status: str = "active",
            paths: Iterable[str] = ()) -> Extracted:
    """Every customer (full), or those updated in the plan's window (incremental), staged as NDJSON.

    `paths` are the loyalty fields the mapping reads: incremental profile reads ask Antavo for them."""
    plan = Plan.of(plan)
    make_folder(staging)
    for name in (CONTACTS, QUARANTINE, OVERSIZED, LEAVERS, INACTIVE, ASYNC_ERRORS, GX_RESULT, REPORT):  # an earlier try's results
        (staging / name).unlink(missing_ok=True)
    progress = Progress("extract", "customers")
    reads: dict = {}
    count, duplicates = write_customers(staging, _customer_pages(client, plan, status, list(paths), reads), progress)
    write_ndjson(staging / INACTIVE, ({"id": i} for i in reads.pop("inactive", [])))
    log.info("extracted %d customers (%s, %d requests)", count, plan.mode, client.requests_made)
    if duplicates:
        log.warning("%d customer(s) came twice from Antavo (a page boundary moved); kept the copy updated last: %s",
                    len(duplicates), ", ".join(duplicates[:10]))
    return Extracted(str(staging / CUSTOMERS), count, plan.mode, len(duplicates), **reads)


def choose_reads(changed: int, population: int | None) -> tuple[str, str]:
    """("profiles" or "scan", why): the cheaper way, in requests, to read `changed` customers out of `population`.

    Profile reads cost a request per customer; a Read API scan a request per page of customers."""
    if not population:
        return "profiles", f"{changed:,} profile reads (no full load yet tells how large a scan would be)"
    scan = math.ceil(population / (READ_API_PAGE_LIMIT - PAGE_OVERLAP))
    costs = f"{changed:,} profile reads against a Read API scan of ~{scan:,} pages ({population:,} customers)"
    return ("scan", f"scan: {costs}") if scan < changed else ("profiles", f"profile reads: {costs}")


def _customer_pages(client: AntavoClient, plan: Plan, status: str, paths: list[str], reads: dict):
    """The customers to stage, a page at a time; `reads` gets how they were read (and, last, who left)."""
    if plan.mode == "full":
        reads.update(reads="scan", reads_reason="full load: every customer, a Read API page at a time")
        yield from client.iter_customer_pages(status)
        return
    ids = _changed_ids(client, plan, reads)
    way, why = choose_reads(len(ids), plan.previous_full_count)
    reads.update(reads=way, reads_reason=why)
    log.info("%d customers changed since %s; reading them by %s", len(ids), plan.since, why)
    if way == "scan":  # the changed ones out of every page; any the scan does not list are read one by one
        ids = yield from _scanned(client, status, ids, reads)
    yield from _profiles(client, ids, status, paths, reads)


def _changed_ids(client: AntavoClient, plan: Plan, reads: dict) -> list[str]:
    """The customers changed in the plan's window, and the owed contacts due a retry."""
    change_list = client.read_change_list(datetime.fromisoformat(plan.since), datetime.fromisoformat(plan.until))
    ids = list(dict.fromkeys([*change_list.ids, *plan.retry_ids]))
    if plan.retry_ids:
        log.info("%d owed contacts (rejected or not delivered before) are read again to be retried",
                 len(plan.retry_ids))
    if change_list.suspect_missed:
        reads.update(suspect_missed=True, suspect_reason=change_list.reason)
    return ids


def _scanned(client: AntavoClient, status: str, ids: list[str], reads: dict):
    """The pages of a Read API scan, kept to the customers in `ids`; returns the ids the scan did not list."""
    seen: set = set()
    for page in client.iter_customer_pages(status, only=set(ids)):
        seen.update(c["id"] for c in page)
        yield page
    missing = [i for i in ids if i not in seen]
    if missing:
        log.info("%d changed customers were not in the scan (%s status filter): read one by one",
                 len(missing), status or "no")
        reads["reads_reason"] += f"; {len(missing):,} the scan did not list ({status or 'any'} status), read one by one"
    return missing


def _profiles(client: AntavoClient, ids: list[str], status: str, paths: list[str], reads: dict):
    """The customers' profiles, a chunk at a time, without those who left; `reads["inactive"]` gets the leavers."""
    inactive: list[str] = []
    for start in range(0, len(ids), PROFILE_CHUNK):
        profiles = client.get_customers(ids[start: start + PROFILE_CHUNK], paths)
        left = {c["id"] for c in profiles  # deleted, or no longer of the status synced
                if c.get(NOT_FOUND) or (status and c.get("status") not in (status, None))}
        inactive += left
        yield [c for c in profiles if c["id"] not in left]  # no longer among the customers synced: leavers
    reads["inactive"] = inactive
