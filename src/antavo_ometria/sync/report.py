"""The report step: every extracted customer accounted for (sent, unchanged, or held back with a reason),
the run recorded in the state store, and the run failed unless everything was delivered or visibly held."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path

from antavo_ometria.ometria.contract import MAX_RECORD_BYTES, kilobytes
from antavo_ometria.sync.load import journal_entries, summarise_load
from antavo_ometria.sync.records import Extracted, Loaded, Plan, Transformed
from antavo_ometria.sync.staging import (
    ASYNC_ERRORS,
    DEFERRED,
    DUPLICATES,
    OVERSIZED,
    QUARANTINE,
    REPORT,
    read_contacts,
    read_ndjson,
)
from antavo_ometria.sync.state import StateStore

log = logging.getLogger(__name__)



class RunNotDelivered(Exception):
    """The run's report does not add up, or some contacts were not delivered: the run must not count as synced."""


def build_report(staging: Path, plan: Plan | dict, extracted: Extracted | dict, transformed: Transformed | dict,
                 loaded: Loaded | dict | None,
                 store: StateStore | None = None) -> dict:
    """Every extracted customer is accounted for: sent, unchanged, or held back with its reason.

    `loaded` is None when the load step failed: the report then says what it delivered before it
    stopped, and the run is recorded as failed (so the next run starts from before it).
    """
    plan, extracted, transformed = Plan.of(plan), Extracted.of(extracted), Transformed.of(transformed)
    loaded = Loaded.of(loaded) if loaded is not None else None
    staged = read_contacts(staging)
    journal = summarise_load(staging, plan, {i for i, _, _ in staged})
    deferred = read_ndjson(staging / DEFERRED) if (staging / DEFERRED).exists() else []
    if not plan.dry_run:  # what the load never reached, e.g. it was stopped for good mid-way
        reached = {i for e in journal_entries(staging, plan) for i in e["ids"]} | {
            o["id"] for o in read_ndjson(staging / OVERSIZED)} | {d["id"] for d in deferred}
        journal["failed_ids"] += [i for i, _, _ in staged if i not in reached]
    errors = {i: e.get("error") for e in journal_entries(staging, plan) for i in e["ids"]}
    payloads = {i: json.loads(b) for i, b, _ in staged} if journal["rejected_ids"] + journal["failed_ids"] else {}
    rejected = [{"id": i, "reasons": [errors.get(i) or "rejected by Ometria; see the async errors"],
                 "payload": payloads.get(i)} for i in journal["rejected_ids"]]
    failed = [{"id": i, "reasons": [f"not delivered: {errors.get(i) or 'the load stopped before sending it'}; "
                                    "the next run sends it"], "payload": payloads.get(i)}
              for i in journal["failed_ids"]]
    quarantined = [{"id": q["id"], "reasons": q["reasons"]} for q in read_ndjson(staging / QUARANTINE)]
    oversized = read_ndjson(staging / OVERSIZED)
    not_delivered = quarantined + oversized + [{"id": r["id"], "reasons": r["reasons"]} for r in rejected + failed]
    # how many of each kind, in the order of not_delivered: each kind is kept in a different place
    held_kinds = {"quarantined": len(quarantined), "oversized": len(oversized), "rejected": len(rejected),
                  "failed": len(failed)}
    async_errors = json.loads((staging / ASYNC_ERRORS).read_text()) if (staging / ASYNC_ERRORS).exists() else []
    duplicates = json.loads((staging / DUPLICATES).read_text()) if (staging / DUPLICATES).exists() else []
    report = {
        "run_id": plan.run_id,
        "status": "dry_run" if plan.dry_run else "success",
        "mode": plan.mode,
        "full_resync_reason": plan.full_resync_reason,
        "resumed": plan.resumed,
        "window": [plan.since, plan.until] if plan.mode == "incremental" else None,
        "mapping_version": transformed.mapping_version,
        "payload_mode": transformed.payload_mode,
        "extracted": extracted.customers,
        "reads": extracted.reads_reason,
        "duplicates": duplicates,
        "reconcile_reason": plan.reconcile_reason,
        "suspect_missed": extracted.suspect_reason if extracted.suspect_missed else None,
        "changed": transformed.changed - transformed.resent_unchanged,
        "resent_unchanged": transformed.resent_unchanged,
        **_retried(plan, staged, journal, transformed.owed_settled, loaded),
        "leavers": transformed.leavers,
        "removed_from_list": loaded.removed_from_list if loaded else 0,
        "unchanged": transformed.unchanged,
        "quarantined": transformed.quarantined,
        "quarantine_reasons": transformed.quarantine_reasons,
        "quality_warnings": transformed.quality.get("warnings", []),
        "would_send": loaded.would_send if loaded else 0,
        "sent": journal["sent"],
        "accepted": journal["accepted"],
        "rejected": journal["rejected"],
        "failed": len(journal["failed_ids"]),
        "refused_oversized": journal["refused_oversized"],
        "batches": journal["batches"],
        "delivered_earlier": loaded.delivered_earlier if loaded else 0,
        "deferred": len(deferred),
        "async_errors": async_errors,
        "not_delivered": not_delivered,
        "held_kinds": held_kinds,
        "staging": str(staging),
    }
    unsent = transformed.changed if plan.dry_run else (report["sent"] + report["failed"] + report["refused_oversized"]
                                                       + report["deferred"])
    report["unaccounted"] = report["extracted"] - unsent - report["unchanged"] - report["quarantined"]
    if report["failed"] or report["unaccounted"] or (loaded is None and not plan.dry_run):
        report["status"] = "failed"  # (a load that failed, e.g. on what Ometria rejected, fails the run too)
    if store is not None:
        for kind, rows in (("rejected", rejected), ("failed", failed)):
            store.clear_held(plan.run_id, kind)
            store.record_held(plan.run_id, kind, rows)
        store.record_push_errors(plan.run_id, report["async_errors"])
        if report["suspect_missed"]:  # the next run reads every customer
            store.request_reconciliation(plan.dag_id, plan.run_id, report["suspect_missed"])
        store.finish_run(plan.dag_id, plan.run_id, report["status"], report={**report, "not_delivered": len(not_delivered)},
                         **{k: report[k] for k in ("extracted", "changed", "unchanged", "sent", "accepted", "rejected",
                                                   "quarantined", "failed")},
                         async_errors=len(report["async_errors"]))
        report["history"] = [_history_row(r) for r in store.runs(plan.dag_id, limit=10)]
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
    if report.get("status") == "failed":
        raise RunNotDelivered(f"the load failed ({report['rejected']} contact(s) rejected by Ometria; the load task's "
                              "log says why); the run is not counted as synced, and the owed contacts are sent again")


