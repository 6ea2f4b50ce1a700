"""DAG integrity, and the contact sync run for real with dag.test() against the sandbox."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from antavo_ometria_tools.population import defects_of

PROJECT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.airflow


@pytest.fixture(scope="module")
def dagbag():
    from airflow.models import DagBag

    return DagBag(dag_folder=str(PROJECT / "dags"))


def test_every_dag_imports(dagbag):
    assert dagbag.import_errors == {}
    assert "antavo_ometria_contacts" in dagbag.dags


def test_every_dag_is_documented_owned_tagged_and_retried(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md and len(dag.doc_md) > 100, f"{dag_id} has no documentation"
        assert dag.default_args.get("owner") not in (None, "airflow"), f"{dag_id} has no owner"
        assert dag.default_args.get("retries", 0) >= 2, f"{dag_id} retries fewer than twice"
        for task in dag.tasks:
            assert task.doc_md or task.doc or (task.python_callable.__doc__ if hasattr(task, "python_callable") else None), (
                f"{dag_id}.{task.task_id} has no documentation")


def expected_contact(customer: dict) -> dict:
    """The shipped legacy mapping, written out by hand for one valid sandbox customer."""
    expected = {
        "id": customer["_id"], "email": customer["email"], "customer_id": customer["external_ids"]["crm_id"],
        "firstname": customer["first_name"], "lastname": customer["last_name"],
        "date_of_birth": customer["birth_date"], "country_id": customer["country"],
        "phone_number": customer["mobile_phone"].replace(" ", ""),
        "timestamp_acquired": customer["created_at"], "loyalty_points": customer["score"],
        "loyalty_points_spent": customer["spent"], "last_purchase": customer["purchase_last_date"],
        "purchase_count": customer["purchase_count"], "city": customer["properties"]["city"],
        "favourite_store": customer["properties"]["favourite_store"],
        "newsletter": customer["properties"]["newsletter"], "lists": [8400],
    }
    if customer.get("gender"):
        expected["gender"] = customer["gender"][0]
    return expected


def run_contacts_dag(dagbag):
    from airflow.utils.state import DagRunState

    from antavo_ometria.airflow.staging_location import staging_root
    from antavo_ometria.sync.contacts.staged_files import staging_dir

    run = dagbag.get_dag("antavo_ometria_contacts").test()
    assert run.state == DagRunState.SUCCESS
    assert xcom_keys(run) == {"return_value"}  # one XCom per step, not one per key of the dict it returns
    return json.loads((staging_dir(staging_root(), "antavo_ometria_contacts", run.run_id) / "report.json").read_text())


def xcom_keys(run) -> set[str]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        return {row.key for row in session.scalars(XComModel.get_many(run_id=run.run_id, dag_ids=run.dag_id))}


def test_contact_sync_end_to_end(airflow_db, dagbag, connections):
    sandbox = connections
    report = run_contacts_dag(dagbag)

    population = sandbox.antavo.customers
    valid = [c for i, c in enumerate(population) if not defects_of(i)]
    held = {c["_id"] for i, c in enumerate(population) if defects_of(i)}
    stored = {cid: record for (collection, cid), record in sandbox.ometria.contacts.items()}
    assert set(stored) == {c["_id"] for c in valid}
    for customer in valid:
        assert stored[customer["_id"]] == expected_contact(customer), customer["_id"]

    assert report["extracted"] == len(population) == 300
    assert report["sent"] == report["accepted"] == len(valid)
    assert report["rejected"] == report["failed"] == report["unaccounted"] == 0
    assert {row["id"] for row in report["not_delivered"]} == held
    assert all(row["reasons"] for row in report["not_delivered"])


def expected_v2_contact(customer: dict) -> dict:
    """The shipped v2 example mapping, written out by hand for one valid sandbox customer."""
    tier = customer["tiers"]["basic_structure"]
    expected = {
        "id": customer["_id"], "email": customer["email"], "customer_id": customer["external_ids"]["crm_id"],
        "firstname": customer["first_name"], "lastname": customer["last_name"],
        "date_of_birth": customer["birth_date"], "country_id": customer["country"],
        "phone_number": customer["mobile_phone"].replace(" ", ""), "timestamp_acquired": customer["created_at"],
        "lists": [8400],
        "properties": {
            "language": customer["language"], "loyalty_points": customer["score"],
            "loyalty_points_spent": customer["spent"], "loyalty_tier_id": tier["_id"],
            "loyalty_tier": tier["name"]["en"], "tier_since": tier["since"],
            "expiring_points": customer["extensions"]["expiring_points"]["total"],
            "prestige_earned": customer["accounts"]["prestige_balance"]["earned"],
            "city": customer["properties"]["city"], "newsletter": customer["properties"]["newsletter"],
        },
    }
    if tier["next"]:
        expected["properties"] |= {"next_tier": tier["next"]["name"], "points_to_next_tier": tier["next"]["points"]}
    if customer["labels"]:
        expected["properties"]["labels"] = customer["labels"]
    if customer.get("gender"):
        expected["gender"] = customer["gender"][0]
    return expected


def test_contact_sync_in_v2_mode(airflow_db, dagbag, connections, monkeypatch):
    monkeypatch.setenv("ANTAVO_OMETRIA_MAPPINGS_DIR", str(PROJECT / "include" / "mappings" / "examples" / "v2"))
    sandbox = connections
    report = run_contacts_dag(dagbag)
    valid = [c for i, c in enumerate(sandbox.antavo.customers) if not defects_of(i)]
    stored = {cid: record for (_, cid), record in sandbox.ometria.contacts.items()}
    assert report["payload_mode"] == "v2"
    assert report["accepted"] == len(stored) == len(valid)
    for customer in valid:
        assert stored[customer["_id"]] == expected_v2_contact(customer), customer["_id"]


def test_broken_mapping_stops_the_run_before_any_request(airflow_db, dagbag, connections, mappings, monkeypatch):
    from airflow.utils.state import DagRunState

    (mappings / "contacts.csv").write_text("loyalty_field,remote_field\nfirst_nmae,firstname\nemail,lastnme\n")
    monkeypatch.setenv("ANTAVO_OMETRIA_MAPPINGS_DIR", str(mappings))
    run = dagbag.get_dag("antavo_ometria_contacts").test()
    assert run.state == DagRunState.FAILED
    failed = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert failed["check_connections"] == "failed" and failed["plan"] == "upstream_failed"
    assert connections.antavo.requests == 0 and connections.ometria.pushes == 0


class Inbox:
    """A webhook receiver on loopback that keeps what it is sent."""

    def __init__(self):
        from antavo_ometria_tools.sandbox.server import App, Response, RunningServer

        received = self.received = []

        class Receiver(App):
            def handle(self, request):
                received.append(request.json())
                return Response(200, {"ok": True})

        self.server = RunningServer(Receiver()).start()

    def close(self):
        self.server.stop()


def test_failure_notification_reaches_the_webhook(airflow_db, dagbag, connections, mappings, monkeypatch):
    from airflow.utils.state import DagRunState

    inbox = Inbox()
    try:
        monkeypatch.setenv("AIRFLOW_VAR_ANTAVO_OMETRIA_ALERT_WEBHOOK", inbox.server.url + "/hook")
        (mappings / "contacts.csv").write_text("loyalty_field,remote_field\nemail,email\nfirst_nmae,firstname\n")
        monkeypatch.setenv("ANTAVO_OMETRIA_MAPPINGS_DIR", str(mappings))
        run = dagbag.get_dag("antavo_ometria_contacts").test()
    finally:
        inbox.close()
    assert run.state == DagRunState.FAILED
    tasks = [m["task_id"] for m in inbox.received]
    assert "check_connections" in tasks  # the first task reads the mapping, for the list to check
    alert = next(m for m in inbox.received if m["task_id"] == "check_connections")
    assert alert["dag_id"] == "antavo_ometria_contacts" and "first_nmae" in alert["error"]
    assert "sandbox-secret" not in str(inbox.received)


def test_redaction_of_secret_looking_text():
    from antavo_ometria.airflow.alerts import redact

    assert redact("login failed: password=hunter2 api_key: abc123 ok") == \
        "login failed: password=[redacted] api_key: [redacted] ok"


def test_unreachable_state_store_fails_the_run_before_anything_is_sent(airflow_db, dagbag, connections, monkeypatch):
    from airflow.utils.state import DagRunState

    monkeypatch.setenv("ANTAVO_OMETRIA_STATE_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    run = dagbag.get_dag("antavo_ometria_contacts").test()
    assert run.state == DagRunState.FAILED
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert (states["check_connections"], states["plan"]) == ("failed", "upstream_failed")  # the first task's check
    assert connections.antavo.requests == 0 and connections.ometria.pushes == 0  # not one request


def test_secrets_never_reach_logs_xcom_reports_or_errors(airflow_db, dagbag, sandbox, monkeypatch, tmp_path,
                                                        capfd, caplog):
    import logging

    from airflow.models.renderedtifields import RenderedTaskInstanceFields

    from antavo_ometria.airflow.staging_location import staging_root
    from antavo_ometria.sync.contacts.staged_files import staging_dir
    from antavo_ometria_tools.sandbox import ANTAVO_KEY

    antavo_secret, ometria_key, wrong_key = "S3CRET-antavo-7f3a9", "S3CRET-ometria-c41d2", "S3CRET-wrong-0b77e"
    sandbox.antavo.keys = {ANTAVO_KEY: antavo_secret}
    sandbox.ometria.api_key = ometria_key
    monkeypatch.setenv("ANTAVO_OMETRIA_STATE_URL", f"sqlite:///{tmp_path / 'state.db'}")
    caplog.set_level(logging.DEBUG)
    seen = []
    for key in (ometria_key, wrong_key):  # a good run, then one that fails on Ometria's 403
        connections = {
            "AIRFLOW_CONN_ANTAVO_DEFAULT": json.dumps({
                "conn_type": "http", "host": sandbox.antavo_url, "login": ANTAVO_KEY, "password": antavo_secret,
                "extra": {"environment": "sandbox", "read_api_url": sandbox.antavo_url}}),
            "AIRFLOW_CONN_OMETRIA_DEFAULT": json.dumps({"conn_type": "http", "host": sandbox.ometria_url,
                                                       "password": key}),
        }
        for name, value in connections.items():
            monkeypatch.setenv(name, value)
        run = dagbag.get_dag("antavo_ometria_contacts").test(run_conf={"full_resync": True, "dry_run": False})
        for ti in run.get_task_instances():
            seen.append(json.dumps(ti.xcom_pull(task_ids=ti.task_id), default=str))
            seen.append(json.dumps(RenderedTaskInstanceFields.get_templated_fields(ti), default=str))
        staging = staging_dir(staging_root(), "antavo_ometria_contacts", run.run_id)
        seen += [p.read_text(errors="replace") for p in staging.glob("*.json*")]
    assert sandbox.ometria.pushes > 0  # the first run did deliver
    assert run.state == "failed"  # the second did not, and said why
    out, err = capfd.readouterr()
    seen += [out, err, caplog.text]
    seen += [p.read_text(errors="replace") for p in Path(os.environ["AIRFLOW_HOME"]).rglob("*.log")]
    everything = "\n".join(seen)
    assert "HTTP 403" in everything
    for secret in (antavo_secret, ometria_key, wrong_key):
        assert secret not in everything, f"{secret} leaked"
