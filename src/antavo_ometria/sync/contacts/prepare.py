"""The transform step: customers → checked, encoded Ometria contacts that differ from what was last sent.

Maps (transform.py), checks (quality.py), quarantines with every reason, and skips what Ometria already has."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from antavo_ometria.antavo.records import HELD
from antavo_ometria.ometria.payload import encode_contacts
from antavo_ometria.sync.contacts.columnar import CHUNK_ROWS, prepared_chunks
from antavo_ometria.sync.contacts.quality import GxBlock, QualityGateFailed, batch_verdict, run_gate
from antavo_ometria.sync.contacts.staged_files import (
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
from antavo_ometria.sync.contacts.step_results import Plan, Transformed
from antavo_ometria.sync.contacts.transform import transform
from antavo_ometria.sync.store.state import HELD_BACK, LEFT, StateStore
from antavo_ometria.sync.tables.mapping import ContactMapping

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
    run = _TransformRun(staging, mapping, Plan.of(plan), store)
    progress = Progress("transform and check", "customers")
    with (staging / QUARANTINE).open("w", encoding="utf-8") as held, \
            (staging / CONTACTS).open("wb") as sink, pq.ParquetWriter(sink, CONTACTS_SCHEMA) as writer:
        for chunk in prepared_chunks(staging / CUSTOMERS, mapping, rows=rows, threads=threads):
            run.quarantine(chunk, held)
            keep = run.to_send(chunk)
            writer.write_table(pa.table({
                "id": pa.array([chunk.ids[k] for k in keep], pa.string()),
                "body": chunk.encoded.take(pa.array(keep, pa.int64())),
                "hash": chunk.hashes.take(pa.array(keep, pa.int64())),
            }, schema=CONTACTS_SCHEMA))
            run.validate(chunk.gate, last=False)
            progress.advance(chunk.gate.checked)
        run.validate(None, last=True)
    progress.advance(0, force=True)
    summary = run.verdict()
    leavers = run.leavers()
    write_ndjson(staging / LEAVERS, ({"id": i} for i in leavers))
    t = run.tally
    log.info("%d contacts to send, %d unchanged since Ometria accepted them, %d members left the programme",
             t.changed, t.valid - t.changed, len(leavers))
    return Transformed(customers=t.checked, valid=t.valid, changed=t.changed, unchanged=t.valid - t.changed,
                       quarantined=t.quarantined, quarantine_reasons=dict(t.reasons), quality=summary,
                       mapping_version=mapping.version, payload_mode=mapping.settings.payload_mode,
                       resent_unchanged=t.resent_unchanged, owed_settled=t.owed_settled, leavers=len(leavers))


@dataclass
class _Tally:
    """The transform's counts, added up chunk by chunk."""

    checked: int = 0  # customers the gate checked
    quarantined: int = 0  # … held back by a check
    valid: int = 0  # … that passed every check
    changed: int = 0  # valid contacts to send
    resent_unchanged: int = 0  # … sent although Ometria accepted the same body (a re-sync, a backfill)
    owed_settled: int = 0  # owed contacts whose body Ometria had accepted after all: no longer owed
    reasons: Counter = field(default_factory=Counter)  # check → customers it held back
    non_null: Counter = field(default_factory=Counter)  # remote field → customers with a value


