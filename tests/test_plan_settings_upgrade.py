"""A run planned by the release before settings travelled on the plan (its plan, kept as XCom, has no settings) and
loaded, retried or cleared after the upgrade works with the configured settings, not the built-in defaults."""

from pathlib import Path

from antavo_ometria.sync.contacts.plan import plan_run
from antavo_ometria.sync.contacts.step_results import Plan
from antavo_ometria.sync.store.state import StateStore
from antavo_ometria.sync.tables.mapping import load_contact_mapping

PROJECT = Path(__file__).resolve().parents[1]


def test_a_plan_made_before_the_upgrade_keeps_the_configured_list(state_url):
    store = StateStore(state_url)
    store.migrate()
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    assert mapping.settings.list_id == "8400"
    planned = plan_run(store, mapping, "antavo_ometria_contacts", "run-before-upgrade").as_dict()
    del planned["settings"]  # as the release before wrote it
    # with list_id "" the load records leavers as left "no list configured" without removing them from list 8400
    assert Plan.of(planned).run_settings.list_id == mapping.settings.list_id


def test_a_retry_after_the_upgrade_of_a_load_planned_before_removes_the_leaver_from_the_list(
        sandbox, antavo_client, ometria_client, tmp_path, state_url):
    from datetime import timedelta

    from test_owed import HOUR, first_sync, hours, sync

    from antavo_ometria.sync.contacts.load import load_staged

    store = StateStore(state_url)
    store.migrate()
    first_sync(store, sandbox, antavo_client, ometria_client, tmp_path)
    sandbox.antavo.touch("c00000001", {"status": "inactive"}, at=HOUR + timedelta(minutes=5))
    sandbox.ometria.reject_ids = {"c00000001"}  # Ometria refuses the removal: the load fails, Airflow retries it
    hourly = sync(store, antavo_client, ometria_client, tmp_path, "hourly", hours(0))
    assert hourly["status"] == "failed"
    sandbox.ometria.reject_ids = set()
    planned = hourly["plan"].as_dict() if hasattr(hourly["plan"], "as_dict") else dict(hourly["plan"])
    del planned["settings"]  # the retry runs the new release on the plan the release before made
    try:
        load_staged(tmp_path / "hourly", ometria_client, planned, store)
    except Exception:  # noqa: BLE001
        pass
    member = store.contacts.get("c00000001")
    lists = sandbox.ometria.contacts[("antavo", "c00000001")]["lists"]
    assert not (member["status"] == "left" and 8400 in lists), (member["status"], lists)