def _retried(plan: Plan, staged: list, journal: dict, settled: int, loaded: Loaded | None) -> dict:
    """Owed contacts this run tried again, and how many of them Ometria has now (settled: it had them already)."""
    if loaded is not None and not loaded.dry_run:
        return {"retried": loaded.retried + settled, "retried_accepted": loaded.retried_accepted + settled}
    owed = set(plan.retry_ids)  # the load failed: what its journal says of those the plan meant to retry
    tried = [i for i, _, _ in staged if i in owed]
    still_owed = set(journal["rejected_ids"]) | set(journal["failed_ids"])
    return {"retried": len(tried) + settled, "retried_accepted": sum(i not in still_owed for i in tried) + settled}


def _earlier(report: dict) -> str:
    """What a retried load (a retry, a Clear of only the load) did not send again."""
    earlier = report.get("delivered_earlier", 0)
    if not earlier:
        return ""
    if earlier == report["sent"]:
        return "; all by an earlier try of this load: this try sent none again"
    return f"; {earlier} by an earlier try of this load (not sent again), {report['sent'] - earlier} by this try"


def _history_row(run: dict) -> dict:
    keys = ("run_id", "status", "mode", "mapping_version", "extracted", "changed", "sent", "accepted",
            "rejected", "quarantined", "failed", "started_at")
    return {k: (run[k].isoformat() if isinstance(run[k], datetime) else run[k]) for k in keys}


def _more_held(report: dict, limit: int) -> list[str]:
    """Where the held records not listed are: each kind is kept in its own place."""
    staging, more = report["staging"], len(report["not_delivered"]) - limit
    if more <= 0:
        return []
    kinds = report.get("held_kinds")
    if not kinds:  # a report written before the kinds were counted
        return [f"    … {more} more: {staging}/{QUARANTINE}, {staging}/{OVERSIZED} and the state store (sync_held_records)"]
    places = {"quarantined": f"quarantined, in {staging}/{QUARANTINE}",
              "oversized": f"over {kilobytes(MAX_RECORD_BYTES)}, in {staging}/{OVERSIZED}",
              "rejected": "rejected by Ometria, in the state store (sync_held_records, with their payloads)",
              "failed": "not delivered (the next run sends them), in the state store (sync_held_records)"}
    lines, shown = [], limit
    for kind, count in kinds.items():
        hidden = count - min(count, shown)
        shown -= min(count, shown)
        if hidden:
            lines.append(f"    … {hidden} more {places[kind]}")
    return lines


