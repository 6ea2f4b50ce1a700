"""A record is owed until Ometria accepts it, and a reconciliation bounds what the change list can miss.

Each test counts per id what the Ometria sandbox stored."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from antavo_ometria.sync.contacts.extract import extract
from antavo_ometria.sync.contacts.load import LoadFailed, load_staged
from antavo_ometria.sync.contacts.plan import plan_run
from antavo_ometria.sync.contacts.prepare import TooManyLeavers, transform_staged
from antavo_ometria.sync.contacts.report import RunNotDelivered, format_report, report_run
from antavo_ometria.sync.contacts.staged_files import read_contacts
from antavo_ometria.sync.store.state import StateStore
from antavo_ometria.sync.tables.mapping import load_contact_mapping

PROJECT = Path(__file__).resolve().parents[1]
DAG = "antavo_ometria_contacts"
HOUR = datetime(2026, 12, 2, 10, tzinfo=UTC)


@pytest.fixture
def store(state_url):
    store = StateStore(state_url)
    store.migrate()
    return store


def sync(store, antavo, ometria, tmp_path, run_id, interval=(None, None), reconcile=False,
         mappings: Path = PROJECT / "include" / "mappings") -> dict:
    """One run as the DAG runs it: the report (also of a failed run), with the load's error if it failed."""
    mapping = load_contact_mapping(mappings)
    staging = tmp_path / run_id
    steps = {"plan": plan_run(store, mapping, DAG, run_id, interval, reconcile=reconcile)}
    steps["extract"] = extract(antavo, staging, steps["plan"], paths=mapping.loyalty_fields)
    steps["transform"] = transform_staged(staging, mapping, steps["plan"], store)
    error = None
    try:
        steps["load"] = load_staged(staging, ometria, steps["plan"], store)
    except LoadFailed as exc:
        error = exc
    try:
        report = report_run(staging, steps, store, DAG, run_id)
    except RunNotDelivered:
        report = json.loads((staging / "report.json").read_text())
    return {**report, "load_error": error, "plan": steps["plan"]}


def first_sync(store, sandbox, antavo_client, ometria_client, tmp_path) -> dict:
    report = sync(store, antavo_client, ometria_client, tmp_path, "first", (None, HOUR))
    assert report["accepted"] == 290 and report["status"] == "success"
    return report


def test_a_custom_field_deleted_in_ometria_fails_the_load_and_its_contacts_are_sent_once_it_is_back(
        store, sandbox, antavo_client, ometria_client, tmp_path):
    first_sync(store, sandbox, antavo_client, ometria_client, tmp_path)
    changed = [f"c{n:08d}" for n in range(20, 45)]
    for customer_id in changed:
        sandbox.antavo.touch(customer_id, {"first_name": "Renamed"}, at=HOUR + timedelta(minutes=30))
    loyalty_points = sandbox.ometria.custom_fields.pop("loyalty_points")  # deleted in the Ometria account

    refused = sync(store, antavo_client, ometria_client, tmp_path, "refused", (HOUR, HOUR + timedelta(hours=1)))
    assert refused["status"] == "failed" and refused["load_error"] is not None
    assert not refused["load_error"].retryable  # red at once: retrying in minutes cannot create the field
    assert "A custom field may be missing in Ometria: root > loyalty_points" in str(refused["load_error"])
    stored = {i: sandbox.ometria.contacts[("antavo", i)]["firstname"] for i in changed
              if ("antavo", i) in sandbox.ometria.contacts}
    assert "Renamed" not in stored.values()  # nothing of it reached Ometria
    owed = [store.contacts.get(i) for i in changed]
    assert all(c is not None and c["status"] in ("rejected", "failed") for c in owed)  # owed, not "unchanged"

    sandbox.ometria.custom_fields["loyalty_points"] = loyalty_points  # the field is created again
    fixed = sync(store, antavo_client, ometria_client, tmp_path, "fixed", (HOUR + timedelta(hours=1),
                                                                          HOUR + timedelta(hours=2)))
    assert fixed["status"] == "success" and fixed["accepted"] >= len(changed)
    assert all(sandbox.ometria.contacts[("antavo", i)]["firstname"] == "Renamed" for i in changed)
    assert all(sandbox.ometria.received[("contact", i)] == 2 for i in changed)  # the first sync and this one
    assert store.contacts.owed_count() == 0


