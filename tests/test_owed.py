"""A record is owed until Ometria accepts it, and a reconciliation bounds what the change list can miss.

Each test counts per id what the Ometria sandbox stored."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from antavo_ometria.sync.extract import extract
from antavo_ometria.sync.load import LoadFailed, load_staged
from antavo_ometria.sync.mapping import load_contact_mapping
from antavo_ometria.sync.plan import plan_run
from antavo_ometria.sync.prepare import TooManyLeavers, transform_staged
from antavo_ometria.sync.report import RunNotDelivered, format_report, report_run
from antavo_ometria.sync.state import StateStore

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
        steps["load"] = load_staged(staging, ometria, steps["plan"], store, mapping.settings)
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
    owed = [store.contact(i) for i in changed]
    assert all(c["status"] in ("rejected", "failed") for c in owed if c)  # owed, not "unchanged"

    sandbox.ometria.custom_fields["loyalty_points"] = loyalty_points  # the field is created again
    fixed = sync(store, antavo_client, ometria_client, tmp_path, "fixed", (HOUR + timedelta(hours=1),
                                                                          HOUR + timedelta(hours=2)))
    assert fixed["status"] == "success" and fixed["accepted"] >= len(changed)
    assert all(sandbox.ometria.contacts[("antavo", i)]["firstname"] == "Renamed" for i in changed)
    assert all(sandbox.ometria.received[("contact", i)] == 2 for i in changed)  # the first sync and this one
    assert store.owed_count() == 0


def test_http_400_for_whole_requests_is_a_failed_batch_retried_never_permanent_rejections(
        store, sandbox, antavo_client, ometria_client, tmp_path):
    sandbox.ometria.refuse_requests = 2  # a proxy answers 400 to two requests
    report = sync(store, antavo_client, ometria_client, tmp_path, "first", (None, HOUR))
    assert report["status"] == "failed" and report["load_error"].retryable
    assert report["rejected"] == 0 and report["failed"] == 200
    assert not store.held_records(kind="rejected")
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
    assert store.contact("c00000001")["status"] == "left" and store.contact_count() == 289

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
    assert store.contact("c00000001")["status"] == "left"


def test_a_cap_per_run_spreads_the_contacts_over_runs_each_sent_once(
        store, sandbox, antavo_client, ometria_client, tmp_path, mappings):
    settings = mappings / "settings.toml"
    settings.write_text(settings.read_text().replace("max_contacts_per_run = 0 ", "max_contacts_per_run = 100"))
    first = sync(store, antavo_client, ometria_client, tmp_path, "first", (None, HOUR), mappings=mappings)
    assert (first["status"], first["accepted"], first["deferred"], first["failed"]) == ("success", 100, 190, 0)
    assert first["unaccounted"] == 0 and store.owed_count() == 190
    assert "deferred          190   (over sync.max_contacts_per_run" in format_report(first)
    assert len(sandbox.ometria.contacts) == 100

    hours = [(HOUR + timedelta(hours=n), HOUR + timedelta(hours=n + 1)) for n in range(3)]
    second = sync(store, antavo_client, ometria_client, tmp_path, "second", hours[0], mappings=mappings)
    assert (second["status"], second["accepted"], second["deferred"]) == ("success", 100, 90)
    third = sync(store, antavo_client, ometria_client, tmp_path, "third", hours[1], mappings=mappings)
    assert (third["status"], third["accepted"], third["deferred"]) == ("success", 90, 0)
    assert store.owed_count() == 0 and store.contact_count() == 290
    assert len(sandbox.ometria.contacts) == 290
    assert set(sandbox.ometria.received[("contact", i)] for _, i in sandbox.ometria.contacts) == {1}  # each once
    quiet = sync(store, antavo_client, ometria_client, tmp_path, "quiet", hours[2], mappings=mappings)
    assert quiet["accepted"] == quiet["deferred"] == 0