def format_report(report: dict, limit: int = 20) -> str:
    window = f", window {report['window'][0]} → {report['window'][1]}" if report.get("window") else ""
    lines = [
        "Antavo → Ometria contact sync" + ("  (DRY RUN: nothing was sent)" if report["status"] == "dry_run" else "")
        + ("  (FAILED: not everything was delivered)" if report["status"] == "failed" else ""),
        f"  extracted    {report['extracted']:>8}   ({report['mode']} load{window}; {report['payload_mode']} payloads, "
        f"mapping {report['mapping_version']})",
    ]
    if report.get("reads") and report["mode"] == "incremental":
        lines.append(f"  read by      {report['reads']}")
    if report.get("full_resync_reason"):
        lines.append(f"  FULL RE-SYNC: {report['full_resync_reason']}")
    if report.get("reconcile_reason"):
        lines.append(f"  reconciliation: {report['changed']} drifted, sent ({report['reconcile_reason']}; every "
                     "customer read, compared with what Ometria accepted)")
    if report.get("suspect_missed"):
        lines.append(f"  SUSPECTED MISSED CHANGES: {report['suspect_missed']}; the next run reconciles")
    if report.get("retried"):
        lines.append(f"  retried {report['retried']} previously rejected ({report['retried_accepted']} accepted now)")
    if report.get("resumed"):
        lines.append(f"  RESUMED: {report['resumed']}")
    if report.get("duplicates"):
        lines.append(f"  duplicates   {len(report['duplicates']):>8}   (came twice from Antavo; the copy updated last "
                     f"was kept: {', '.join(report['duplicates'][:5])})")
    lines += [
        f"  unchanged    {report['unchanged']:>8}   (same payload as last sent: not sent again)",
        f"  changed      {report['changed']:>8}" + ("   would be sent" if report["status"] == "dry_run" else ""),
        *([f"  re-sent      {report['resent_unchanged']:>8}   (unchanged: the same payload Ometria accepted)"]
          if report.get("resent_unchanged") else []),
        *([f"  left         {report['leavers']:>8}   (no longer active in Antavo; removed from the list: "
           f"{report.get('removed_from_list', 0)})"] if report.get("leavers") else []),
        f"  sent         {report['sent']:>8}   in {report['batches']} batches" + _earlier(report),
        f"  accepted     {report['accepted']:>8}",
        f"  rejected     {report['rejected']:>8}   (by Ometria)",
        f"  quarantined  {report['quarantined']:>8}   (held back by the quality gate)",
        f"  failed       {report['failed']:>8}   (not delivered: the next run sends them)",
        f"  oversized    {report['refused_oversized']:>8}   (over {kilobytes(MAX_RECORD_BYTES)}, not sent)",
        *([f"  deferred     {report['deferred']:>8}   (over sync.max_contacts_per_run: owed, the next runs send "
           "them)"] if report.get("deferred") else []),
        f"  unaccounted  {report['unaccounted']:>8}",
    ]
    if report["quarantine_reasons"]:
        lines.append("  quarantined by check: " + ", ".join(f"{k} {v}" for k, v in sorted(report["quarantine_reasons"].items())))
    lines += [f"  warning: {w}" for w in report.get("quality_warnings", [])]
    if report["not_delivered"]:
        lines.append("  not delivered, with reasons:")
        for row in report["not_delivered"][:limit]:
            lines.append(f"    {row['id']}: {'; '.join(row['reasons'])}")
        lines += _more_held(report, limit)
    if report["async_errors"]:
        lines.append(f"  Ometria reported {len(report['async_errors'])} validation error(s) at /v2/push/_errors "
                     "since the last run:")
        lines += [f"    {e.get('error_path')}: {e.get('error_message')}" for e in report["async_errors"][:limit]]
    if report.get("history"):
        lines.append("  recent runs (state store):")
        for run in report["history"]:
            lines.append(f"    {str(run['started_at'])[:19]}  {run['status']:8} {run['mode']:11} "
                         f"extracted {run['extracted']:>7}  sent {run['sent']:>7}  quarantined {run['quarantined']:>5}  "
                         f"mapping {run['mapping_version']}")
    return "\n".join(lines)