def test_http_400_for_whole_requests_is_a_failed_batch_retried_never_permanent_rejections(
        store, sandbox, antavo_client, ometria_client, tmp_path):
    sandbox.ometria.refuse_requests = 2  # a proxy answers 400 to two requests
    report = sync(store, antavo_client, ometria_client, tmp_path, "first", (None, HOUR))
    assert report["status"] == "failed" and report["load_error"].retryable
    assert report["rejected"] == 0 and report["failed"] == 200
    assert not store.held.find(kind="rejected")
    retry = load_staged(tmp_path / "first", ometria_client, report["plan"], store)  # Airflow's retry of the load task
    assert retry.failed == 0 and retry.accepted == 290
    assert len(sandbox.ometria.contacts) == 290 and set(sandbox.ometria.received.values()) == {1}


def test_a_reconciliation_sends_what_the_change_list_missed_and_only_that(
        store, sandbox, antavo_client, ometria_client, tmp_path):
    first_sync(store, sandbox, antavo_client, ometria_client, tmp_path)
    sandbox.antavo.change_quietly("c00000005", {"first_name": "Quietly"})  # a bulk job: updated_at not bumped
    quiet = sync(store, antavo_client, ometria_client, tmp_path, "hourly", (HOUR, HOUR + timedelta(hours=1)))
    assert quiet["extracted"] == 0 and quiet["sent"] == 0  # the change list cannot see it
    pushes = sandbox.ometria.pushes
    reconciled = sync(store, antavo_client, ometria_client, tmp_path, "reconcile",
                      (HOUR + timedelta(hours=1), HOUR + timedelta(hours=2)), reconcile=True)
    assert reconciled["reconcile_reason"] == "reconciliation requested" and reconciled["extracted"] == 300
    assert reconciled["changed"] == 1 and reconciled["sent"] == 1 and sandbox.ometria.pushes == pushes + 1
    assert sandbox.ometria.contacts[("antavo", "c00000005")]["firstname"] == "Quietly"
    assert sandbox.ometria.received[("contact", "c00000005")] == 2
    assert sum(sandbox.ometria.received.values()) == 291  # no full re-send


def test_a_reconciliation_is_due_every_reconcile_every_hours(store, sandbox, antavo_client, ometria_client, tmp_path):
    first_sync(store, sandbox, antavo_client, ometria_client, tmp_path)
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    assert plan_run(store, mapping, DAG, "soon", (HOUR, HOUR + timedelta(hours=1))).mode == "incremental"
    runs = store.table("sync_runs")
    with store.engine.begin() as conn:  # the last full read finished a day ago
        conn.execute(runs.update().where(runs.c.run_id == "first")
                     .values(finished_at=datetime.now(UTC) - timedelta(hours=25)))
    later = plan_run(store, mapping, DAG, "later", (HOUR, HOUR + timedelta(hours=1)))
    assert later.mode == "full" and "reconcile_every_hours = 24" in later.reconcile_reason
    assert not later.send_unchanged  # only what differs is sent


def test_members_who_leave_the_programme_leave_the_list_and_a_truncated_read_removes_no_one(
        store, sandbox, antavo_client, ometria_client, tmp_path):
    first_sync(store, sandbox, antavo_client, ometria_client, tmp_path)
    before = dict(sandbox.ometria.contacts[("antavo", "c00000001")])
    assert 8400 in before["lists"]
    sandbox.antavo.touch("c00000001", {"status": "inactive"}, at=HOUR + timedelta(minutes=5))
    left = sync(store, antavo_client, ometria_client, tmp_path, "left", (HOUR, HOUR + timedelta(hours=1)),
                reconcile=True)
    assert left["status"] == "success" and left["leavers"] == 1 and left["removed_from_list"] == 1
    after = sandbox.ometria.contacts[("antavo", "c00000001")]
    assert 8400 not in after["lists"]
    assert {k: v for k, v in after.items() if k != "lists"} == {k: v for k, v in before.items() if k != "lists"}
    assert store.contacts.get("c00000001")["status"] == "left" and store.contacts.known_count() == 289

    for n in range(100, 130):  # 30 of 289 members missing at once: a truncated read, most likely
        sandbox.antavo.touch(f"c{n:08d}", {"status": "inactive"}, at=HOUR + timedelta(hours=1, minutes=5))
    with pytest.raises(TooManyLeavers, match="Nobody was removed"):
        sync(store, antavo_client, ometria_client, tmp_path, "truncated",
             (HOUR + timedelta(hours=1), HOUR + timedelta(hours=2)), reconcile=True)
    assert all(8400 in sandbox.ometria.contacts[("antavo", f"c{n:08d}")]["lists"] for n in range(100, 130))


