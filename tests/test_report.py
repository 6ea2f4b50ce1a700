"""The run report, computed from the steps' results without a database or a staging folder."""

from __future__ import annotations

from antavo_ometria.sync.contacts.load import LoadOutcome, keep_outcome, load_outcome
from antavo_ometria.sync.contacts.report import RunResults, compute_report, format_report, held_rows
from antavo_ometria.sync.contacts.step_results import Extracted, Loaded, Plan, RunStatus, Transformed
from antavo_ometria.sync.store.state import HeldKind

IDS = [f"c{n:08}" for n in range(1, 11)]  # the ten contacts the transform staged


def plan(**changes) -> Plan:
    fields = {"dag_id": "antavo_ometria_contacts", "run_id": "scheduled__2026-05-04T10:00", "attempt": "a1",
              "mode": "incremental", "full_resync_reason": None, "resumed": None, "send_unchanged": False,
              "dry_run": False, "mapping_version": "m1", "since": "2026-05-04T08:55:00+00:00",
              "until": "2026-05-04T10:00:00+00:00", "previous_full_count": 120}
    return Plan(**{**fields, **changes})


def transformed(changed: int = 10, unchanged: int = 85, quarantined: int = 5, **more) -> Transformed:
    return Transformed(customers=changed + unchanged + quarantined, valid=changed + unchanged, changed=changed,
                       unchanged=unchanged, quarantined=quarantined, quarantine_reasons={"email_valid": quarantined},
                       quality={"warnings": []}, mapping_version="m1", payload_mode="v2", **more)


def results(load: LoadOutcome, loaded: Loaded | None, **more) -> RunResults:
    fields = {"plan": plan(), "extracted": Extracted("customers.ndjson", 100, "incremental", 0),
              "transformed": transformed(), "loaded": loaded, "load": load, "staged_ids": IDS,
              "quarantined": [{"id": f"q{n}", "reasons": ["email is not an email address"]} for n in range(5)],
              "staging": "/staging/run-1"}
    return RunResults(**{**fields, **more})


def test_a_delivered_run_accounts_for_every_extracted_customer():
    outcome = LoadOutcome(batches=1, accepted_ids=IDS[:8], rejected_ids=IDS[8:], reached=frozenset(IDS))
    loaded = Loaded(batches=1, sent=10, accepted=8, rejected=2, failed=0, refused_oversized=0)
    report = compute_report(results(outcome, loaded))
    assert report["status"] == RunStatus.SUCCESS == "success"
    assert (report["extracted"], report["unchanged"], report["quarantined"]) == (100, 85, 5)
    assert (report["sent"], report["accepted"], report["rejected"], report["failed"]) == (10, 8, 2, 0)
    assert report["unaccounted"] == 0
    assert [r["id"] for r in report["not_delivered"]] == [f"q{n}" for n in range(5)] + IDS[8:]
    assert report["held_kinds"] == {"quarantined": 5, "oversized": 0, "rejected": 2, "failed": 0}


def test_counts_that_do_not_add_up_fail_the_run():
    outcome = LoadOutcome(batches=1, accepted_ids=IDS, reached=frozenset(IDS))
    loaded = Loaded(batches=1, sent=10, accepted=10, rejected=0, failed=0, refused_oversized=0)
    report = compute_report(results(outcome, loaded, extracted=Extracted("customers.ndjson", 103, "incremental", 0)))
    assert report["unaccounted"] == 3 and report["status"] == "failed"


def test_a_failed_load_holds_what_it_did_not_reach_and_fails_the_run():
    # the load pushed four contacts (three accepted, one batch of one not delivered) and was stopped for good
    outcome = LoadOutcome(batches=1, accepted_ids=IDS[:3], failed_ids=IDS[3:4], reached=frozenset(IDS[:4]),
                          errors={IDS[3]: "HTTP 503"})
    run = results(outcome, None, payloads={i: {"id": i, "email": f"{i}@example.com"} for i in IDS[3:]})
    report = compute_report(run)
    assert report["status"] == "failed"
    assert (report["sent"], report["accepted"], report["failed"], report["unaccounted"]) == (3, 3, 7, 0)
    failed = held_rows(run)[HeldKind.FAILED]
    assert [r["id"] for r in failed] == IDS[3:]
    assert failed[0]["reasons"] == ["not delivered: HTTP 503; the next run sends it"]
    assert failed[1]["reasons"] == ["not delivered: the load stopped before sending it; the next run sends it"]
    assert failed[1]["payload"] == {"id": IDS[4], "email": f"{IDS[4]}@example.com"}
    assert "(FAILED: not everything was delivered)" in format_report(report).splitlines()[0]


def test_owed_contacts_retried_by_a_failed_load_count_what_ometria_has_now():
    # two of the run's contacts were owed by earlier runs; the load failed before reaching one of them
    outcome = LoadOutcome(batches=1, accepted_ids=IDS[:5], reached=frozenset(IDS[:5]))
    report = compute_report(results(outcome, None, plan=plan(retry_ids=(IDS[0], IDS[9])),
                                    transformed=transformed(owed_settled=1)))
    assert (report["retried"], report["retried_accepted"]) == (3, 2)  # one settled without a push
    assert "  retried 3 previously rejected (2 accepted now)" in format_report(report).splitlines()


def test_a_delivered_load_says_how_many_owed_contacts_it_retried():
    outcome = LoadOutcome(batches=1, accepted_ids=IDS[:9], rejected_ids=IDS[9:], reached=frozenset(IDS))
    loaded = Loaded(batches=1, sent=10, accepted=9, rejected=1, failed=0, refused_oversized=0, retried=4,
                    retried_accepted=3)
    report = compute_report(results(outcome, loaded))
    assert (report["retried"], report["retried_accepted"], report["status"]) == (4, 3, "success")


def test_contacts_over_the_cap_are_deferred_and_accounted_for():
    outcome = LoadOutcome(batches=1, accepted_ids=IDS[:4], reached=frozenset(IDS[:4]))
    loaded = Loaded(batches=1, sent=4, accepted=4, rejected=0, failed=0, refused_oversized=0, deferred=6)
    report = compute_report(results(outcome, loaded, deferred_ids=IDS[4:]))
    assert (report["sent"], report["deferred"], report["failed"], report["unaccounted"]) == (4, 6, 0, 0)
    assert report["status"] == "success"


def test_a_dry_run_sends_nothing_and_counts_what_would_be_sent():
    report = compute_report(results(LoadOutcome(), Loaded(0, 0, 0, 0, 0, 0, dry_run=True, would_send=10),
                                    plan=plan(dry_run=True)))
    assert (report["status"], report["would_send"], report["failed"], report["unaccounted"]) == ("dry_run", 10, 0, 0)
    assert "(DRY RUN: nothing was sent)" in format_report(report).splitlines()[0]


def test_the_report_reads_the_loads_own_account_of_its_attempt_only(tmp_path):
    outcome = LoadOutcome(batches=2, accepted_ids=IDS[:9], failed_ids=IDS[9:], reached=frozenset(IDS),
                          errors={IDS[9]: "HTTP 503"})
    keep_outcome(tmp_path, plan(), outcome)
    assert load_outcome(tmp_path, plan(), set(IDS)) == outcome
    # another attempt's account, or a try that stopped before giving one, is not this attempt's: its journal is
    assert load_outcome(tmp_path, plan(attempt="a2"), set(IDS)) == LoadOutcome()
    keep_outcome(tmp_path, plan(), None)
    assert load_outcome(tmp_path, plan(), set(IDS)) == LoadOutcome()
