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
from antavo_ometria.ometria.payload import encode_contacts, payload_hash
from antavo_ometria.sync.mapping import ContactMapping
from antavo_ometria.sync.quality import QualityGateFailed, batch_verdict, run_gate
from antavo_ometria.sync.records import Plan, Transformed
from antavo_ometria.sync.staging import (
    CONTACTS,
    CONTACTS_SCHEMA,
    CUSTOMERS,
    GX_RESULT,
    QUARANTINE,
    Progress,
)
from antavo_ometria.sync.state import StateStore
from antavo_ometria.sync.transform import read_customer_chunks, transform

log = logging.getLogger(__name__)


def prepare_contacts(columns: pd.DataFrame, mapping: ContactMapping, duplicate_ids: Collection[str] = ()):
    """Customer columns → (payload frame, encoded records, quality gate result), row for row."""
    frame = transform(columns, mapping)
    encoded = encode_contacts(frame, mapping.shape)
    problems = columns[HELD] if HELD in columns else None
    return frame, encoded, run_gate(frame, mapping, [len(body) for body in encoded], duplicate_ids, problems)


def transform_staged(staging: Path, mapping: ContactMapping, plan: Plan | dict, store: StateStore | None = None
                     ) -> Transformed:
    """Staged customers → checked, encoded Ometria contacts that differ from what was last sent.

    Streams the staged customers in chunks, so memory does not grow with the programme. Quarantined
    customers go to quarantine.ndjson (and the state store) with every reason. Raises
    QualityGateFailed, after writing the quarantine and GX's results, when the run as a whole fails.
    """
    plan = Plan.of(plan)
    if store is not None:
        store.clear_held(plan.run_id, "quarantined")
    held_before = store.held_ids("quarantined") if store is not None else set()  # who passes again is released
    checked = quarantined = valid = changed = 0
    reasons: Counter = Counter()
    non_null: Counter = Counter()
    validations = []
    progress = Progress("transform and check", "customers")
    with (staging / QUARANTINE).open("w", encoding="utf-8") as held, \
            (staging / CONTACTS).open("wb") as sink, pq.ParquetWriter(sink, CONTACTS_SCHEMA) as writer:
        for columns in read_customer_chunks(staging / CUSTOMERS, [*mapping.loyalty_fields, HELD]):
            frame, encoded, gate = prepare_contacts(columns, mapping)
            ids = frame["id"].tolist()
            rows = [{"id": ids[row], "reasons": [f["message"] for f in fails], "failures": fails,
                     "payload": json.loads(encoded[row])} for row, fails in sorted(gate.failures.items())]
            held.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
            if store is not None:
                store.record_held(plan.run_id, "quarantined", rows)
            ok = [(ids[row], encoded[row]) for row in np.flatnonzero(gate.valid.to_numpy())]
            passing_again = [i for i, _ in ok if i in held_before]
            if passing_again:
                store.release_held(passing_again, ("quarantined",))
            hashes = [payload_hash(body) for _, body in ok]
            known = {} if plan.send_unchanged or store is None else store.sent_hashes([i for i, _ in ok])
            keep = [k for k, ((i, _), h) in enumerate(zip(ok, hashes)) if known.get(i) != h]
            writer.write_table(pa.table({
                "id": pa.array([ok[k][0] for k in keep], pa.string()),
                "body": pa.array([ok[k][1] for k in keep], pa.binary()),
                "hash": pa.array([hashes[k] for k in keep], pa.string()),
            }, schema=CONTACTS_SCHEMA))
            checked += gate.checked
            quarantined += gate.quarantined
            valid += len(ok)
            changed += len(keep)
            reasons.update(gate.reasons_count())
            non_null.update(gate.non_null)
            validations.append(gate.validation)
            progress.advance(gate.checked)
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
    log.info("%d contacts to send, %d unchanged since they were last sent", changed, valid - changed)
    return Transformed(customers=checked, valid=valid, changed=changed, unchanged=valid - changed,
                       quarantined=quarantined, quarantine_reasons=dict(reasons), quality=summary,
                       mapping_version=mapping.version, payload_mode=mapping.settings.payload_mode)
