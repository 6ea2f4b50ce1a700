"""The contact sync's steps as plain functions over a staging folder; the DAG and the CLI call them.

    plan      decide full or incremental (first run, mapping changed, full_resync asked) and the window
    extract   → customers.ndjson       normalised Antavo customers, one a line
    transform → contacts.parquet       (id, encoded record, hash) of the contacts that pass the quality
                                       gate and differ from what was last sent; quarantine.ndjson and
                                       gx_validation.json for the rest
    load      → load.ndjson            one line per push: ids, payload hashes and Ometria's answer, tagged
                                       with the run attempt; the state store learns what was sent
    report    → report.json            and the run's row in the state store

Each step returns a small dict of counts and paths, suitable for XCom. A run counts as synced only
when every contact it was responsible for was delivered or held back with a reason: anything else
fails the run, and the next run starts from where syncing last got to.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Collection, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from antavo_ometria.antavo.client import HELD, AntavoClient
from antavo_ometria.ometria.client import OmetriaClient, batches, split_oversized
from antavo_ometria.ometria.payload import encode_contacts
from antavo_ometria.sync.mapping import ContactMapping
from antavo_ometria.sync.quality import QualityGateFailed, batch_verdict, run_gate
from antavo_ometria.sync.state import StateStore, payload_hash
from antavo_ometria.sync.transform import read_customer_chunks, transform
from antavo_ometria.transport import ApiError, AuthenticationFailed

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


class RunNotDelivered(Exception):
    """The run's report does not add up, or some contacts were not delivered: the run must not count as synced."""


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
    plan = {
        # a new attempt each time the run is planned (a Clear, a backfill that reprocesses the run): its load
        # sends what its own transform produced, whatever an earlier attempt's journal says
        "dag_id": dag_id, "run_id": run_id, "attempt": uuid.uuid4().hex[:12], "mode": mode,
        "full_resync_reason": reason, "resumed": resumed if mode == "incremental" else None,
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
def extract(client: AntavoClient, staging: Path, plan: dict, status: str = "active", paths: Iterable[str] = ()) -> dict:
    """Every customer (full), or those updated in the plan's window (incremental), staged as NDJSON.

    `paths` are the loyalty fields the mapping reads: incremental profile reads ask Antavo for them."""
    staging.mkdir(parents=True, exist_ok=True)
    for name in (CONTACTS, QUARANTINE, OVERSIZED, ASYNC_ERRORS, GX_RESULT, REPORT):  # an earlier try's results
        (staging / name).unlink(missing_ok=True)
    progress = Progress("extract", "customers")
    count, duplicates = write_customers(staging, _customer_pages(client, plan, status, list(paths)), progress)
    log.info("extracted %d customers (%s, %d requests)", count, plan["mode"], client.requests_made)
    if duplicates:
        log.warning("%d customer(s) came twice from Antavo (a page boundary moved); kept the copy updated last: %s",
                    len(duplicates), ", ".join(duplicates[:10]))
    return {"path": str(staging / CUSTOMERS), "customers": count, "mode": plan["mode"],
            "duplicate_ids": len(duplicates)}


def write_customers(staging: Path, pages: Iterable[list[dict]], progress: Progress | None = None
                    ) -> tuple[int, list[str]]:
    """Stage customers as NDJSON, each once: of a customer that comes twice (Antavo's pages shifted while
    they were read), the copy updated last is kept. Returns the count staged and the repeated ids."""
    path = staging / CUSTOMERS
    offsets: dict[str, int] = {}  # id → where its kept copy starts
    dropped: set[int] = set()
    duplicates: list[str] = []
    with path.open("wb") as handle:
        for page in pages:
            for customer in page:
                line = (json.dumps(customer, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
                customer_id = customer.get("id")
                if customer_id is not None and customer_id in offsets:
                    duplicates.append(customer_id)
                    handle.flush()
                    earlier = offsets[customer_id]
                    if _updated(customer) >= _updated(_read_line(path, earlier)):
                        dropped.add(earlier)
                    else:
                        dropped.add(handle.tell())
                        handle.write(line)
                        continue
                if customer_id is not None:
                    offsets[customer_id] = handle.tell()
                handle.write(line)
            if progress:
                progress.advance(len(page))
    if progress:
        progress.advance(0, force=True)
    count = _drop_lines(path, dropped)
    (staging / DUPLICATES).write_text(json.dumps(sorted(set(duplicates))), encoding="utf-8")
    return count, sorted(set(duplicates))


def _updated(customer: dict) -> datetime:
    try:
        moment = datetime.fromisoformat(str(customer.get("updated_at")).replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _read_line(path: Path, offset: int) -> dict:
    with path.open("rb") as handle:
        handle.seek(offset)
        return json.loads(handle.readline())


def _drop_lines(path: Path, offsets: set[int]) -> int:
    """Rewrite `path` without the lines starting at `offsets`; return the lines kept."""
    kept = 0
    with path.open("rb") as source, path.with_suffix(".tmp").open("wb") as target:
        while True:
            offset = source.tell()
            line = source.readline()
            if not line:
                break
            if offset not in offsets:
                target.write(line)
                kept += 1
    path.with_suffix(".tmp").replace(path)
    return kept


def _customer_pages(client: AntavoClient, plan: dict, status: str, paths: list[str]):
    if plan["mode"] == "full":
        yield from client.iter_customer_pages(status)
        return
    ids = client.changed_customer_ids(datetime.fromisoformat(plan["since"]), datetime.fromisoformat(plan["until"]))
    log.info("%d customers changed since %s", len(ids), plan["since"])
    for start in range(0, len(ids), PROFILE_CHUNK):
        yield client.get_customers(ids[start: start + PROFILE_CHUNK], paths)


# -- transform ---------------------------------------------------------------------------------
def prepare_contacts(columns: pd.DataFrame, mapping: ContactMapping, duplicate_ids: Collection[str] = ()):
    """Customer columns → (payload frame, encoded records, quality gate result), row for row."""
    frame = transform(columns, mapping)
    encoded = encode_contacts(frame, mapping)
    problems = columns[HELD] if HELD in columns else None
    return frame, encoded, run_gate(frame, mapping, [len(body) for body in encoded], duplicate_ids, problems)


def transform_staged(staging: Path, mapping: ContactMapping, plan: dict, store: StateStore | None = None) -> dict:
    """Staged customers → checked, encoded Ometria contacts that differ from what was last sent.

    Streams the staged customers in chunks, so memory does not grow with the programme. Quarantined
    customers go to quarantine.ndjson (and the state store) with every reason. Raises
    QualityGateFailed, after writing the quarantine and GX's results, when the run as a whole fails.
    """
    if store is not None:
        store.clear_held(plan["run_id"], "quarantined")
    held_before = store.held_ids("quarantined") if store is not None else set()  # who passes again is released
    checked = quarantined = valid = changed = 0
    reasons: Counter = Counter()
    non_null: Counter = Counter()
    validations = []
    progress = Progress("transform and check", "customers")
    with (staging / QUARANTINE).open("w", encoding="utf-8") as held, \
            pq.ParquetWriter(staging / CONTACTS, CONTACTS_SCHEMA) as writer:
        for columns in read_customer_chunks(staging / CUSTOMERS, [*mapping.loyalty_fields, HELD]):
            frame, encoded, gate = prepare_contacts(columns, mapping)
            ids = frame["id"].tolist()
            rows = [{"id": ids[row], "reasons": [f["message"] for f in fails], "failures": fails,
                     "payload": json.loads(encoded[row])} for row, fails in sorted(gate.failures.items())]
            held.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
            if store is not None:
                store.record_held(plan["run_id"], "quarantined", rows)
            ok = [(ids[row], encoded[row]) for row in np.flatnonzero(gate.valid.to_numpy())]
            passing_again = [i for i, _ in ok if i in held_before]
            if passing_again:
                store.release_held(passing_again, ("quarantined",))
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
    """Push the staged contacts in batches of 100; a retry of this attempt skips what it already delivered.

    What counts as delivered is an (id, payload hash) pair that this attempt of the run pushed and Ometria
    acknowledged, so a re-planned run (Clear, backfill) sends again, and a changed payload is always sent.
    A batch with records Ometria rejected is split until each rejected record stands alone; those are
    kept (state store) with their payload and not sent again until their payload changes.
    """
    contacts = read_contacts(staging)
    if plan["dry_run"]:
        log.info("dry run: %d contacts would be sent; nothing was sent", len(contacts))
        return {"batches": 0, "sent": 0, "accepted": 0, "rejected": 0, "failed": 0, "refused_oversized": 0,
                "dry_run": True, "would_send": len(contacts)}
    journal = staging / LOAD_JOURNAL
    earlier = journal_entries(staging, plan)
    if store is not None and earlier:  # a retry: the store may have missed what was delivered before a crash
        remember_sent(store, earlier, plan, {i: b for i, b, _ in contacts})
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
        _write_ndjson(journal, ({"attempt": plan["attempt"], **e} for e in entries), mode="a")
        if store is not None:
            remember_sent(store, entries, plan, dict(zip(ids, bodies)))
        progress.advance(len(ids))
    progress.advance(0, force=True)
    _write_ndjson(staging / OVERSIZED, ({"id": o.id, "reasons": [o.reason]} for o in oversized))
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
                         f"{journal}. A retry re-sends only those.", retryable=retryable)
    return {k: v for k, v in summary.items() if not k.endswith("_ids")} | {"async_errors": len(errors)}


def push_isolating(client: OmetriaClient, ids: list[str], bodies: list[bytes], hashes: list[str] | None = None,
                   record_type: str = "contact", isolate: bool = True) -> list[dict]:
    """Push one batch; journal entries (ids, hashes, Ometria's answer) for it and for any halves it was split into.

    With `isolate`, a batch in which Ometria rejected some records is halved until each rejected record stands
    alone (accepted records are pushed again on the way: an upsert for contacts). A batch refused whole (HTTP
    400, e.g. one record Ometria cannot parse) is halved the same way, and a record refused on its own is kept
    as rejected with Ometria's answer, so that one bad record never blocks the others.
    """
    hashes = hashes or [payload_hash(body) for body in bodies]
    halves = len(ids) // 2

    def split() -> list[dict]:
        return (push_isolating(client, ids[:halves], bodies[:halves], hashes[:halves], record_type, isolate)
                + push_isolating(client, ids[halves:], bodies[halves:], hashes[halves:], record_type, isolate))

    try:
        result = client.push_encoded(record_type, bodies)
    except AuthenticationFailed:
        raise  # a refused API key is refused for every batch: stop at the first
    except ApiError as exc:
        if exc.status == 400 and len(ids) > 1:
            return split()
        if exc.status == 400:
            return [{"ids": ids, "hashes": hashes, "status": "OK", "request_id": None, "accepted": 0,
                     "rejected": 1, "error": f"refused by Ometria: {exc}"}]
        log.error("batch of %d records not delivered: %s", len(ids), exc)
        return [{"ids": ids, "hashes": hashes, "status": "FAILED", "error": str(exc), "retryable": exc.retryable,
                 "accepted": 0, "rejected": 0}]
    if isolate and 0 < result.rejected < len(ids):  # find the rejected records
        return split()
    return [{"ids": ids, "hashes": hashes, "status": result.status, "request_id": result.request_id,
             "accepted": result.accepted, "rejected": result.rejected}]


def record_status(entry: dict) -> str:
    """What a journal entry says of its records: sent, rejected (by Ometria), or failed (not delivered).

    A batch pushed without isolation in which only some records were rejected counts as sent: which ones
    Ometria refused is only in its asynchronous errors."""
    if entry["status"] != "OK":
        return "failed"
    return "rejected" if entry["rejected"] >= len(entry["ids"]) else "sent"


def remember_sent(store: StateStore, entries: list[dict], plan: dict, bodies: dict[str, bytes] | None = None) -> None:
    """Record what Ometria received (with the payloads, when given); a contact that arrived is no longer held
    back for an earlier reason."""
    for entry in entries:
        status = record_status(entry)
        if status != "failed":
            store.record_contacts(zip(entry["ids"], entry["hashes"]), status, plan["mapping_version"],
                                  plan["run_id"], entry["request_id"], bodies)
        if status == "sent":
            store.release_held(entry["ids"], ("quarantined", "failed", "rejected"))


def journal_entries(staging: Path, plan: dict) -> list[dict]:
    """This attempt's entries of the load journal (earlier attempts of the same run id are ignored)."""
    return [e for e in read_ndjson(staging / LOAD_JOURNAL) if e.get("attempt") == plan["attempt"]]


def summarise_load(staging: Path, plan: dict, staged: set[str]) -> dict:
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


# -- report ------------------------------------------------------------------------------------
def build_report(staging: Path, plan: dict, extracted: dict, transformed: dict, loaded: dict | None,
                 store: StateStore | None = None) -> dict:
    """Every extracted customer is accounted for: sent, unchanged, or held back with its reason.

    `loaded` is None when the load step failed: the report then says what it delivered before it
    stopped, and the run is recorded as failed (so the next run starts from before it).
    """
    staged = read_contacts(staging)
    journal = summarise_load(staging, plan, {i for i, _, _ in staged})
    if not plan["dry_run"]:  # what the load never reached, e.g. it was stopped for good mid-way
        reached = {i for e in journal_entries(staging, plan) for i in e["ids"]} | {
            o["id"] for o in read_ndjson(staging / OVERSIZED)}
        journal["failed_ids"] += [i for i, _, _ in staged if i not in reached]
    errors = {i: e.get("error") for e in journal_entries(staging, plan) for i in e["ids"]}
    payloads = {i: json.loads(b) for i, b, _ in staged} if journal["rejected_ids"] + journal["failed_ids"] else {}
    rejected = [{"id": i, "reasons": [errors.get(i) or "rejected by Ometria; see the async errors"],
                 "payload": payloads.get(i)} for i in journal["rejected_ids"]]
    failed = [{"id": i, "reasons": [f"not delivered: {errors.get(i) or 'the load stopped before sending it'}; "
                                    "the next run sends it"], "payload": payloads.get(i)}
              for i in journal["failed_ids"]]
    quarantined = [{"id": q["id"], "reasons": q["reasons"]} for q in read_ndjson(staging / QUARANTINE)]
    not_delivered = quarantined + read_ndjson(staging / OVERSIZED) + [
        {"id": r["id"], "reasons": r["reasons"]} for r in rejected + failed]
    async_errors = json.loads((staging / ASYNC_ERRORS).read_text()) if (staging / ASYNC_ERRORS).exists() else []
    duplicates = json.loads((staging / DUPLICATES).read_text()) if (staging / DUPLICATES).exists() else []
    loaded = loaded or {}
    report = {
        "run_id": plan["run_id"],
        "status": "dry_run" if plan["dry_run"] else "success",
        "mode": plan["mode"],
        "full_resync_reason": plan["full_resync_reason"],
        "resumed": plan.get("resumed"),
        "window": [plan["since"], plan["until"]] if plan["mode"] == "incremental" else None,
        "mapping_version": transformed["mapping_version"],
        "payload_mode": transformed["payload_mode"],
        "extracted": extracted["customers"],
        "duplicates": duplicates,
        "changed": transformed["changed"],
        "unchanged": transformed["unchanged"],
        "quarantined": transformed["quarantined"],
        "quarantine_reasons": transformed["quarantine_reasons"],
        "quality_warnings": transformed.get("quality", {}).get("warnings", []),
        "would_send": loaded.get("would_send", 0),
        "sent": journal["sent"],
        "accepted": journal["accepted"],
        "rejected": journal["rejected"],
        "failed": len(journal["failed_ids"]),
        "refused_oversized": journal["refused_oversized"],
        "batches": journal["batches"],
        "async_errors": async_errors,
        "not_delivered": not_delivered,
        "staging": str(staging),
    }
    unsent = transformed["changed"] if plan["dry_run"] else report["sent"] + report["failed"] + report["refused_oversized"]
    report["unaccounted"] = report["extracted"] - unsent - report["unchanged"] - report["quarantined"]
    if report["failed"] or report["unaccounted"]:
        report["status"] = "failed"
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


STEPS = ("check_connections", "plan", "extract", "transform")


def report_run(staging: Path, steps: dict, store: StateStore, dag_id: str, run_id: str) -> dict:
    """The report step, whatever happened before it (steps: check_connections, plan, extract, transform,
    load → their results, None for a step that failed). Records the run, a failed one too; raises
    RunNotDelivered unless everything it was responsible for was delivered or held back with a reason."""
    missing = [name for name in STEPS  # check_connections counts where the caller ran it (the DAG does)
               if steps.get(name) is None and (name != "check_connections" or name in steps)]
    if missing:
        if not steps.get("plan"):  # not planned: recorded all the same, so that history shows the failure
            store.start_run(dag_id, run_id, mode="not planned", full_resync_reason=None, dry_run=False,
                            mapping_version="", interval_start=None, interval_end=None)
        store.finish_run(dag_id, run_id, "failed", report={"failed_step": missing[0]})
        raise RunNotDelivered(f"the run stopped at {missing[0]}; nothing was sent (that task's log says why)")
    report = build_report(staging, steps["plan"], steps["extract"], steps["transform"], steps.get("load"), store)
    log.info("\n%s", format_report(report))
    check_delivered(report)
    return report


def check_delivered(report: dict) -> None:
    """Raise unless the run delivered or visibly held everything it was responsible for."""
    if report["unaccounted"]:
        raise RunNotDelivered(f"the run's counts do not add up: {report['unaccounted']} customer(s) are neither sent, "
                              f"unchanged nor held back; see {report['staging']}/{REPORT}")
    if report["failed"]:
        first = next(r for r in report["not_delivered"] if r["reasons"][0].startswith("not delivered"))
        raise RunNotDelivered(f"{report['failed']} contact(s) were not delivered ({first['id']}: {first['reasons'][0]}); "
                              "the run is not counted as synced, and the next run sends them")


def _history_row(run: dict) -> dict:
    keys = ("run_id", "status", "mode", "mapping_version", "extracted", "changed", "sent", "accepted",
            "rejected", "quarantined", "failed", "started_at")
    return {k: (run[k].isoformat() if isinstance(run[k], datetime) else run[k]) for k in keys}


def format_report(report: dict, limit: int = 20) -> str:
    window = f", window {report['window'][0]} → {report['window'][1]}" if report.get("window") else ""
    lines = [
        "Antavo → Ometria contact sync" + ("  (DRY RUN: nothing was sent)" if report["status"] == "dry_run" else "")
        + ("  (FAILED: not everything was delivered)" if report["status"] == "failed" else ""),
        f"  extracted    {report['extracted']:>8}   ({report['mode']} load{window}; {report['payload_mode']} payloads, "
        f"mapping {report['mapping_version']})",
    ]
    if report.get("full_resync_reason"):
        lines.append(f"  FULL RE-SYNC: {report['full_resync_reason']}")
    if report.get("resumed"):
        lines.append(f"  RESUMED: {report['resumed']}")
    if report.get("duplicates"):
        lines.append(f"  duplicates   {len(report['duplicates']):>8}   (came twice from Antavo; the copy updated last "
                     f"was kept: {', '.join(report['duplicates'][:5])})")
    lines += [
        f"  unchanged    {report['unchanged']:>8}   (same payload as last sent: not sent again)",
        f"  changed      {report['changed']:>8}" + ("   would be sent" if report["status"] == "dry_run" else ""),
        f"  sent         {report['sent']:>8}   in {report['batches']} batches",
        f"  accepted     {report['accepted']:>8}",
        f"  rejected     {report['rejected']:>8}   (by Ometria)",
        f"  quarantined  {report['quarantined']:>8}   (held back by the quality gate)",
        f"  failed       {report['failed']:>8}   (not delivered: the next run sends them)",
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
