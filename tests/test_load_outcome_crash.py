"""The report's account of a load that died: it must not claim delivered what the journal and the state store
already say is owed."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from test_owed import DAG, HOUR, PROJECT, first_sync, hours

from antavo_ometria.sync.contacts import load
from antavo_ometria.sync.contacts.extract import extract
from antavo_ometria.sync.contacts.plan import plan_run
from antavo_ometria.sync.contacts.prepare import transform_staged
from antavo_ometria.sync.contacts.report import RunNotDelivered, report_run
from antavo_ometria.sync.store.state import StateStore
from antavo_ometria.sync.tables.mapping import load_contact_mapping


class WorkerKilled(BaseException):
    """The task's process ended here (an out-of-memory kill, a lost node)."""


@pytest.fixture
def store(state_url):
    store = StateStore(state_url)
    store.migrate()
    return store


def test_a_load_killed_while_taking_back_late_errors_is_not_reported_delivered(
        store, sandbox, antavo_client, ometria_client, tmp_path, monkeypatch):
    first_sync(store, sandbox, antavo_client, ometria_client, tmp_path)
    sandbox.ometria.validate_later = True  # accepted in the answer, listed invalid at /v2/push/_errors later
    changed = [f"c{n:08d}" for n in range(40, 60)]
    for customer_id in changed:
        sandbox.antavo.touch(customer_id, {"first_name": "Later"}, at=HOUR + timedelta(minutes=30))
    sandbox.ometria.custom_fields.pop("loyalty_points")
    kept = []
    original = load.keep_outcome

    def killed_after_the_take_back_is_journalled(staging, plan, outcome):
        kept.append(outcome)
        if outcome is not None and outcome.failed_ids:  # the account after the take-back, never written
            raise WorkerKilled
        original(staging, plan, outcome)

    monkeypatch.setattr(load, "keep_outcome", killed_after_the_take_back_is_journalled)
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    staging = tmp_path / "listed"
    steps = {"plan": plan_run(store, mapping, DAG, "listed", hours(0))}
    steps["extract"] = extract(antavo_client, staging, steps["plan"], paths=mapping.loyalty_fields)
    steps["transform"] = transform_staged(staging, mapping, steps["plan"], store)
    with pytest.raises(WorkerKilled):
        load.load_staged(staging, ometria_client, steps["plan"], store)
    assert store.contacts.owed_count() == 20 and store.contacts.accepted_hashes(changed) == {}  # the store knows
    with pytest.raises(RunNotDelivered):
        report_run(staging, steps, store, DAG, "listed")  # the load step failed: no result of it
    report = json.loads((staging / "report.json").read_text())
    assert report["status"] == "failed"
    assert (report["accepted"], report["failed"]) == (0, 20), (report["accepted"], report["failed"])
