"""The contact sync's steps as plain functions over a staging folder; the DAG and the CLI call them.

    plan      decide full or incremental (first run, mapping changed, full_resync asked) and the window
    extract   → customers.ndjson       normalised Antavo customers, one a line
    transform → contacts.parquet       (id, encoded record, hash) of the contacts that pass the quality
                                       gate and differ from what was last sent; quarantine.ndjson and
                                       gx_validation.json for the rest
    load      → load.ndjson            one line per pushed batch; the state store learns what was sent
    report    → report.json            and the run's row in the state store

Each step returns a small dict of counts and paths, suitable for XCom.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Collection, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from antavo_ometria.antavo import AntavoClient
from antavo_ometria.mapping import ContactMapping
from antavo_ometria.ometria import OmetriaClient, batches, split_oversized
from antavo_ometria.payload import encode_contacts
from antavo_ometria.quality import QualityGateFailed, batch_verdict, run_gate
from antavo_ometria.state import StateStore, payload_hash
from antavo_ometria.transform import read_customer_chunks, transform
from antavo_ometria.transport import ApiError

log = logging.getLogger(__name__)

CUSTOMERS = "customers.ndjson"
CONTACTS = "contacts.parquet"
QUARANTINE = "quarantine.ndjson"
LOAD_JOURNAL = "load.ndjson"
REPORT = "report.json"
GX_RESULT = "gx_validation.json"
DUPLICATES = "duplicate_ids.json"
OVERSIZED = "oversized.ndjson"
ASYNC_ERRORS = "async_errors.json"
CONTACTS_SCHEMA = pa.schema([("id", pa.string()), ("body", pa.binary()), ("hash", pa.string())])
PROFILE_CHUNK = 1000  # increments fetch full profiles this many at a time


class LoadFailed(Exception):
    """Some batches could not be delivered; they are recorded in the load journal.

    `retryable` is false when every failure was permanent (e.g. a refused API key): a retry cannot help.
    """

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


class Progress:
    """Logs `done/total` with a rate and time left, at most every `every` seconds."""

    def __init__(self, what: str, unit: str, total: int | None = None, every: float = 5.0):
        self.what, self.unit, self.total, self.every = what, unit, total, every
        self.start = self.last = time.monotonic()
        self.done = 0

    def advance(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        if self.total:
            left = (self.total - self.done) / rate if rate else float("inf")
            log.info("%s: %d/%d %s (%.0f/s, ~%.0fs left)", self.what, self.done, self.total, self.unit, rate, left)
        else:
            log.info("%s: %d %s (%.0f/s)", self.what, self.done, self.unit, rate)


def _write_ndjson(path: Path, rows, mode: str = "w") -> int:
    count = 0
    with path.open(mode, encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=str) + "\n")
            count += 1
    return count


def read_ndjson(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# -- plan --------------------------------------------------------------------------------------
def plan_run(
    store: StateStore,
    mapping: ContactMapping,
    dag_id: str,
    run_id: str,
    interval: tuple[datetime | None, datetime | None] = (None, None),
    run_type: str = "scheduled",
    full_resync: bool = False,
    dry_run: bool = False,
) -> dict:
    """Full or incremental, and over which window. A changed mapping re-syncs every contact."""
    last = store.last_successful_run(dag_id)
    reason = None
    if full_resync:
        reason = "full re-sync requested"
    elif last is None:
        reason = "first run: nothing has been synced yet"
    elif last["mapping_version"] != mapping.version:
        reason = (f"the mapping changed ({last['mapping_version']} → {mapping.version}): "
                  "every contact is re-sent with the new mapping")
    start, end = interval
    end = end or datetime.now(UTC)
    if start is None and last is not None:  # a manual run without a data interval resumes where syncing got to
        start = store.synced_until(dag_id)
    mode = "full" if reason or start is None else "incremental"
    if reason:
        log.warning("%s FULL RE-SYNC: %s %s", "=" * 20, reason, "=" * 20)
    since = start - timedelta(minutes=mapping.settings.overlap_minutes) if mode == "incremental" else None
    last_full = store.last_successful_run(dag_id, full_only=True)
    plan = {
        "dag_id": dag_id, "run_id": run_id, "mode": mode, "full_resync_reason": reason,
        # unchanged contacts are skipped, except when everything must be re-sent or a backfill re-syncs
        "send_unchanged": reason is not None or run_type == "backfill",
        "dry_run": dry_run, "mapping_version": mapping.version,
        "since": since.isoformat() if since else None, "until": end.isoformat(),
        "previous_full_count": last_full["extracted"] if last_full else None,
    }
    store.start_run(dag_id, run_id, mode=mode, full_resync_reason=reason, dry_run=dry_run,
                    mapping_version=mapping.version, interval_start=start, interval_end=end)
    log.info("plan: %s", {k: v for k, v in plan.items() if v is not None})
    return plan


# -- extract -----------------------------------------------------------------------------------
def extract(client: AntavoClient, staging: Path, plan: dict, status: str = "active") -> dict:
    """Every customer (full), or those updated in the plan's window (incremental), staged as NDJSON."""
    staging.mkdir(parents=True, exist_ok=True)
    progress = Progress("extract", "customers")
    count, duplicates = write_customers(staging, _customer_pages(client, plan, status), progress)
    log.info("extracted %d customers (%s, %d requests)", count, plan["mode"], client.requests_made)
    return {"path": str(staging / CUSTOMERS), "customers": count, "mode": plan["mode"], "duplicate_ids": duplicates}


