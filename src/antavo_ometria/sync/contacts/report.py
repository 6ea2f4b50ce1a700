"""The report step: every extracted customer accounted for (sent, unchanged, or held back with a reason),
the run recorded in the state store, and the run failed unless everything was delivered or visibly held."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from antavo_ometria.ometria.contract import MAX_RECORD_BYTES, kilobytes
from antavo_ometria.sync.contacts.load import LoadOutcome, load_outcome
from antavo_ometria.sync.contacts.staged_files import (
    ASYNC_ERRORS,
    DEFERRED,
    DUPLICATES,
    OVERSIZED,
    QUARANTINE,
    REPORT,
    contact_index,
    contacts_at,
    read_ndjson,
)
from antavo_ometria.sync.contacts.step_results import Extracted, Loaded, Plan, RunStatus, Transformed
from antavo_ometria.sync.store.state import HeldKind, StateStore

log = logging.getLogger(__name__)


class RunNotDelivered(Exception):
    """The run's report does not add up, or some contacts were not delivered: the run must not count as synced."""


@dataclass(frozen=True)
class RunResults:
    """What the report is computed from: the steps' results, and what they left in the staging folder."""

    plan: Plan
    extracted: Extracted
    transformed: Transformed
    loaded: Loaded | None  # None: the load step failed
    load: LoadOutcome  # the load's account of each staged contact
    staged_ids: list[str]  # the contacts the transform staged to send
    quarantined: list[dict] = field(default_factory=list)  # {"id", "reasons"}
    oversized: list[dict] = field(default_factory=list)  # {"id", "reasons"}
    deferred_ids: list[str] = field(default_factory=list)
    async_errors: list[dict] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    payloads: dict[str, dict] = field(default_factory=dict)  # of the contacts not delivered
    staging: str = ""


def gather(staging: Path, plan: Plan, extracted: Extracted, transformed: Transformed,
           loaded: Loaded | None) -> RunResults:
    """Read what the steps left in the staging folder."""
    index = contact_index(staging)  # ids and hashes: the bodies are read only for contacts not delivered
    staged_ids = index.ids.to_pylist()
    outcome = load_outcome(staging, plan, set(staged_ids))
    results = RunResults(
        plan, extracted, transformed, loaded, outcome, staged_ids,
        quarantined=[{"id": q["id"], "reasons": q["reasons"]} for q in read_ndjson(staging / QUARANTINE)],
        oversized=read_ndjson(staging / OVERSIZED), deferred_ids=[d["id"] for d in _ndjson_if_any(staging / DEFERRED)],
        async_errors=_json_if_any(staging / ASYNC_ERRORS), duplicates=_json_if_any(staging / DUPLICATES),
        staging=str(staging))
    failing = set(outcome.rejected_ids) | set(outcome.failed_ids) | set(unreached(results))
    if failing:  # their payloads are kept with them in the state store
        rows = np.flatnonzero(index.among(failing))
        results = replace(results, payloads={i: json.loads(b) for batch in contacts_at(staging, rows)
                                             for i, b, _ in batch})
    return results


def _ndjson_if_any(path: Path) -> list[dict]:
    return read_ndjson(path) if path.exists() else []


def _json_if_any(path: Path) -> list:
    return json.loads(path.read_text()) if path.exists() else []


def unreached(results: RunResults) -> list[str]:
    """Staged contacts the load never reached (it was stopped for good mid-way): not delivered."""
    if results.plan.dry_run:
        return []
    reached = results.load.reached | {o["id"] for o in results.oversized} | set(results.deferred_ids)
    return [i for i in results.staged_ids if i not in reached]


def held_rows(results: RunResults) -> dict[HeldKind, list[dict]]:
    """The contacts Ometria rejected and those not delivered, with reasons and payloads (kept in the store)."""
    errors, payloads = results.load.errors, results.payloads
    rejected = [{"id": i, "reasons": [errors.get(i) or "rejected by Ometria; see the async errors"],
                 "payload": payloads.get(i)} for i in results.load.rejected_ids]
    failed = [{"id": i, "reasons": [f"not delivered: {errors.get(i) or 'the load stopped before sending it'}; "
                                    "the next run sends it"], "payload": payloads.get(i)}
              for i in results.load.failed_ids + unreached(results)]
    return {HeldKind.REJECTED: rejected, HeldKind.FAILED: failed}