def test_a_member_read_as_inactive_by_an_incremental_run_leaves_the_list_and_is_not_sent(
        store, sandbox, antavo_client, ometria_client, tmp_path):
    first_sync(store, sandbox, antavo_client, ometria_client, tmp_path)
    sandbox.antavo.touch("c00000001", {"status": "inactive", "first_name": "Gone"}, at=HOUR + timedelta(minutes=5))
    hourly = sync(store, antavo_client, ometria_client, tmp_path, "hourly", (HOUR, HOUR + timedelta(hours=1)))
    assert hourly["status"] == "success" and hourly["leavers"] == 1 and hourly["removed_from_list"] == 1
    stored = sandbox.ometria.contacts[("antavo", "c00000001")]
    assert 8400 not in stored["lists"] and stored["firstname"] != "Gone"  # removed, not re-sent as a member
    assert store.contacts.get("c00000001")["status"] == "left"


def test_a_cap_per_run_spreads_the_contacts_over_runs_each_sent_once(
        store, sandbox, antavo_client, ometria_client, tmp_path, mappings):
    settings = mappings / "settings.toml"
    settings.write_text(settings.read_text().replace("max_contacts_per_run = 0 ", "max_contacts_per_run = 100"))
    first = sync(store, antavo_client, ometria_client, tmp_path, "first", (None, HOUR), mappings=mappings)
    assert (first["status"], first["accepted"], first["deferred"], first["failed"]) == ("success", 100, 190, 0)
    assert first["unaccounted"] == 0 and store.contacts.owed_count() == 190
    assert "deferred          190   (over sync.max_contacts_per_run" in format_report(first)
    assert len(sandbox.ometria.contacts) == 100

    hours = [(HOUR + timedelta(hours=n), HOUR + timedelta(hours=n + 1)) for n in range(3)]
    second = sync(store, antavo_client, ometria_client, tmp_path, "second", hours[0], mappings=mappings)
    assert (second["status"], second["accepted"], second["deferred"]) == ("success", 100, 90)
    third = sync(store, antavo_client, ometria_client, tmp_path, "third", hours[1], mappings=mappings)
    assert (third["status"], third["accepted"], third["deferred"]) == ("success", 90, 0)
    assert store.contacts.owed_count() == 0 and store.contacts.known_count() == 290
    assert len(sandbox.ometria.contacts) == 290
    assert set(sandbox.ometria.received[("contact", i)] for _, i in sandbox.ometria.contacts) == {1}  # each once
    quiet = sync(store, antavo_client, ometria_client, tmp_path, "quiet", hours[2], mappings=mappings)
    assert quiet["accepted"] == quiet["deferred"] == 0


def test_a_run_keeps_the_settings_it_was_planned_with(store, sandbox, antavo_client, ometria_client, tmp_path,
                                                    mappings):
    settings = mappings / "settings.toml"
    capped = settings.read_text().replace("max_contacts_per_run = 0 ", "max_contacts_per_run = 100")
    settings.write_text(capped)
    mapping = load_contact_mapping(mappings)
    plan = plan_run(store, mapping, DAG, "first", (None, HOUR))
    settings.write_text(capped.replace("max_contacts_per_run = 100", "max_contacts_per_run = 0 "))  # saved meanwhile
    staging = tmp_path / "first"
    extract(antavo_client, staging, plan, paths=mapping.loyalty_fields)
    transform_staged(staging, load_contact_mapping(mappings), plan, store)
    loaded = load_staged(staging, ometria_client, plan, store)
    assert (loaded.accepted, loaded.deferred) == (100, 190)  # the cap the run was planned with
    assert len(sandbox.ometria.contacts) == 100 and store.contacts.owed_count() == 190


def hours(n: int) -> tuple[datetime, datetime]:
    return HOUR + timedelta(hours=n), HOUR + timedelta(hours=n + 1)


def test_a_failed_reconciliation_is_done_again_and_never_becomes_a_full_re_send(store, sandbox, antavo_client,
                                                                                ometria_client, tmp_path):
    first_sync(store, sandbox, antavo_client, ometria_client, tmp_path)
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    failed = plan_run(store, mapping, DAG, "reconcile", hours(0), reconcile=True)
    store.runs.finish(DAG, "reconcile", "failed")  # e.g. Antavo was down during its scan
    again = plan_run(store, mapping, DAG, "next", hours(1))
    assert failed.mode == again.mode == "full" and again.full_resync_reason is None and not again.send_unchanged
    assert again.reconcile_reason == "the reconciliation of run reconcile did not complete: it is done again"


