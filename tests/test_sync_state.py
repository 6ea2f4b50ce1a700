"""Sync state, for real through dag.test(): incremental runs, mapping changes, dry runs, retries, PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pendulum
import pytest

from antavo_ometria.sync.store.state import StateStore

pytestmark = pytest.mark.airflow
FIRST = pendulum.datetime(2026, 3, 1, 12, 30, tz="UTC")


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request, tmp_path):
    """Every test here runs with the state store on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("postgres_state_url")


@pytest.fixture(scope="module")
def dag():
    from pathlib import Path

    from airflow.models import DagBag

    return DagBag(dag_folder=str(Path(__file__).resolve().parents[1] / "dags")).get_dag("antavo_ometria_contacts")


def run(dag, when, **params):

    from antavo_ometria.airflow.staging_location import staging_root
    from antavo_ometria.sync.contacts.staged_files import staging_dir

    dag_run = dag.test(logical_date=when, run_conf={"full_resync": False, "dry_run": False, **params})
    report_file = staging_dir(staging_root(), "antavo_ometria_contacts", dag_run.run_id) / "report.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else None
    return dag_run, report


def test_only_changed_contacts_are_sent(airflow_db, dag, connections):
    sandbox = connections
    first, report = run(dag, FIRST)
    assert report["mode"] == "full" and report["full_resync_reason"].startswith("first run")
    sent_first = report["sent"]
    assert sent_first == len(sandbox.ometria.contacts) > 250

    pushes = sandbox.ometria.pushes
    second, report = run(dag, FIRST + timedelta(hours=1))
    assert report["mode"] == "incremental" and report["sent"] == 0 and sandbox.ometria.pushes == pushes

    # five customers change inside the next interval; one changes only in a field that is not mapped
    third_at = FIRST + timedelta(hours=2)
    window_start = pendulum.instance(third_at).start_of("hour") - timedelta(hours=1)
    changed = ["c00000001", "c00000002", "c00000003", "c00000004", "c00000005"]
    for n, customer_id in enumerate(changed):
        sandbox.antavo.touch(customer_id, {"first_name": f"Renamed{n}"}, at=window_start + timedelta(minutes=5 + n))
    sandbox.antavo.touch("c00000006", {"handler": "nickname only"}, at=window_start + timedelta(minutes=20))
    third, report = run(dag, third_at)
    assert report["mode"] == "incremental"
    assert report["extracted"] == 6 and report["unchanged"] == 1
    assert report["sent"] == report["accepted"] == 5
    assert [sandbox.ometria.contacts[("antavo", c)]["firstname"] for c in changed] == [
        f"Renamed{n}" for n in range(5)]

    history = StateStore(_state_url()).runs.recent("antavo_ometria_contacts")
    assert [(r["mode"], r["sent"], r["status"]) for r in history] == [
        ("incremental", 5, "success"), ("incremental", 0, "success"), ("full", sent_first, "success")]
    assert len(report["history"]) == 3


def test_a_mapping_change_resends_everything_and_says_so(airflow_db, dag, connections, mappings, monkeypatch):
    monkeypatch.setenv("ANTAVO_OMETRIA_MAPPINGS_DIR", str(mappings))
    _, first = run(dag, FIRST)
    _, quiet = run(dag, FIRST + timedelta(hours=1))
    assert quiet["sent"] == 0
    with (mappings / "contacts.csv").open("a") as handle:
        handle.write("handler,nickname,,\n")
    connections.ometria.custom_fields["nickname"] = "string"
    _, changed = run(dag, FIRST + timedelta(hours=2))
    assert changed["mode"] == "full" and "the mapping changed" in changed["full_resync_reason"]
    assert changed["sent"] == first["sent"] and changed["unchanged"] == 0
    assert all(c.get("nickname") for c in connections.ometria.contacts.values())


def test_dry_run_sends_nothing_and_changes_no_state(airflow_db, dag, connections):
    _, report = run(dag, FIRST, dry_run=True)
    assert report["status"] == "dry_run" and report["would_send"] == report["changed"] > 250
    assert connections.ometria.pushes == 0
    assert StateStore(_state_url()).contact_count() == 0
    _, real = run(dag, FIRST + timedelta(hours=1))
    assert real["mode"] == "full" and real["sent"] == report["would_send"]  # the dry run did not count as synced


def test_full_resync_parameter(airflow_db, dag, connections):
    _, first = run(dag, FIRST)
    _, again = run(dag, FIRST + timedelta(hours=1), full_resync=True)
    assert again["mode"] == "full" and again["full_resync_reason"] == "full re-sync requested"
    assert again["sent"] == first["sent"]


def test_rejected_records_stay_owed_and_are_retried_until_ometria_accepts_them(airflow_db, dag, connections):
    sandbox = connections
    sandbox.ometria.reject_ids = {"c00000003", "c00000150", "c00000151"}  # e.g. emails owned by other contacts
    _, report = run(dag, FIRST)
    assert report["rejected"] == 3 and report["accepted"] == report["sent"] - 3
    rejected = {row["id"] for row in report["not_delivered"] if "rejected by Ometria" in row["reasons"][0]}
    assert rejected == sandbox.ometria.reject_ids
    assert {"error_message": "identifier is already owned by another contact",
            "error_path": "root > email"} in report["async_errors"]
    store = StateStore(_state_url())
    held = store.held.find(kind="rejected")
    assert {h["antavo_id"] for h in held} == rejected
    assert all(json.loads(h["payload"])["id"] == h["antavo_id"] for h in held)
    assert store.contacts.known_count() == report["accepted"]  # a rejected contact is not known to Ometria

    _, again = run(dag, FIRST + timedelta(hours=1))  # nothing changed in Antavo: the owed ones are tried again
    assert again["retried"] == 3 and again["retried_accepted"] == 0 and again["rejected"] == 3
    assert len(again["async_errors"]) == 3  # the three new entries, not Ometria's whole list again (6 by now)
    assert len(sandbox.ometria.errors) > 3
    owed = {i: store.contacts.get(i) for i in rejected}
    assert {c["status"] for c in owed.values()} == {"rejected"} and {c["attempts"] for c in owed.values()} == {2}
    assert all(c["retry_at"] > datetime.now(UTC) + timedelta(minutes=50) for c in owed.values())  # then 1 h later

    _, waiting = run(dag, FIRST + timedelta(hours=2))  # not due yet: left alone, still owed
    assert waiting["retried"] == 0 and store.contacts.owed_count() == 3

    sandbox.ometria.reject_ids = set()  # the owner of those emails fixed them; an hour passes
    contacts = store.table("sync_contacts")
    with store.engine.begin() as conn:
        conn.execute(contacts.update().values(retry_at=datetime.now(UTC) - timedelta(seconds=1)))
    _, fixed = run(dag, FIRST + timedelta(hours=3))
    assert fixed["retried"] == 3 and fixed["retried_accepted"] == 3 and fixed["status"] == "success"
    assert store.contacts.owed_count() == 0 and not store.held.find(kind="rejected")
    assert {i for (_, i) in sandbox.ometria.contacts} >= rejected  # what the sandbox stored, per id
    assert all(sandbox.ometria.received[("contact", i)] == 1 for i in rejected)  # accepted exactly once


def _state_url() -> str:
    import os

    return os.environ["ANTAVO_OMETRIA_STATE_URL"]
