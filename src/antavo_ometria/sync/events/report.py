"""The event triggers' delivery report: per rule, what was matched, sent, already sent, held and late.

Pure formatting of the summaries `events.deliver` returns (one per rule), shown by the `deliver_<rule>` task's
log and by `make events`; the counts add up to the events matched, as the contact sync's report does.
"""

from __future__ import annotations

import math

from antavo_ometria.ometria.contract import LATE_AFTER, hours


def unaccounted(summary: dict) -> int:
    """Matched events neither already sent, sent, held, skipped as late nor left for the next run: always 0."""
    return summary["matched"] - summary["already_pushed"] - summary["sent"] - summary["held"] - \
        summary["skipped_late"] - summary["failed"]


def _window(summary: dict) -> str:
    since, until = summary.get("since"), summary.get("until")
    if not since or not until:
        return ""
    return f"   (events from {since[:16].replace('T', ' ')} to {until[:16].replace('T', ' ')} UTC)"


def _rule_lines(summary: dict) -> list[str]:
    window, age = f"{LATE_AFTER.total_seconds() / 3600:g}-hour", hours(LATE_AFTER)
    lines = [
        f"  {summary['rule']} → {summary['event_type']}" + _window(summary)
        + ("  (FAILED: not everything was delivered)" if summary["failed"] else ""),
        f"    matched        {summary['matched']:>6}",
        f"    already sent   {summary['already_pushed']:>6}   (by an earlier run: not sent again)",
        f"    sent           {summary['sent']:>6}   ({summary['accepted']} accepted, {summary['rejected']} rejected: "
        f"held, retried while in Ometria's {window} window)",
        f"    held           {summary['held']:>6}   (not sendable as they are"
        + (": reasons below)" if summary["held"] else ")"),
        f"    late           {summary['late']:>6}   (over {age} old: sent, but they cannot start an automation)",
        f"    skipped late   {summary['skipped_late']:>6}   (over {age} old, not sent: events.late_event_policy = skip)",
        f"    not delivered  {summary['failed']:>6}   (the next run sends them"
        + (f"; {summary['failure']})" if summary.get("failure") else ")"),
        f"    unaccounted    {unaccounted(summary):>6}",
    ]
    if summary.get("answer_lost"):
        lines.append(f"    answer lost: {summary['answer_lost']} of those not delivered were sent, but Ometria's answer "
                     "did not arrive (it may have stored them): the next run sends them again with the same id "
                     f"(held as event_answer_lost): {', '.join(summary.get('answer_lost_ids') or [])}")
    if summary.get("resent_after_lost_answer"):
        lines.append(f"    re-sent after a lost answer: {summary['resent_after_lost_answer']} (same id; Ometria may have "
                     "received them twice, and whether it starts an automation again is not documented)")
    if summary.get("contacts_pushed_first"):
        lines.append(f"    contacts pushed first: {summary['contacts_pushed_first']} (Ometria did not have them yet)")
    if summary.get("retried") or summary.get("expired"):
        lines.append(f"    retried {summary.get('retried', 0)} previously rejected "
                     f"({summary.get('retried_accepted', 0)} accepted now); {summary.get('expired', 0)} expired "
                     f"(rejected, past the {window} window: no longer retried)")
    listed = summary.get("held_reasons") or []
    if listed:
        lines.append("    held and rejected, with reasons:")
        lines += [f"      {row['id']}: {row['reason']}" for row in listed]
        more = summary["held"] + summary["rejected"] - len(listed)
        if more > 0:
            lines.append(f"      … {more} more in the state store (sync_held_records; `make trace ID=<customer>`)")
    return lines


def format_event_report(summaries: list[dict]) -> str:
    """The delivery report of one run of the event triggers, one block per rule."""
    lines = ["Antavo → Ometria event triggers"]
    if not summaries:
        lines.append("  no rule was delivered (the run stopped before; its log says why)")
    for summary in summaries:
        lines += _rule_lines(summary)
    return "\n".join(lines)


def latency(seconds: list[float]) -> str:
    """`p50 / p95 / max` of event → Ometria latencies, for the dashboard; an em dash when there are none."""
    if not seconds:
        return "—"
    ordered = sorted(seconds)

    def rank(share: float) -> float:  # nearest rank
        return ordered[min(len(ordered) - 1, max(0, math.ceil(len(ordered) * share) - 1))]

    return f"{rank(0.5):.0f} s / {rank(0.95):.0f} s / {ordered[-1]:.0f} s ({len(ordered)})"