def compute_report(results: RunResults) -> dict:
    """The run report from the steps' results: every extracted customer is accounted for (sent, unchanged, or
    held back with its reason), and the run fails unless everything was delivered or visibly held."""
    plan, extracted, transformed, loaded, load = (results.plan, results.extracted, results.transformed,
                                                  results.loaded, results.load)
    held = held_rows(results)
    not_delivered = results.quarantined + results.oversized + [
        {"id": r["id"], "reasons": r["reasons"]} for r in held[HeldKind.REJECTED] + held[HeldKind.FAILED]]
    report = {
        "run_id": plan.run_id,
        "status": (RunStatus.DRY_RUN if plan.dry_run else RunStatus.SUCCESS).value,  # plain JSON (XCom)
        "mode": plan.mode,
        "full_resync_reason": plan.full_resync_reason,
        "resumed": plan.resumed,
        "window": [plan.since, plan.until] if plan.mode == "incremental" else None,
        "mapping_version": transformed.mapping_version,
        "payload_mode": transformed.payload_mode,
        "extracted": extracted.customers,
        "reads": extracted.reads_reason,
        "duplicates": results.duplicates,
        "reconcile_reason": plan.reconcile_reason,
        "suspect_missed": extracted.suspect_reason if extracted.suspect_missed else None,
        "changed": transformed.changed - transformed.resent_unchanged,
        "resent_unchanged": transformed.resent_unchanged,
        **_retried(results, held),
        "leavers": transformed.leavers,
        "removed_from_list": loaded.removed_from_list if loaded else 0,
        "unchanged": transformed.unchanged,
        "quarantined": transformed.quarantined,
        "quarantine_reasons": transformed.quarantine_reasons,
        "quality_warnings": transformed.quality.get("warnings", []),
        "would_send": loaded.would_send if loaded else 0,
        "sent": load.sent,
        "accepted": len(load.accepted_ids),
        "rejected": len(load.rejected_ids),
        "failed": len(held[HeldKind.FAILED]),
        "refused_oversized": load.refused_oversized,
        "batches": load.batches,
        "delivered_earlier": loaded.delivered_earlier if loaded else 0,
        "deferred": len(results.deferred_ids),
        "async_errors": results.async_errors,
        "not_delivered": not_delivered,
        # how many of each kind, in the order of not_delivered: each kind is kept in a different place
        "held_kinds": {"quarantined": len(results.quarantined), "oversized": len(results.oversized),
                       "rejected": len(held[HeldKind.REJECTED]), "failed": len(held[HeldKind.FAILED])},
        "staging": results.staging,
    }
    report["unaccounted"] = unaccounted(report, transformed.changed, plan.dry_run)
    if report["failed"] or report["unaccounted"] or (loaded is None and not plan.dry_run):
        report["status"] = RunStatus.FAILED.value  # (a load that failed, e.g. on what Ometria rejected, fails the run too)
    return report


def unaccounted(report: dict, changed: int, dry_run: bool) -> int:
    """Extracted customers neither sent, unchanged nor held back: must be 0."""
    unsent = changed if dry_run else (report["sent"] + report["failed"] + report["refused_oversized"]
                                      + report["deferred"])
    return report["extracted"] - unsent - report["unchanged"] - report["quarantined"]


RUN_COUNTS = ("extracted", "changed", "unchanged", "sent", "accepted", "rejected", "quarantined", "failed")


def record_report(store: StateStore, plan: Plan, report: dict, held: dict[HeldKind, list[dict]]) -> None:
    """The run in the state store: its held records, Ometria's errors, its status and counts, and its history."""
    for kind, rows in held.items():
        store.held.clear(plan.run_id, kind)
        store.held.record(plan.run_id, kind, rows)
    store.push_errors.record(plan.run_id, report["async_errors"])
    if report["suspect_missed"]:  # the next run reads every customer
        store.runs.request_reconciliation(plan.dag_id, plan.run_id, report["suspect_missed"])
    store.runs.finish(plan.dag_id, plan.run_id, report["status"],
                      report={**report, "not_delivered": len(report["not_delivered"])},
                      **{k: report[k] for k in RUN_COUNTS}, async_errors=len(report["async_errors"]))
    report["history"] = [_history_row(r) for r in store.runs.recent(plan.dag_id, limit=10)]


