"""The extract step: every customer (full), or those updated in the plan's window (incremental), staged as NDJSON."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from antavo_ometria.antavo.client import AntavoClient
from antavo_ometria.sync.records import Extracted, Plan
from antavo_ometria.sync.staging import (
    ASYNC_ERRORS,
    CONTACTS,
    CUSTOMERS,
    GX_RESULT,
    OVERSIZED,
    QUARANTINE,
    REPORT,
    Progress,
    make_folder,
    write_customers,
)

log = logging.getLogger(__name__)


PROFILE_CHUNK = 1000  # increments fetch full profiles this many at a time

def extract(client: AntavoClient, staging: Path, plan: Plan | dict, status: str = "active",
            paths: Iterable[str] = ()) -> Extracted:
    """Every customer (full), or those updated in the plan's window (incremental), staged as NDJSON.

    `paths` are the loyalty fields the mapping reads: incremental profile reads ask Antavo for them."""
    plan = Plan.of(plan)
    make_folder(staging)
    for name in (CONTACTS, QUARANTINE, OVERSIZED, ASYNC_ERRORS, GX_RESULT, REPORT):  # an earlier try's results
        (staging / name).unlink(missing_ok=True)
    progress = Progress("extract", "customers")
    count, duplicates = write_customers(staging, _customer_pages(client, plan, status, list(paths)), progress)
    log.info("extracted %d customers (%s, %d requests)", count, plan.mode, client.requests_made)
    if duplicates:
        log.warning("%d customer(s) came twice from Antavo (a page boundary moved); kept the copy updated last: %s",
                    len(duplicates), ", ".join(duplicates[:10]))
    return Extracted(str(staging / CUSTOMERS), count, plan.mode, len(duplicates))


def _customer_pages(client: AntavoClient, plan: Plan, status: str, paths: list[str]):
    if plan.mode == "full":
        yield from client.iter_customer_pages(status)
        return
    ids = client.changed_customer_ids(datetime.fromisoformat(plan.since), datetime.fromisoformat(plan.until))
    log.info("%d customers changed since %s", len(ids), plan.since)
    for start in range(0, len(ids), PROFILE_CHUNK):
        yield client.get_customers(ids[start: start + PROFILE_CHUNK], paths)
