"""The event triggers' delivery report: its counts add up and it names what it held and why."""

from __future__ import annotations

from antavo_ometria.sync.events.report import format_event_report, unaccounted


def summary(**counts) -> dict:
    base = {"rule": "reward_claimed", "event_type": "loyalty_reward_claimed", "matched": 0, "already_pushed": 0,
            "sent": 0, "accepted": 0, "rejected": 0, "retried": 0, "retried_accepted": 0, "expired": 0, "late": 0,
            "skipped_late": 0, "held": 0, "failed": 0, "failure": None, "contacts_pushed_first": 0,
            "held_reasons": [], "since": "2026-03-01T08:00:00+00:00", "until": "2026-03-01T12:00:00+00:00"}
    return {**base, **counts}


def test_every_matched_event_is_accounted_for_once():
    assert unaccounted(summary(matched=9, already_pushed=2, sent=3, accepted=2, rejected=1, held=2, skipped_late=1,
                               failed=1)) == 0
    assert unaccounted(summary(matched=9, sent=3)) == 6


def test_held_events_are_listed_with_reasons_and_the_rest_counted():
    reasons = [{"id": f"reward_claimed:ev{n}", "kind": "event_held", "reason": f"customer c{n}: deleted"}
               for n in range(3)]
    text = format_event_report([summary(matched=25, held=24, sent=1, rejected=1, held_reasons=reasons)])
    lines = text.splitlines()
    assert lines[0] == "Antavo → Ometria event triggers"
    assert lines[1] == "  reward_claimed → loyalty_reward_claimed   (events from 2026-03-01 08:00 to 2026-03-01 12:00 UTC)"
    assert "      reward_claimed:ev1: customer c1: deleted" in lines
    assert lines[-1] == "      … 22 more in the state store (sync_held_records; `make trace ID=<customer>`)"


def test_a_run_that_left_events_undelivered_says_so_with_the_cause():
    text = format_event_report([summary(matched=3, failed=3, failure="HTTP 503 from Ometria")])
    assert "(FAILED: not everything was delivered)" in text.splitlines()[1]
    assert "    not delivered       3   (the next run sends them; HTTP 503 from Ometria)" in text.splitlines()


def test_a_run_that_delivered_no_rule_says_why_there_is_nothing():
    assert "no rule was delivered" in format_event_report([])


def test_latency_is_shown_as_p50_p95_and_max_of_the_events():
    from antavo_ometria.sync.events.report import latency

    assert latency([]) == "—"
    assert latency([float(n) for n in range(1, 21)]) == "10 s / 19 s / 20 s (20)"
    assert latency([7.0]) == "7 s / 7 s / 7 s (1)"
