"""Green means delivered: every contact a run is responsible for is delivered or held back with a reason,
re-running is real, and nothing is counted twice. Each test names the failure it guards against."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from antavo_ometria.antavo.records import normalise_customer, normalise_event
from antavo_ometria.sync.contacts.extract import extract
from antavo_ometria.sync.contacts.load import LoadFailed, load_staged
from antavo_ometria.sync.contacts.plan import plan_run
from antavo_ometria.sync.contacts.prepare import transform_staged
from antavo_ometria.sync.contacts.report import RunNotDelivered, check_delivered, report_run
from antavo_ometria.sync.contacts.staged_files import REPORT, prune_staging, read_ndjson, staging_dir, write_customers
from antavo_ometria.sync.store.state import StateStore
from antavo_ometria.sync.tables.mapping import load_contact_mapping
from antavo_ometria.transport import ApiError

PROJECT = Path(__file__).resolve().parents[1]
DAG = "antavo_ometria_contacts"


@pytest.fixture
def store(state_url):
    store = StateStore(state_url)
    store.migrate()
    return store


def sync(store, antavo_client, ometria_client, staging, run_id="run-1", mappings=PROJECT / "include" / "mappings",
         interval=(None, None)) -> dict:
    """One run as the DAG runs it; the report, or the RunNotDelivered it ends with."""
    mapping = load_contact_mapping(mappings)
    steps = {"plan": plan_run(store, mapping, DAG, run_id, interval)}
    steps["extract"] = extract(antavo_client, staging, steps["plan"], paths=mapping.loyalty_fields)
    steps["transform"] = transform_staged(staging, mapping, steps["plan"], store)
    try:
        steps["load"] = load_staged(staging, ometria_client, steps["plan"], store)
    except LoadFailed:
        pass
    return report_run(staging, steps, store, DAG, run_id)


def test_a_cleared_run_re_planned_after_a_mapping_fix_really_sends(store, sandbox, antavo_client, ometria_client,
                                                                   mappings, tmp_path):
    staging = tmp_path / "staging"
    first = sync(store, antavo_client, ometria_client, staging)
    pushes = sandbox.ometria.pushes
    table = mappings / "contacts.csv"
    table.write_text(table.read_text().replace("properties.city,city", "properties.favourite_store,city"))
    again = sync(store, antavo_client, ometria_client, staging, mappings=mappings)  # Clear: same run id, same folder
    assert again["sent"] == first["sent"] == 290
    assert sandbox.ometria.pushes - pushes == 3  # really pushed, not "sent" from the earlier attempt's journal
    stored = sandbox.ometria.contacts[("antavo", "c00000001")]
    assert stored["city"] == sandbox.antavo.by_id["c00000001"]["properties"]["favourite_store"]


def test_a_retry_of_the_same_attempt_sends_only_what_is_left(store, sandbox, antavo_client, ometria_client, tmp_path):
    staging = tmp_path / "staging"
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    plan = plan_run(store, mapping, DAG, "run-1")
    extract(antavo_client, staging, plan)
    transform_staged(staging, mapping, plan, store)
    sandbox.ometria.faults.add({"status": 503, "after": 2, "count": 4, "path": "/v2/push"})  # the 3rd batch, for good
    with pytest.raises(LoadFailed):
        load_staged(staging, ometria_client, plan, store)
    loaded = load_staged(staging, ometria_client, plan, store)  # Airflow's retry
    assert (loaded.sent, loaded.failed) == (290, 0)
    assert set(sandbox.ometria.received.values()) == {1}


def test_counts_add_up_after_isolation_and_a_5xx_then_a_retry(store, sandbox, antavo_client, ometria_client,
                                                               tmp_path):
    """One rejected record, a 5xx while its batch is halved, then a successful retry: the counts add up, and
    nothing delivered is held as "failed"."""
    staging = tmp_path / "staging"
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    plan = plan_run(store, mapping, DAG, "run-1")
    extracted = extract(antavo_client, staging, plan)
    transformed = transform_staged(staging, mapping, plan, store)
    sandbox.ometria.reject_ids.add("c00000005")
    # push 1: the batch (1 rejected) → halves: push 2 (holds c00000005) fails on every attempt
    sandbox.ometria.faults.add({"status": 503, "after": 1, "count": 4, "path": "/v2/push"})
    with pytest.raises(LoadFailed):
        load_staged(staging, ometria_client, plan, store)
    loaded = load_staged(staging, ometria_client, plan, store)
    report = report_run(staging, {"plan": plan, "extract": extracted, "transform": transformed, "load": loaded}, store,
                        DAG, plan.run_id)
    assert (report["sent"], report["accepted"], report["rejected"], report["failed"], report["unaccounted"]) == (
        290, 289, 1, 0, 0)
    assert [r["antavo_id"] for r in store.held.find(kind="failed")] == []
    assert [r["antavo_id"] for r in store.held.find(kind="rejected")] == ["c00000005"]
    assert len(sandbox.ometria.contacts) == 289 and ("antavo", "c00000005") not in sandbox.ometria.contacts


def test_a_run_with_undelivered_contacts_fails_and_the_next_run_sends_them(store, sandbox, antavo_client,
                                                                           ometria_client, tmp_path):
    sync(store, antavo_client, ometria_client, tmp_path / "s1")
    for n in range(5):
        sandbox.antavo.touch(f"c0000002{n}", {"first_name": f"New{n}"})
    sandbox.ometria.faults.add({"status": 503, "count": 10**6, "path": "/v2/push"})
    with pytest.raises(RunNotDelivered, match="5 contact\\(s\\) were not delivered .*HTTP 503"):
        sync(store, antavo_client, ometria_client, tmp_path / "s2", run_id="run-2")
    assert store.runs.recent(DAG)[0]["status"] == "failed"
    held = store.held.find(run_id="run-2", kind="failed")
    assert len(held) == 5 and "the next run sends it" in held[0]["reasons"][0]
    sandbox.ometria.faults.clear()
    report = sync(store, antavo_client, ometria_client, tmp_path / "s3", run_id="run-3")
    assert report["sent"] == 5 and report["status"] == "success"
    assert store.held.find(kind="failed") == []  # delivered now: no longer shown as held
    assert [sandbox.ometria.contacts[("antavo", f"c0000002{n}")]["firstname"] for n in range(5)] == [
        f"New{n}" for n in range(5)]


def test_a_load_stopped_for_good_mid_way_is_reported_as_not_delivered(store, antavo_client, ometria_client, tmp_path):
    staging = tmp_path / "staging"
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    plan = plan_run(store, mapping, DAG, "run-1")
    steps = {"plan": plan, "extract": extract(antavo_client, staging, plan),
             "transform": transform_staged(staging, mapping, plan, store), "load": None}  # the worker died
    with pytest.raises(RunNotDelivered, match="290 contact\\(s\\) were not delivered"):
        report_run(staging, steps, store, DAG, "run-1")
    report = json.loads((staging / "report.json").read_text())
    assert (report["status"], report["failed"], report["unaccounted"]) == ("failed", 290, 0)


def test_a_report_that_does_not_add_up_fails_the_run():
    with pytest.raises(RunNotDelivered, match="do not add up: 3 customer"):
        check_delivered({"unaccounted": 3, "failed": 0, "staging": "/x"})
    with pytest.raises(RunNotDelivered, match="-2 customer"):
        check_delivered({"unaccounted": -2, "failed": 0, "staging": "/x"})
    check_delivered({"unaccounted": 0, "failed": 0, "staging": "/x"})


def test_the_state_store_is_repaired_from_the_journal_on_retry(store, sandbox, antavo_client, ometria_client,
                                                               tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    plan = plan_run(store, mapping, DAG, "run-1")
    extract(antavo_client, staging, plan)
    transform_staged(staging, mapping, plan, store)
    record = store.contacts.record_accepted
    calls = []

    def gone_after_two_batches(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise ConnectionError("state store went away")
        return record(*args, **kwargs)

    monkeypatch.setattr(store.contacts, "record_accepted", gone_after_two_batches)
    with pytest.raises(ConnectionError):
        load_staged(staging, ometria_client, plan, store)
    monkeypatch.undo()
    assert store.contacts.known_count() == 200 and len(sandbox.ometria.contacts) == 290  # batch 3 pushed, not recorded
    loaded = load_staged(staging, ometria_client, plan, store)
    assert store.contacts.known_count() == 290 and loaded.sent == 290
    assert set(sandbox.ometria.received.values()) == {1}


def test_a_failed_hour_is_synced_by_the_next_run(store, sandbox, antavo_client, ometria_client, tmp_path):
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=4)
    sync(store, antavo_client, ometria_client, tmp_path / "h1", "h1", interval=(hour, hour + timedelta(hours=1)))
    sandbox.antavo.touch("c00000001", {"first_name": "Changed In Hour 2"}, at=hour + timedelta(minutes=90))
    sandbox.antavo.faults.add({"status": 503, "count": 10**6, "path": "/"})
    with pytest.raises(ApiError, match="HTTP 503"):
        sync(store, antavo_client, ometria_client, tmp_path / "h2", "h2",
             interval=(hour + timedelta(hours=1), hour + timedelta(hours=2)))
    sandbox.antavo.faults.clear()
    report = sync(store, antavo_client, ometria_client, tmp_path / "h3", "h3",
                  interval=(hour + timedelta(hours=2), hour + timedelta(hours=3)))
    assert report["resumed"].startswith(f"resuming from {(hour + timedelta(hours=1)).isoformat()}")
    assert report["window"][0] == (hour + timedelta(minutes=50)).isoformat()  # with the 10-minute overlap
    assert report["sent"] == 1
    assert sandbox.ometria.contacts[("antavo", "c00000001")]["firstname"] == "Changed In Hour 2"


def test_a_backfill_keeps_its_own_window_and_never_jumps_a_gap(store):
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    hour = datetime(2026, 3, 1, 12, tzinfo=UTC)
    plan_run(store, mapping, DAG, "r1", (hour, hour + timedelta(hours=1)))
    store.runs.finish(DAG, "r1", "success")
    backfill = plan_run(store, mapping, DAG, "b1", (hour - timedelta(days=2), hour - timedelta(days=2, hours=-1)),
                        run_type="backfill")
    assert backfill.resumed is None and backfill.since == "2026-02-27T11:50:00+00:00"
    store.runs.finish(DAG, "b1", "success")
    plan_run(store, mapping, DAG, "r2", (hour + timedelta(hours=1), hour + timedelta(hours=2)))
    store.runs.finish(DAG, "r2", "failed")  # 13:00-14:00 failed
    plan_run(store, mapping, DAG, "b2", (hour + timedelta(hours=2), hour + timedelta(hours=3)), run_type="backfill")
    store.runs.finish(DAG, "b2", "success")  # a backfill of 14:00-15:00 succeeds
    assert store.runs.synced_until(DAG) == hour + timedelta(hours=1)  # still before the failed hour
    nxt = plan_run(store, mapping, DAG, "r3", (hour + timedelta(hours=3), hour + timedelta(hours=4)))
    assert nxt.since == "2026-03-01T12:50:00+00:00" and nxt.resumed


def test_a_full_re_sync_that_failed_is_done_again(store):
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    plan_run(store, mapping, DAG, "r1")
    store.runs.finish(DAG, "r1", "success")
    plan_run(store, mapping, DAG, "r2", full_resync=True)
    store.runs.finish(DAG, "r2", "failed")
    again = plan_run(store, mapping, DAG, "r3")
    assert again.mode == "full" and "full re-sync of run r2 did not complete" in again.full_resync_reason
    store.runs.finish(DAG, "r3", "success")
    assert plan_run(store, mapping, DAG, "r4").mode == "incremental"


def test_clearing_transform_without_plan_keeps_the_counts_right(store, sandbox, antavo_client, ometria_client,
                                                                tmp_path):
    sync(store, antavo_client, ometria_client, tmp_path / "s1")
    for n in range(5):
        sandbox.antavo.touch(f"c0000003{n}", {"first_name": f"Clear{n}"})
    staging = tmp_path / "s2"
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    plan = plan_run(store, mapping, DAG, "run-2")
    extracted = extract(antavo_client, staging, plan)
    assert transform_staged(staging, mapping, plan, store).changed == 5
    load_staged(staging, ometria_client, plan, store)
    transformed = transform_staged(staging, mapping, plan, store)  # Clear of transform and load, same attempt
    loaded = load_staged(staging, ometria_client, plan, store)
    report = report_run(staging, {"plan": plan, "extract": extracted, "transform": transformed, "load": loaded}, store,
                        DAG, plan.run_id)
    assert (report["unchanged"], report["sent"], report["unaccounted"], report["status"]) == (5, 0, 0, "success")


def test_a_cleared_run_that_fails_early_leaves_no_earlier_report(store, sandbox, antavo_client, ometria_client,
                                                                 tmp_path):
    staging = tmp_path / "staging"
    sync(store, antavo_client, ometria_client, staging)
    assert (staging / "report.json").exists()
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    plan = plan_run(store, mapping, DAG, "run-1")
    extract(antavo_client, staging, plan)
    assert not (staging / "report.json").exists() and not (staging / "contacts.parquet").exists()


# -- poison records ------------------------------------------------------------------------------
def test_a_null_or_a_bare_string_tier_structure_does_not_stop_the_load():
    held = normalise_customer(None)
    assert held["id"] is None and held["_held"] == ["Antavo returned null where a customer belongs"]
    customer = normalise_customer({"id": 7, "tiers": [{"id": "t1", "name": "Gold", "structure": "basic_structure"}]})
    assert customer["tiers"] == {"basic_structure": {"name": "Gold", "_id": "t1"}} and "_held" not in customer


def test_an_event_without_customer_or_time_is_held_with_the_reason():
    assert normalise_event({"id": "e1", "action": "reward", "timestamp": "2026-03-01T12:00:00Z"})["_held"] == [
        "the event names no customer"]
    assert normalise_event({"id": "e2", "action": "reward", "Customer": {"id": "c1"}, "timestamp": "soon"})[
        "_held"] == ["the event's timestamp 'soon' is not a date-time"]
    assert "_held" in normalise_event(None)


def test_bytes_that_are_not_utf8_hold_the_customer_and_are_never_sent_garbled(store, sandbox, antavo_client,
                                                                              ometria_client, tmp_path):
    sync(store, antavo_client, ometria_client, tmp_path / "s1")
    good_name = sandbox.ometria.contacts[("antavo", "c00000001")]["firstname"]
    sandbox.antavo.touch("c00000001", {"first_name": "Ren-MARK-ee"})
    sandbox.antavo.faults.add({"path": "/customers/c00000001", "count": 10**6,
                               "mangle": [["Ren-MARK-ee", "Ren\xe9e"]]})  # Latin-1 é: not UTF-8
    report = sync(store, antavo_client, ometria_client, tmp_path / "s2", "run-2")
    assert report["quarantined"] == 1 and report["sent"] == 0
    assert report["not_delivered"] == [{"id": "c00000001",
                                        "reasons": ["first_name: Antavo sent text that is not valid UTF-8"]}]
    assert sandbox.ometria.contacts[("antavo", "c00000001")]["firstname"] == good_name  # not overwritten


def test_a_lone_surrogate_in_antavo_json_holds_the_customer(store, sandbox, antavo_client, ometria_client, tmp_path):
    sandbox.antavo.touch("c00000001", {"first_name": "Half-EMOJI"})
    sandbox.antavo.faults.add({"path": "/v1/customers", "count": 10**6,
                               "mangle": [["Half-EMOJI", "Half \\ud83d"]]})  # an escape JSON allows, no character
    report = sync(store, antavo_client, ometria_client, tmp_path / "s1")
    assert report["sent"] == 290 - 1 and report["status"] == "success"
    assert {"id": "c00000001", "reasons": ["first_name: Antavo sent text that is not valid UTF-8"]} in report[
        "not_delivered"]


def test_a_repeated_customer_keeps_the_copy_updated_last(tmp_path):
    older = {"id": "c1", "first_name": "Old", "updated_at": "2026-03-01T10:00:00+00:00"}
    newer = {"id": "c1", "first_name": "New", "updated_at": "2026-03-01T11:00:00+00:00"}
    other = {"id": "c2", "first_name": "Other", "updated_at": "2026-03-01T09:00:00+00:00"}
    for pages, kept in (([[older, other], [newer]], "New"), ([[newer, other], [older]], "New")):
        count, duplicates = write_customers(tmp_path, pages)
        rows = read_ndjson(tmp_path / "customers.ndjson")
        assert (count, duplicates, len(rows)) == (2, ["c1"], 2)
        assert [r["first_name"] for r in rows if r["id"] == "c1"] == [kept]


# -- staging -------------------------------------------------------------------------------------
def test_run_ids_that_differ_only_in_punctuation_get_their_own_folders(tmp_path):
    assert staging_dir(tmp_path, DAG, "manual__2026-03-01T12:00") != staging_dir(tmp_path, DAG, "manual__2026-03-01T12_00")
    assert staging_dir(tmp_path, DAG, "r1") == staging_dir(tmp_path, DAG, "r1")


def test_staging_older_than_the_retention_is_removed(monkeypatch, tmp_path):
    monkeypatch.setenv("ANTAVO_OMETRIA_STAGING_RETENTION_DAYS", "7")
    old, recent, current = (staging_dir(tmp_path, DAG, r) for r in ("old", "recent", "current"))
    for folder in (old, recent, current):
        folder.mkdir(parents=True)
        (folder / REPORT).write_text("{}\n")
    eight_days_ago = time.time() - 8 * 86400
    for path in (old / REPORT, old, current / REPORT, current):
        os.utime(path, (eight_days_ago, eight_days_ago))
    assert prune_staging(tmp_path, DAG, keep=current) == [old]
    assert not old.exists() and recent.exists() and current.exists()


def test_a_run_stopped_before_its_plan_is_recorded_as_failed(store, tmp_path):
    steps = {"check_connections": None, "plan": None, "extract": None, "transform": None, "load": None}
    with pytest.raises(RunNotDelivered, match="stopped at check_connections"):
        report_run(tmp_path, steps, store, DAG, "run-1")
    (run,) = store.runs.recent(DAG)
    assert (run["run_id"], run["status"], run["mode"]) == ("run-1", "failed", "not planned")