class _TransformRun:
    """One transform step: what it knows before the first chunk, and what it does with each."""

    def __init__(self, staging: Path, mapping: ContactMapping, plan: Plan, store: StateStore | None):
        self.staging, self.mapping, self.plan, self.store = staging, mapping, plan, store
        if store is not None:
            store.clear_held(plan.run_id, "quarantined")
        self.held_before = store.held_ids("quarantined") if store is not None else set()  # passing again: released
        self.retrying = set(plan.retry_ids) if plan.mode == "incremental" or store is None else set(store.owed_ids())
        self.members = store.member_ids() if store is not None and plan.mode == "full" else None
        self.seen: set = set()
        self.quarantined_ids: set = set()  # owed contacts the gate holds back
        self.tally = _Tally()
        self.block = GxBlock(mapping)
        self.validations: list = []

    def quarantine(self, chunk, held) -> None:
        """The chunk's failing customers, with every reason, into the quarantine file and the state store."""
        ids, encoded = chunk.ids, chunk.encoded
        rows_held = [{"id": ids[row], "reasons": [f["message"] for f in fails], "failures": fails,
                      "payload": json.loads(encoded[row].as_py())} for row, fails in sorted(chunk.gate.failures.items())]
        self.quarantined_ids.update(r["id"] for r in rows_held if r["id"] in self.retrying)
        held.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows_held)
        if self.store is not None:
            self.store.record_held(self.plan.run_id, "quarantined", rows_held)

    def to_send(self, chunk) -> list[int]:
        """The rows of the chunk to send: valid, and (unless sending everything) not what Ometria accepted."""
        ids, hashes, plan, t = chunk.ids, chunk.hashes.to_pylist(), self.plan, self.tally
        ok = np.flatnonzero(chunk.gate.valid.to_numpy())
        self.release([ids[k] for k in ok if ids[k] in self.held_before])
        known = {} if self.store is None else self.store.accepted_hashes([ids[k] for k in ok])
        same = {ids[k] for k in ok if known.get(ids[k]) == hashes[k]}
        keep = [k for k in ok if plan.send_unchanged or ids[k] not in same]
        t.resent_unchanged += len(same) if plan.send_unchanged else 0
        self.settle([(ids[k], hashes[k]) for k in ok if ids[k] in self.retrying and ids[k] in same])
        if self.members is not None:
            self.seen.update(ids)
        t.checked += chunk.gate.checked
        t.quarantined += chunk.gate.quarantined
        t.valid += len(ok)
        t.changed += len(keep)
        return keep

    def release(self, passing_again: list[str]) -> None:
        """Customers quarantined before who pass now: no longer held."""
        if passing_again:
            self.store.release_held(passing_again, ("quarantined",))

    def settle(self, settled: list[tuple[str, str]]) -> None:
        """Owed contacts whose payload Ometria has accepted already: owed no more."""
        plan = self.plan
        if settled and not plan.send_unchanged and not plan.dry_run:
            self.store.record_accepted(settled, plan.mapping_version, plan.run_id)
            self.tally.owed_settled += len(settled)

    def validate(self, gate, last: bool) -> None:
        """Great Expectations over a block of chunks, once it is large enough (and the rest at the end)."""
        if gate is not None:
            self.tally.reasons.update(gate.reasons_count())
            self.tally.non_null.update(gate.non_null)
            self.block.add(gate)
        if self.block.rows >= GX_BLOCK_ROWS or (last and self.block.rows):
            self.validations.append(self.block.validate())

    def verdict(self) -> dict:
        """GX's results kept, the run's quality summary; QualityGateFailed when the run as a whole fails."""
        staging, t, plan = self.staging, self.tally, self.plan
        (staging / GX_RESULT).write_text(json.dumps(self.validations, default=str), encoding="utf-8")
        blocking, warnings = batch_verdict(t.checked, t.quarantined, dict(t.non_null),
                                           plan.previous_full_count if plan.mode == "full" else None,
                                           self.mapping.fields, plan.run_settings)
        log.info("quality gate: %d checked, %d passed, %d quarantined %s", t.checked, t.checked - t.quarantined,
                 t.quarantined, dict(t.reasons))
        for warning in warnings:
            log.warning("quality warning: %s", warning)
        if blocking:
            raise QualityGateFailed("; ".join(blocking) + f". Nothing was sent. Quarantined customers and "
                                    f"reasons: {staging / QUARANTINE}; GX results: {staging / GX_RESULT}")
        return {"checked": t.checked, "passed": t.checked - t.quarantined, "quarantined": t.quarantined,
                "quarantined_by_check": dict(t.reasons), "warnings": warnings, "blocking": blocking,
                "empty_share": {f.remote_field: round(1 - t.non_null.get(f.remote_field, 0) / t.checked, 4)
                                for f in self.mapping.fields} if t.checked else {}}

    def leavers(self) -> list[str]:
        """Members who left (missing from a full read, or read as no longer active), guarded against a truncated
        read; owed contacts this run cannot send are closed."""
        store, plan, members = self.store, self.plan, self.members
        leavers = sorted(members - self.seen) if members is not None else []
        inactive = [r["id"] for r in read_ndjson(self.staging / INACTIVE)] if (self.staging / INACTIVE).exists() else []
        if inactive and store is not None:  # read one by one and no longer active: members among them leave
            leavers += sorted(store.accepted_hashes(inactive))
        check_leavers(len(leavers), len(members) if members is not None else store.contact_count() if store else None,
                      plan.run_settings.max_leaver_share)
        if store is not None and not plan.dry_run:
            close_owed(store, plan, self.retrying, set(inactive) - set(leavers), self.quarantined_ids)
        return leavers


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