def write_customers(staging: Path, pages: Iterable[list[dict]], progress: Progress | None = None) -> tuple[int, int]:
    """Stage customers as NDJSON, noting IDs that occur more than once (the quality gate holds them back)."""
    seen: set = set()
    duplicates: set = set()
    count = 0
    with (staging / CUSTOMERS).open("w", encoding="utf-8") as handle:
        for page in pages:
            for customer in page:
                customer_id = customer.get("id")
                if customer_id in seen:
                    duplicates.add(customer_id)
                seen.add(customer_id)
                handle.write(json.dumps(customer, ensure_ascii=False, separators=(",", ":")) + "\n")
            count += len(page)
            if progress:
                progress.advance(len(page))
    if progress:
        progress.advance(0, force=True)
    (staging / DUPLICATES).write_text(json.dumps(sorted(d for d in duplicates if d is not None)), encoding="utf-8")
    return count, len(duplicates)


def _customer_pages(client: AntavoClient, plan: dict, status: str):
    if plan["mode"] == "full":
        yield from client.iter_customer_pages(status)
        return
    ids = client.changed_customer_ids(datetime.fromisoformat(plan["since"]), datetime.fromisoformat(plan["until"]))
    log.info("%d customers changed since %s", len(ids), plan["since"])
    for start in range(0, len(ids), PROFILE_CHUNK):
        yield client.get_customers(ids[start: start + PROFILE_CHUNK])


# -- transform ---------------------------------------------------------------------------------
def prepare_contacts(columns: pd.DataFrame, mapping: ContactMapping, duplicate_ids: Collection[str] = ()):
    """Customer columns → (payload frame, encoded records, quality gate result), row for row."""
    frame = transform(columns, mapping)
    encoded = encode_contacts(frame, mapping)
    return frame, encoded, run_gate(frame, mapping, [len(body) for body in encoded], duplicate_ids)