def test_contacts_owed_before_never_count_as_new_rejections_and_a_split_batch_is_not_refused_whole(
        store, sandbox, antavo_client, ometria_client, tmp_path):
    # the first 12 contacts of the first batch: halving it down to them leaves a piece of 12, all rejected
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    scratch = StateStore(f"sqlite:///{tmp_path}/scratch.db")
    scratch.migrate()
    plan = plan_run(scratch, mapping, DAG, "scratch")
    extract(antavo_client, tmp_path / "scratch", plan, paths=mapping.loyalty_fields)
    transform_staged(tmp_path / "scratch", mapping, plan)
    rejected = {i for i, _, _ in read_contacts(tmp_path / "scratch")[:12]}
    sandbox.ometria.reject_ids = set(rejected)
    first = sync(store, antavo_client, ometria_client, tmp_path, "first", (None, HOUR))
    assert first["status"] == "success" and first["rejected"] == 12  # 4 %: held, not a shared cause
    assert {i for i in rejected if store.contacts.get(i)["status"] == "rejected"} == rejected
    reconciled = sync(store, antavo_client, ometria_client, tmp_path, "reconcile", hours(0), reconcile=True)
    assert reconciled["status"] == "success" and reconciled["rejected"] == len(rejected)  # tried again, still held
    assert reconciled["sent"] == len(rejected) and reconciled["retried"] == len(rejected)
    assert all(sandbox.ometria.received[("contact", i)] == 0 for i in rejected)
    assert store.contacts.owed_count() == len(rejected)


def test_one_rejection_in_a_quiet_hour_is_held_and_the_run_stays_green(store, sandbox, antavo_client,
                                                                        ometria_client, tmp_path):
    first_sync(store, sandbox, antavo_client, ometria_client, tmp_path)
    for n in range(30, 40):
        sandbox.antavo.touch(f"c{n:08d}", {"first_name": "Changed"}, at=HOUR + timedelta(minutes=5))
    sandbox.ometria.reject_ids = {"c00000031"}
    hourly = sync(store, antavo_client, ometria_client, tmp_path, "hourly", hours(0))
    assert hourly["status"] == "success" and hourly["rejected"] == 1 and hourly["accepted"] == 9
    assert store.contacts.get("c00000031")["status"] == "rejected"


def test_a_push_whose_answer_was_lost_leaves_nothing_known_so_a_later_run_sends_it(
        store, sandbox, antavo_client, ometria_client, tmp_path):
    first_sync(store, sandbox, antavo_client, ometria_client, tmp_path)
    # a push that timed out; Ometria may have stored a payload the customer has since reverted
    from antavo_ometria.sync.store.state import FAILED, Backoff

    store.contacts.record_owed([("c00000005", "payload-that-timed-out")], FAILED, "not delivered: timed out", "v",
                               "lost", Backoff())
    assert store.contacts.accepted_hashes(["c00000005"]) == {} and store.contacts.known_count() == 289
    reconciled = sync(store, antavo_client, ometria_client, tmp_path, "reconcile", hours(0), reconcile=True)
    assert reconciled["sent"] == 1 and reconciled["retried_accepted"] == 1
    assert sandbox.ometria.received[("contact", "c00000005")] == 2 and store.contacts.owed_count() == 0


def test_a_removal_that_fails_turns_the_run_red_and_the_next_run_removes_the_member(
        store, sandbox, antavo_client, ometria_client, tmp_path):
    first_sync(store, sandbox, antavo_client, ometria_client, tmp_path)
    sandbox.antavo.touch("c00000001", {"status": "inactive"}, at=HOUR + timedelta(minutes=5))
    sandbox.ometria.reject_ids = {"c00000001"}  # Ometria refuses the removal
    hourly = sync(store, antavo_client, ometria_client, tmp_path, "hourly", hours(0))
    assert hourly["status"] == "failed" and "could not be removed from the list" in str(hourly["load_error"])
    assert 8400 in sandbox.ometria.contacts[("antavo", "c00000001")]["lists"]
    member = store.contacts.get("c00000001")
    assert member["status"] == "sent"  # still a member: not recorded as left
    with pytest.raises(LoadFailed, match="could not be removed"):  # Airflow's retry, while Ometria still refuses
        load_staged(tmp_path / "hourly", ometria_client, hourly["plan"], store)
    assert store.contacts.get("c00000001") == member  # the removal is no delivery: still a member

    sandbox.ometria.reject_ids = set()
    nxt = sync(store, antavo_client, ometria_client, tmp_path, "next", hours(1))
    assert nxt["reconcile_reason"].startswith("an earlier run suspected missed changes (1 leaver(s) could not be")
    assert nxt["status"] == "success" and nxt["removed_from_list"] == 1
    assert 8400 not in sandbox.ometria.contacts[("antavo", "c00000001")]["lists"]
    assert store.contacts.get("c00000001")["status"] == "left"