def build_report(staging: Path, plan: Plan | dict, extracted: Extracted | dict, transformed: Transformed | dict,
                 loaded: Loaded | dict | None,
                 store: StateStore | None = None) -> dict:
    """The report step's work: gather the steps' results, compute the report, record it and write it.

    `loaded` is None when the load step failed: the report then says what it delivered before it
    stopped, and the run is recorded as failed (so the next run starts from before it).
    """
    plan = Plan.of(plan)
    results = gather(staging, plan, Extracted.of(extracted), Transformed.of(transformed),
                     Loaded.of(loaded) if loaded is not None else None)
    report = compute_report(results)
    if store is not None:
        record_report(store, plan, report, held_rows(results))
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
            store.runs.start(dag_id, run_id, mode="not planned", full_resync_reason=None, dry_run=False,
                             mapping_version="", interval_start=None, interval_end=None)
        store.runs.finish(dag_id, run_id, RunStatus.FAILED, report={"failed_step": missing[0]})
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
    if report.get("status") == RunStatus.FAILED:
        raise RunNotDelivered(f"the load failed ({report['rejected']} contact(s) rejected by Ometria; the load task's "
                              "log says why); the run is not counted as synced, and the owed contacts are sent again")


def _retried(results: RunResults, held: dict[HeldKind, list[dict]]) -> dict:
    """Owed contacts this run tried again, and how many of them Ometria has now (settled: it had them already)."""
    loaded, settled = results.loaded, results.transformed.owed_settled
    if loaded is not None and not loaded.dry_run:
        return {"retried": loaded.retried + settled, "retried_accepted": loaded.retried_accepted + settled}
    owed = set(results.plan.retry_ids)  # the load failed: what its journal says of those the plan meant to retry
    tried = [i for i in results.staged_ids if i in owed]
    still_owed = {r["id"] for rows in held.values() for r in rows}
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
    """The report as the task log and the command line show it."""
    return "\n".join(_heading(report) + _counts(report) + _held_lines(report, limit) + _error_lines(report, limit)
                     + _history_lines(report))


def _heading(report: dict) -> list[str]:
    """The title, what was read, and why the run read or re-sent what it did."""
    window = f", window {report['window'][0]} → {report['window'][1]}" if report.get("window") else ""
    status = report["status"]
    lines = [
        "Antavo → Ometria contact sync" + ("  (DRY RUN: nothing was sent)" if status == RunStatus.DRY_RUN else "")
        + ("  (FAILED: not everything was delivered)" if status == RunStatus.FAILED else ""),
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
    return lines


def _counts(report: dict) -> list[str]:
    """One line per count; those that are usually zero only when they are not."""
    lines = [
        f"  unchanged    {report['unchanged']:>8}   (same payload as last sent: not sent again)",
        f"  changed      {report['changed']:>8}" + ("   would be sent" if report["status"] == RunStatus.DRY_RUN else ""),
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
    return lines + [f"  warning: {w}" for w in report.get("quality_warnings", [])]


def _held_lines(report: dict, limit: int) -> list[str]:
    if not report["not_delivered"]:
        return []
    return (["  not delivered, with reasons:"]
            + [f"    {row['id']}: {'; '.join(row['reasons'])}" for row in report["not_delivered"][:limit]]
            + _more_held(report, limit))


def _error_lines(report: dict, limit: int) -> list[str]:
    if not report["async_errors"]:
        return []
    return ([f"  Ometria reported {len(report['async_errors'])} validation error(s) at /v2/push/_errors since the "
             "last run:"]
            + [f"    {e.get('error_path')}: {e.get('error_message')}" for e in report["async_errors"][:limit]])


def _history_lines(report: dict) -> list[str]:
    if not report.get("history"):
        return []
    return ["  recent runs (state store):"] + [
        f"    {str(run['started_at'])[:19]}  {run['status']:8} {run['mode']:11} extracted {run['extracted']:>7}  "
        f"sent {run['sent']:>7}  quarantined {run['quarantined']:>5}  mapping {run['mapping_version']}"
        for run in report["history"]]