def transform_staged(staging: Path, mapping: ContactMapping, plan: dict, store: StateStore | None = None) -> dict:
    """Staged customers → checked, encoded Ometria contacts that differ from what was last sent.

    Streams the staged customers in chunks, so memory does not grow with the programme. Quarantined
    customers go to quarantine.ndjson (and the state store) with every reason. Raises
    QualityGateFailed, after writing the quarantine and GX's results, when the run as a whole fails.
    """
    path = staging / DUPLICATES
    duplicates = set(json.loads(path.read_text())) if path.exists() else set()
    if store is not None:
        store.clear_held(plan["run_id"], "quarantined")
    checked = quarantined = valid = changed = 0
    reasons: Counter = Counter()
    non_null: Counter = Counter()
    validations = []
    progress = Progress("transform and check", "customers")
    with (staging / QUARANTINE).open("w", encoding="utf-8") as held, \
            pq.ParquetWriter(staging / CONTACTS, CONTACTS_SCHEMA) as writer:
        for columns in read_customer_chunks(staging / CUSTOMERS, mapping.loyalty_fields):
            frame, encoded, gate = prepare_contacts(columns, mapping, duplicates)
            ids = frame["id"].tolist()
            rows = [{"id": ids[row], "reasons": [f["message"] for f in fails], "failures": fails,
                     "payload": json.loads(encoded[row])} for row, fails in sorted(gate.failures.items())]
            held.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
            if store is not None:
                store.record_held(plan["run_id"], "quarantined", rows)
            ok = [(ids[row], encoded[row]) for row in np.flatnonzero(gate.valid.to_numpy())]
            hashes = [payload_hash(body) for _, body in ok]
            known = {} if plan["send_unchanged"] or store is None else store.sent_hashes([i for i, _ in ok])
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
                                       plan.get("previous_full_count") if plan["mode"] == "full" else None, mapping)
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
    return {"customers": checked, "valid": valid, "changed": changed, "unchanged": valid - changed,
            "quarantined": quarantined, "quarantine_reasons": dict(reasons), "quality": summary,
            "mapping_version": mapping.version, "payload_mode": mapping.settings.payload_mode}


def read_contacts(staging: Path) -> list[tuple[str, bytes, str]]:
    table = pq.read_table(staging / CONTACTS)
    return list(zip(table.column("id").to_pylist(), table.column("body").to_pylist(),
                    table.column("hash").to_pylist()))


# -- load --------------------------------------------------------------------------------------
def load_staged(staging: Path, client: OmetriaClient, plan: dict, store: StateStore | None = None) -> dict:
    """Push the staged contacts in batches of 100; a retry skips batches already accepted.

    A batch with records Ometria rejected is split until each rejected record stands alone; those
    are kept (state store) with their payload and not sent again until their payload changes.
    """
    contacts = read_contacts(staging)
    if plan["dry_run"]:
        log.info("dry run: %d contacts would be sent; nothing was sent", len(contacts))
        return {"batches": 0, "sent": 0, "accepted": 0, "rejected": 0, "failed": 0, "refused_oversized": 0,
                "dry_run": True, "would_send": len(contacts)}
    journal = staging / LOAD_JOURNAL
    done = {tuple(entry["ids"]) for entry in read_ndjson(journal) if entry["status"] == "OK"}
    hashes = {i: h for i, _, h in contacts}
    fits, oversized = split_oversized((i, b) for i, b, _ in contacts)
    planned = list(batches(fits))
    progress = Progress("load", "contacts", total=len(fits))
    failures = retryable = 0
    for ids, bodies in planned:
        if tuple(ids) not in done:
            entries = push_isolating(client, ids, bodies)
            _write_ndjson(journal, entries, mode="a")
            failures += sum(e["status"] != "OK" for e in entries)
            retryable += sum(e["status"] != "OK" and e.get("retryable", True) for e in entries)
            if store is not None:
                remember_sent(store, entries, hashes, plan)
        progress.advance(len(ids))
    progress.advance(0, force=True)
    _write_ndjson(staging / OVERSIZED, ({"id": o.id, "reasons": [o.reason]} for o in oversized))
    try:
        errors = client.push_errors()
    except ApiError as exc:
        errors = [{"error_path": "", "error_message": f"could not read /v2/push/_errors: {exc}"}]
    (staging / ASYNC_ERRORS).write_text(json.dumps(errors, ensure_ascii=False), encoding="utf-8")
    summary = summarise_load(staging)
    if failures:
        raise LoadFailed(f"{failures} batch(es) were not delivered ({summary['failed']} contacts); see "
                         f"{journal}. A retry re-sends only those.", retryable=bool(retryable))
    return {k: v for k, v in summary.items() if not k.endswith("_ids")} | {"async_errors": len(errors)}