def test_an_hourly_run_guards_leavers_too(store, sandbox, antavo_client, ometria_client, tmp_path):
    first_sync(store, sandbox, antavo_client, ometria_client, tmp_path)
    for n in range(100, 130):  # 30 of 290 members read as inactive in one hour
        sandbox.antavo.touch(f"c{n:08d}", {"status": "inactive"}, at=HOUR + timedelta(minutes=5))
    with pytest.raises(TooManyLeavers, match="Nobody was removed"):
        sync(store, antavo_client, ometria_client, tmp_path, "hourly", hours(0))
    assert all(8400 in sandbox.ometria.contacts[("antavo", f"c{n:08d}")]["lists"] for n in range(100, 130))


def test_owed_contacts_that_leave_or_are_held_back_are_owed_no_more(store, sandbox, antavo_client,
                                                                    ometria_client, tmp_path):
    sandbox.ometria.reject_ids = {"c00000006", "c00000008"}
    first_sync_report = sync(store, antavo_client, ometria_client, tmp_path, "first", (None, HOUR))
    assert first_sync_report["rejected"] == 2 and store.contacts.owed_count() == 2
    sandbox.antavo.touch("c00000006", {"status": "inactive"}, at=HOUR + timedelta(minutes=5))
    sandbox.antavo.touch("c00000008", {"email": "not an email"}, at=HOUR + timedelta(minutes=5))
    hourly = sync(store, antavo_client, ometria_client, tmp_path, "hourly", hours(0))
    assert hourly["status"] == "success" and hourly["quarantined"] == 1
    assert store.contacts.get("c00000006")["status"] == "left" and store.contacts.get("c00000008")["status"] == "held"
    assert store.contacts.owed_count() == 0
    quiet = sync(store, antavo_client, ometria_client, tmp_path, "quiet", hours(1))
    assert quiet["extracted"] == 0  # not read again every run


def test_contacts_ometria_accepts_then_lists_invalid_stay_owed_and_are_sent_again(
        store, sandbox, antavo_client, ometria_client, tmp_path):
    # Ometria does not document which invalid records its answer counts as rejected and which it only lists at
    # /v2/push/_errors later: here every one is counted accepted, then listed
    first_sync(store, sandbox, antavo_client, ometria_client, tmp_path)
    sandbox.ometria.validate_later = True
    changed = [f"c{n:08d}" for n in range(40, 60)]
    for customer_id in changed:
        sandbox.antavo.touch(customer_id, {"first_name": "Later"}, at=HOUR + timedelta(minutes=30))
    field_type = sandbox.ometria.custom_fields.pop("loyalty_points")
    listed = sync(store, antavo_client, ometria_client, tmp_path, "listed", hours(0))
    assert listed["status"] == "failed" and not listed["load_error"].retryable
    assert "then listed 20 validation errors" in str(listed["load_error"])
    assert "A custom field may be missing in Ometria: root > loyalty_points" in str(listed["load_error"])
    assert all(sandbox.ometria.contacts[("antavo", i)]["firstname"] != "Later" for i in changed)
    assert store.contacts.owed_count() == 20 and store.contacts.accepted_hashes(changed) == {}, [
        store.contacts.get(i) for i in changed[:2]]
    with pytest.raises(LoadFailed):  # a Clear of the load, errors no longer new: still not counted delivered
        load_staged(tmp_path / "listed", ometria_client, listed["plan"], store)
    assert store.contacts.owed_count() == 20

    sandbox.ometria.custom_fields["loyalty_points"] = field_type
    fixed = sync(store, antavo_client, ometria_client, tmp_path, "fixed", hours(1))
    assert fixed["status"] == "success" and fixed["retried_accepted"] == 20 and store.contacts.owed_count() == 0
    assert all(sandbox.ometria.contacts[("antavo", i)]["firstname"] == "Later" for i in changed)
