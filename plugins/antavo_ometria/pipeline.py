"""The contact sync's steps as plain functions over a staging folder; the DAG and the CLI call them.

    extract   → customers.ndjson       (normalised Antavo customers, one a line)
    transform → contacts.parquet       (id, encoded Ometria record) for the contacts that pass the
                                       quality gate; quarantine.ndjson (id, reasons, offending values)
                                       and gx_validation.json for the rest
    load      → load.ndjson            (one line per pushed batch: ids, request_id, accepted, rejected)
    report    → report.json

Each step returns a small dict of counts and paths, suitable for XCom.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from antavo_ometria.antavo import AntavoClient
from antavo_ometria.mapping import ContactMapping
from antavo_ometria.ometria import OmetriaClient, batches, encode_record, split_oversized
from antavo_ometria.payload import contact_records
from antavo_ometria.quality import QualityGateFailed, run_gate
from antavo_ometria.transform import read_customers, transform
from antavo_ometria.transport import ApiError

log = logging.getLogger(__name__)

CUSTOMERS = "customers.ndjson"
CONTACTS = "contacts.parquet"
QUARANTINE = "quarantine.ndjson"
LOAD_JOURNAL = "load.ndjson"
REPORT = "report.json"
GX_RESULT = "gx_validation.json"


class LoadFailed(Exception):
    """Some batches could not be delivered; they are recorded in the load journal."""


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
            handle.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
            count += 1
    return count


def read_ndjson(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# -- extract -----------------------------------------------------------------------------------
def extract_all(client: AntavoClient, staging: Path, status: str = "active") -> dict:
    """Every customer (Loyalty Read API), staged as NDJSON."""
    staging.mkdir(parents=True, exist_ok=True)
    path = staging / CUSTOMERS
    progress = Progress("extract", "customers")
    pages = customers = 0
    with path.open("w", encoding="utf-8") as handle:
        for page in client.iter_customer_pages(status):
            pages += 1
            customers += len(page)
            handle.writelines(json.dumps(c, ensure_ascii=False, separators=(",", ":")) + "\n" for c in page)
            progress.advance(len(page))
    progress.advance(0, force=True)
    log.info("extracted %d customers in %d pages (%d requests)", customers, pages, client.requests_made)
    return {"path": str(path), "customers": customers, "pages": pages, "mode": "full"}


# -- transform ---------------------------------------------------------------------------------
def transform_staged(staging: Path, mapping: ContactMapping, previous_count: int | None = None) -> dict:
    """Staged customers → checked, encoded Ometria contacts (Parquet); the rest quarantined with reasons.

    Raises QualityGateFailed, after writing the quarantine and GX's result, when the batch as a whole
    fails (too many invalid customers, or far fewer than the last full load).
    """
    columns = read_customers(staging / CUSTOMERS, mapping.loyalty_fields)
    frame = transform(columns, mapping)
    encoded = [(record_id, encode_record(record)) for record_id, record in contact_records(frame, mapping)]
    gate = run_gate(frame, mapping, [len(body) for _, body in encoded], previous_count)
    ids = frame["id"].tolist()
    _write_ndjson(staging / QUARANTINE, (
        {"id": ids[row], "reasons": [f["message"] for f in fails], "failures": fails}
        for row, fails in sorted(gate.failures.items())
    ))
    (staging / GX_RESULT).write_text(json.dumps(gate.validation, default=str), encoding="utf-8")
    valid = [pair for pair, ok in zip(encoded, gate.valid.tolist()) if ok]
    pq.write_table(pa.table({"id": pa.array([i for i, _ in valid], pa.string()),
                             "body": pa.array([b for _, b in valid], pa.binary())}), staging / CONTACTS)
    summary = gate.summary()
    log.info("quality gate: %d checked, %d passed, %d quarantined %s", summary["checked"], summary["passed"],
             summary["quarantined"], summary["quarantined_by_check"])
    for warning in gate.warnings:
        log.warning("quality warning: %s", warning)
    if gate.blocking:
        raise QualityGateFailed("; ".join(gate.blocking) + f". Nothing was sent. Quarantined customers and "
                                f"reasons: {staging / QUARANTINE}; GX result: {staging / GX_RESULT}")
    return {"customers": len(frame), "contacts": len(valid), "quarantined": gate.quarantined,
            "quarantine_reasons": summary["quarantined_by_check"], "quality": summary,
            "mapping_version": mapping.version, "payload_mode": mapping.settings.payload_mode}


def read_contacts(staging: Path) -> list[tuple[str, bytes]]:
    table = pq.read_table(staging / CONTACTS)
    return list(zip(table.column("id").to_pylist(), table.column("body").to_pylist()))


# -- load --------------------------------------------------------------------------------------
def load_staged(staging: Path, client: OmetriaClient) -> dict:
    """Push the staged contacts in batches of 100; a retry skips batches already accepted."""
    journal = staging / LOAD_JOURNAL
    done = {tuple(entry["ids"]) for entry in read_ndjson(journal) if entry["status"] == "OK"}
    fits, oversized = split_oversized(read_contacts(staging))
    planned = list(batches(fits))
    progress = Progress("load", "contacts", total=len(fits))
    failures = 0
    for ids, bodies in planned:
        if tuple(ids) in done:
            progress.advance(len(ids))
            continue
        try:
            result = client.push_encoded("contact", bodies)
            entry = {"ids": ids, "status": result.status, "request_id": result.request_id,
                     "accepted": result.accepted, "rejected": result.rejected}
        except ApiError as exc:
            failures += 1
            entry = {"ids": ids, "status": "FAILED", "error": str(exc), "retryable": exc.retryable,
                     "accepted": 0, "rejected": 0}
            log.error("batch of %d contacts not delivered: %s", len(ids), exc)
        _write_ndjson(journal, [entry], mode="a")
        progress.advance(len(ids))
    progress.advance(0, force=True)
    summary = summarise_load(staging, oversized)
    try:
        summary["async_errors"] = client.push_errors()
    except ApiError as exc:
        summary["async_errors_unavailable"] = str(exc)
    if failures:
        raise LoadFailed(f"{failures} batch(es) of {len(planned)} were not delivered "
                         f"({summary['failed']} contacts); see {journal}. A retry re-sends only those.")
    return summary


def summarise_load(staging: Path, oversized=()) -> dict:
    """Counts from the load journal: the latest entry of each batch wins."""
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
        "failed_ids": [i for e in failed for i in e["ids"]][:1000],
        "refused_oversized": [{"id": o.id, "reason": o.reason} for o in oversized],
        "request_ids": [e["request_id"] for e in ok][:1000],
    }


# -- report ------------------------------------------------------------------------------------
def build_report(staging: Path, extracted: dict, transformed: dict, loaded: dict) -> dict:
    """Every extracted customer is accounted for: delivered, or held back with its reason."""
    not_delivered = read_ndjson(staging / QUARANTINE) + [
        {"id": o["id"], "reasons": [o["reason"]]} for o in loaded.get("refused_oversized", [])
    ] + [{"id": i, "reasons": ["push failed"]} for i in loaded.get("failed_ids", [])]
    report = {
        "extracted": extracted["customers"],
        "mode": extracted.get("mode", "full"),
        "mapping_version": transformed["mapping_version"],
        "payload_mode": transformed["payload_mode"],
        "quarantined": transformed["quarantined"],
        "quarantine_reasons": transformed["quarantine_reasons"],
        "quality_warnings": transformed.get("quality", {}).get("warnings", []),
        "sent": loaded["sent"],
        "accepted": loaded["accepted"],
        "rejected": loaded["rejected"],
        "failed": loaded["failed"],
        "refused_oversized": len(loaded.get("refused_oversized", [])),
        "batches": loaded["batches"],
        "async_errors": loaded.get("async_errors", []),
        "not_delivered": not_delivered,
        "staging": str(staging),
    }
    accounted = report["sent"] + report["quarantined"] + report["failed"] + report["refused_oversized"]
    report["unaccounted"] = report["extracted"] - accounted
    (staging / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return report


def format_report(report: dict, limit: int = 20) -> str:
    lines = [
        "Antavo → Ometria contact sync",
        f"  extracted    {report['extracted']:>8}   ({report['mode']} load, {report['payload_mode']} payloads, "
        f"mapping {report['mapping_version']})",
        f"  sent         {report['sent']:>8}   in {report['batches']} batches",
        f"  accepted     {report['accepted']:>8}",
        f"  rejected     {report['rejected']:>8}   (by Ometria)",
        f"  quarantined  {report['quarantined']:>8}   (held back before sending)",
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
    return "\n".join(lines)