def push_isolating(client: OmetriaClient, ids: list[str], bodies: list[bytes]) -> list[dict]:
    try:
        result = client.push_encoded("contact", bodies)
    except ApiError as exc:
        log.error("batch of %d contacts not delivered: %s", len(ids), exc)
        return [{"ids": ids, "status": "FAILED", "error": str(exc), "retryable": exc.retryable,
                 "accepted": 0, "rejected": 0}]
    if 0 < result.rejected < len(ids):  # find the rejected records: halve until each stands alone
        middle = len(ids) // 2
        return (push_isolating(client, ids[:middle], bodies[:middle])
                + push_isolating(client, ids[middle:], bodies[middle:]))
    return [{"ids": ids, "status": result.status, "request_id": result.request_id,
             "accepted": result.accepted, "rejected": result.rejected}]


def remember_sent(store: StateStore, entries: list[dict], hashes: dict, plan: dict) -> None:
    for entry in entries:
        if entry["status"] != "OK":
            continue
        status = "rejected" if entry["rejected"] else "sent"
        store.record_contacts(((i, hashes[i]) for i in entry["ids"]), status, plan["mapping_version"],
                              plan["run_id"], entry["request_id"])


def summarise_load(staging: Path) -> dict:
    """Counts and ids from the load journal: the latest entry of each batch wins."""
    latest: dict[tuple, dict] = {}
    for entry in read_ndjson(staging / LOAD_JOURNAL):
        latest[tuple(entry["ids"])] = entry
    ok = [e for e in latest.values() if e["status"] == "OK"]
    failed = [e for e in latest.values() if e["status"] != "OK"]
    return {
        "batches": len(latest),
        "sent": sum(len(e["ids"]) for e in ok),
        "accepted": sum(e["accepted"] for e in ok),
        "rejected": sum(e["rejected"] for e in ok),
        "failed": sum(len(e["ids"]) for e in failed),
        "refused_oversized": len(read_ndjson(staging / OVERSIZED)),
        "rejected_ids": [i for e in ok if e["rejected"] for i in e["ids"]],
        "failed_ids": [i for e in failed for i in e["ids"]],
    }


