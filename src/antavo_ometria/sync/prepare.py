"""The transform step: customers → checked, encoded Ometria contacts that differ from what was last sent.

Maps (transform.py), checks (quality.py), quarantines with every reason, and skips what Ometria already has."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Collection
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from antavo_ometria.antavo.records import HELD
from antavo_ometria.ometria.payload import encode_contacts
from antavo_ometria.sync.columnar import CHUNK_ROWS, prepared_chunks
from antavo_ometria.sync.mapping import ContactMapping
from antavo_ometria.sync.quality import GxBlock, QualityGateFailed, batch_verdict, run_gate
from antavo_ometria.sync.staging import (
    CONTACTS,
    CONTACTS_SCHEMA,
    CUSTOMERS,
    GX_RESULT,
    INACTIVE,
    LEAVERS,
    QUARANTINE,
    Progress,
    read_ndjson,
    write_ndjson,
)
from antavo_ometria.sync.state import HELD_BACK, LEFT, StateStore
from antavo_ometria.sync.step_results import Plan, Transformed
from antavo_ometria.sync.transform import transform

log = logging.getLogger(__name__)

GX_BLOCK_ROWS = 125_000  # customers Great Expectations validates per call: its fixed cost (~0.4 s) is paid per block;
# GX holds several copies of a block, so memory grows with it


def prepare_contacts(columns: pd.DataFrame, mapping: ContactMapping, duplicate_ids: Collection[str] = ()):
    """Customer columns → (payload frame, encoded records, quality gate result), row for row."""
    frame = transform(columns, mapping)
    encoded = encode_contacts(frame, mapping.shape)
    problems = columns[HELD] if HELD in columns else None
    return frame, encoded, run_gate(frame, mapping, [len(body) for body in encoded], duplicate_ids, problems)


def transform_staged(staging: Path, mapping: ContactMapping, plan: Plan | dict, store: StateStore | None = None,
                     rows: int = CHUNK_ROWS, threads: int | None = None) -> Transformed:
    """Staged customers → checked, encoded Ometria contacts that differ from what was last sent.

    Streams the staged customers in chunks of `rows`, prepared by DuckDB on `threads` (see columnar.py), so
    memory does not grow with the programme. Quarantined customers go to
    quarantine.ndjson (and the state store) with every reason. Raises QualityGateFailed, after writing the
    quarantine and GX's results, when the run as a whole fails.
    """
    plan = Plan.of(plan)
    if store is not None:
        store.clear_held(plan.run_id, "quarantined")
    held_before = store.held_ids("quarantined") if store is not None else set()  # who passes again is released
    checked = quarantined = valid = changed = resent_unchanged = owed_settled = 0
    retrying = set(plan.retry_ids) if plan.mode == "incremental" or store is None else set(store.owed_ids())
    members = store.member_ids() if store is not None and plan.mode == "full" else None
    seen: set = set()
    quarantined_ids: set = set()  # owed contacts the gate holds back
    reasons: Counter = Counter()
    non_null: Counter = Counter()
    validations = []
    block = GxBlock(mapping)
    progress = Progress("transform and check", "customers")
    with (staging / QUARANTINE).open("w", encoding="utf-8") as held, \
            (staging / CONTACTS).open("wb") as sink, pq.ParquetWriter(sink, CONTACTS_SCHEMA) as writer:
        for chunk in prepared_chunks(staging / CUSTOMERS, mapping, rows=rows, threads=threads):
            ids, encoded, hashes, gate = chunk.ids, chunk.encoded, chunk.hashes.to_pylist(), chunk.gate
            rows_held = [{"id": ids[row], "reasons": [f["message"] for f in fails], "failures": fails,
                          "payload": json.loads(encoded[row].as_py())} for row, fails in sorted(gate.failures.items())]
            quarantined_ids.update(r["id"] for r in rows_held if r["id"] in retrying)
            held.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows_held)
            if store is not None:
                store.record_held(plan.run_id, "quarantined", rows_held)
            ok = np.flatnonzero(gate.valid.to_numpy())
            passing_again = [ids[k] for k in ok if ids[k] in held_before]
            if passing_again:
                store.release_held(passing_again, ("quarantined",))
            known = {} if store is None else store.accepted_hashes([ids[k] for k in ok])
            same = {ids[k] for k in ok if known.get(ids[k]) == hashes[k]}
            keep = [k for k in ok if plan.send_unchanged or ids[k] not in same]
            resent_unchanged += len(same) if plan.send_unchanged else 0
            settled = [(ids[k], hashes[k]) for k in ok if ids[k] in retrying and ids[k] in same]
            if settled and not plan.send_unchanged and not plan.dry_run:  # Ometria has it already: owed no more
                store.record_accepted(settled, plan.mapping_version, plan.run_id)
                owed_settled += len(settled)
            if members is not None:
                seen.update(ids)
            writer.write_table(pa.table({
                "id": pa.array([ids[k] for k in keep], pa.string()),
                "body": encoded.take(pa.array(keep, pa.int64())),
                "hash": chunk.hashes.take(pa.array(keep, pa.int64())),
            }, schema=CONTACTS_SCHEMA))
            checked += gate.checked
            quarantined += gate.quarantined
            valid += len(ok)
            changed += len(keep)
            reasons.update(gate.reasons_count())
            non_null.update(gate.non_null)
            block.add(gate)
            if block.rows >= GX_BLOCK_ROWS:
                validations.append(block.validate())
            progress.advance(gate.checked)
        if block.rows:
            validations.append(block.validate())
    progress.advance(0, force=True)
    (staging / GX_RESULT).write_text(json.dumps(validations, default=str), encoding="utf-8")
    blocking, warnings = batch_verdict(checked, quarantined, dict(non_null),
                                       plan.previous_full_count if plan.mode == "full" else None, mapping)
    summary = {"checked": checked, "passed": checked - quarantined, "quarantined": quarantined,
               "quarantined_by_check": dict(reasons), "warnings": warnings, "blocking": blocking,
               "empty_share": {f.remote_field: round(1 - non_null.get(f.remote_field, 0) / checked, 4)
                               for f in mapping.fields} if checked else {}}
    log.info("quality gate: %d checked, %d passed, %d quarantined %s", checked, checked - quarantined,
             quarantined, dict(reasons))
    for warning in warnings:
        log.warning("quality warning: %s", warning)
    if blocking:
        raise QualityGateFailed("; ".join(blocking) + f". Nothing was sent. Quarantined customers and "
                                f"reasons: {staging / QUARANTINE}; GX results: {staging / GX_RESULT}")
    leavers = sorted(members - seen) if members is not None else []
    inactive = [r["id"] for r in read_ndjson(staging / INACTIVE)] if (staging / INACTIVE).exists() else []
    if inactive and store is not None:  # read one by one and no longer active: members among them leave
        leavers += sorted(store.accepted_hashes(inactive))
    check_leavers(len(leavers), len(members) if members is not None else store.contact_count() if store else None,
                  mapping.settings.max_leaver_share)
    if store is not None and not plan.dry_run:
        close_owed(store, plan, retrying, set(inactive) - set(leavers), quarantined_ids)
    write_ndjson(staging / LEAVERS, ({"id": i} for i in leavers))
    log.info("%d contacts to send, %d unchanged since Ometria accepted them, %d members left the programme",
             changed, valid - changed, len(leavers))
    return Transformed(customers=checked, valid=valid, changed=changed, unchanged=valid - changed,
                       quarantined=quarantined, quarantine_reasons=dict(reasons), quality=summary,
                       mapping_version=mapping.version, payload_mode=mapping.settings.payload_mode,
                       resent_unchanged=resent_unchanged, owed_settled=owed_settled, leavers=len(leavers))


def close_owed(store: StateStore, plan: Plan, owed: set[str], gone: set[str], held: set[str]) -> None:
    """Owed contacts this run cannot send are owed no more, so they are not read again every run: those no longer
    active in Antavo (never members: nothing to remove), and those the quality gate holds back (held, with their
    reasons, until they change in Antavo)."""
    store.close_owed(sorted(owed & gone), plan.run_id, LEFT, "no longer active in Antavo: no longer owed")
    store.close_owed(sorted(owed & held), plan.run_id, HELD_BACK, "held back by the quality gate (see the "
                     "quarantine): sent once it changes in Antavo")


class TooManyLeavers(QualityGateFailed):
    """More members would leave the list in one run than `max_leaver_share`: most likely a truncated read."""


def check_leavers(leaving: int, members: int | None, max_share: float) -> None:
    """Stop before anyone is removed when more members would leave than a run plausibly sees (a full read;
    an incremental run's leavers were each read as no longer active)."""
    if members and leaving / members > max_share:
        raise TooManyLeavers(
            f"{leaving:,} of {members:,} members ({leaving / members:.1%}) are no longer among Antavo's "
            f"active customers, more than max_leaver_share ({max_share:.0%}): a truncated read is more likely "
            "than so many leaving at once. Nobody was removed from the list and nothing was sent. If they did "
            "leave, raise max_leaver_share in settings.toml for one run.")