# -- report ------------------------------------------------------------------------------------
def build_report(staging: Path, plan: dict, extracted: dict, transformed: dict, loaded: dict,
                 store: StateStore | None = None) -> dict:
    """Every extracted customer is accounted for: sent, unchanged, or held back with its reason."""
    journal = summarise_load(staging)
    payloads = {i: json.loads(b) for i, b, _ in read_contacts(staging)} if journal["rejected_ids"] + journal[
        "failed_ids"] else {}
    rejected = [{"id": i, "reasons": ["rejected by Ometria; see the async errors"], "payload": payloads.get(i)}
                for i in journal["rejected_ids"]]
    failed = [{"id": i, "reasons": ["push failed after retries"], "payload": payloads.get(i)}
              for i in journal["failed_ids"]]
    quarantined = [{"id": q["id"], "reasons": q["reasons"]} for q in read_ndjson(staging / QUARANTINE)]
    not_delivered = quarantined + read_ndjson(staging / OVERSIZED) + [
        {"id": r["id"], "reasons": r["reasons"]} for r in rejected + failed]
    async_errors = json.loads((staging / ASYNC_ERRORS).read_text()) if (staging / ASYNC_ERRORS).exists() else []
    report = {
        "run_id": plan["run_id"],
        "status": "dry_run" if plan["dry_run"] else "success",
        "mode": plan["mode"],
        "full_resync_reason": plan["full_resync_reason"],
        "window": [plan["since"], plan["until"]] if plan["mode"] == "incremental" else None,
        "mapping_version": transformed["mapping_version"],
        "payload_mode": transformed["payload_mode"],
        "extracted": extracted["customers"],
        "changed": transformed["changed"],
        "unchanged": transformed["unchanged"],
        "quarantined": transformed["quarantined"],
        "quarantine_reasons": transformed["quarantine_reasons"],
        "quality_warnings": transformed.get("quality", {}).get("warnings", []),
        "would_send": loaded.get("would_send", 0),
        "sent": loaded["sent"],
        "accepted": loaded["accepted"],
        "rejected": loaded["rejected"],
        "failed": loaded["failed"],
        "refused_oversized": loaded["refused_oversized"],
        "batches": loaded["batches"],
        "async_errors": async_errors,
        "not_delivered": not_delivered,
        "staging": str(staging),
    }
    unsent = transformed["changed"] if plan["dry_run"] else report["sent"] + report["failed"] + report["refused_oversized"]
    report["unaccounted"] = report["extracted"] - unsent - report["unchanged"] - report["quarantined"]
    if store is not None:
        for kind, rows in (("rejected", rejected), ("failed", failed)):
            store.clear_held(plan["run_id"], kind)
            store.record_held(plan["run_id"], kind, rows)
        store.record_push_errors(plan["run_id"], report["async_errors"])
        store.finish_run(plan["dag_id"], plan["run_id"], report["status"], report={**report, "not_delivered": len(not_delivered)},
                         **{k: report[k] for k in ("extracted", "changed", "unchanged", "sent", "accepted", "rejected",
                                                   "quarantined", "failed")},
                         async_errors=len(report["async_errors"]))
        report["history"] = [_history_row(r) for r in store.runs(plan["dag_id"], limit=10)]
    (staging / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    return report


def _history_row(run: dict) -> dict:
    keys = ("run_id", "status", "mode", "mapping_version", "extracted", "changed", "sent", "accepted",
            "rejected", "quarantined", "failed", "started_at")
    return {k: (run[k].isoformat() if isinstance(run[k], datetime) else run[k]) for k in keys}


def format_report(report: dict, limit: int = 20) -> str:
    window = f", window {report['window'][0]} → {report['window'][1]}" if report.get("window") else ""
    lines = [
        "Antavo → Ometria contact sync" + ("  (DRY RUN: nothing was sent)" if report["status"] == "dry_run" else ""),
        f"  extracted    {report['extracted']:>8}   ({report['mode']} load{window}; {report['payload_mode']} payloads, "
        f"mapping {report['mapping_version']})",
    ]
    if report.get("full_resync_reason"):
        lines.append(f"  FULL RE-SYNC: {report['full_resync_reason']}")
    lines += [
        f"  unchanged    {report['unchanged']:>8}   (same payload as last sent: not sent again)",
        f"  changed      {report['changed']:>8}" + ("   would be sent" if report["status"] == "dry_run" else ""),
        f"  sent         {report['sent']:>8}   in {report['batches']} batches",
        f"  accepted     {report['accepted']:>8}",
        f"  rejected     {report['rejected']:>8}   (by Ometria)",
        f"  quarantined  {report['quarantined']:>8}   (held back by the quality gate)",
        f"  failed       {report['failed']:>8}   (push failed after retries)",
        f"  oversized    {report['refused_oversized']:>8}   (over 60 KB, not sent)",
        f"  unaccounted  {report['unaccounted']:>8}",
    ]
    if report["quarantine_reasons"]:
        lines.append("  quarantined by check: " + ", ".join(f"{k} {v}" for k, v in sorted(report["quarantine_reasons"].items())))
    lines += [f"  warning: {w}" for w in report.get("quality_warnings", [])]
    if report["not_delivered"]:
        lines.append("  not delivered, with reasons:")
        for row in report["not_delivered"][:limit]:
            lines.append(f"    {row['id']}: {'; '.join(row['reasons'])}")
        if len(report["not_delivered"]) > limit:
            lines.append(f"    … {len(report['not_delivered']) - limit} more in {report['staging']}/{QUARANTINE}")
    if report["async_errors"]:
        lines.append(f"  Ometria reported {len(report['async_errors'])} validation error(s) at /v2/push/_errors:")
        lines += [f"    {e.get('error_path')}: {e.get('error_message')}" for e in report["async_errors"][:limit]]
    if report.get("history"):
        lines.append("  recent runs (state store):")
        for run in report["history"]:
            lines.append(f"    {str(run['started_at'])[:19]}  {run['status']:8} {run['mode']:11} "
                         f"extracted {run['extracted']:>7}  sent {run['sent']:>7}  quarantined {run['quarantined']:>5}  "
                         f"mapping {run['mapping_version']}")
    return "\n".join(lines)
