"""The sync on real Airflow deployments: the embedded default (SQLite, LocalExecutor) and the
distributed one (CeleryExecutor, PostgreSQL, Redis), each with a scheduler, a triggerer, a
dag-processor and an api-server in their own processes."""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import reachable
from stack import POLL, AirflowStack, free_port

from antavo_ometria_tools.population import defects_of
from antavo_ometria_tools.sandbox import Sandbox

pytestmark = [pytest.mark.airflow, pytest.mark.services]
REDIS = ("127.0.0.1", 6379)


def stack_env(sandbox, tmp) -> dict[str, str]:
    return {**sandbox.connections(), "ANTAVO_OMETRIA_STAGING_DIR": str(tmp / "staging"),
            "ANTAVO_OMETRIA_EVENT_POKE_SECONDS": "1", "ANTAVO_OMETRIA_EVENT_WAIT_SECONDS": "300",
            "ANTAVO_OMETRIA_RETRY_DELAY_SECONDS": "2"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(running Airflow, its own sandbox): the embedded default here, the distributed one in
    test_deployment_celery.py (a file of its own, so that the two run side by side)."""
    yield from deployment("local", tmp_path_factory)


def deployment(topology: str, tmp_path_factory):
    if topology == "celery":
        for name, address in (("PostgreSQL", ("127.0.0.1", 5432)), ("Redis", REDIS)):
            if not reachable(*address):
                pytest.skip(f"{name} is not reachable on {address[0]}:{address[1]}; the CeleryExecutor topology "
                            "needs it")
    tmp = tmp_path_factory.mktemp(f"airflow-{topology}")
    with Sandbox(customers=300) as sandbox:
        env = stack_env(sandbox, tmp)
        if topology == "local":
            running = AirflowStack.local(tmp, {**env, "ANTAVO_OMETRIA_STATE_URL": f"sqlite:///{tmp / 'state.db'}"})
            yield from _serve(running, sandbox)
            return
        import sqlalchemy as sa

        database = f"airflow_it_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{database}"'))
        url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}"
        with s3_bucket() as staging:  # the workers share no disk: runs stage in a bucket
            running = AirflowStack.celery(tmp, {**env, **staging, "ANTAVO_OMETRIA_STATE_URL": url.replace("psycopg2", "psycopg")},
                                          url, f"redis://127.0.0.1:6379/{int(uuid.uuid4()) % 8 + 8}")
            yield from _serve(running, sandbox)
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


@contextmanager
def s3_bucket():
    """An S3-compatible server on loopback (moto) with a bucket; yields the environment that stages runs in it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k",
                 aws_secret_access_key="s").create_bucket(Bucket="deployment-staging")
    try:
        yield {"ANTAVO_OMETRIA_STAGING_DIR": "s3://aws_staging@deployment-staging/runs",
               "AIRFLOW_CONN_AWS_STAGING": json.dumps({"conn_type": "aws", "login": "k", "password": "s",
                                                       "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"}})}
    finally:
        server.stop()


def staged_objects(airflow: AirflowStack) -> list[str]:
    """The keys staged in the deployment's bucket (none when it stages on disk)."""
    import boto3

    if not airflow.env["ANTAVO_OMETRIA_STAGING_DIR"].startswith("s3://"):
        return []
    endpoint = json.loads(airflow.env["AIRFLOW_CONN_AWS_STAGING"])["extra"]["endpoint_url"]
    listed = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k",
                          aws_secret_access_key="s").list_objects_v2(Bucket="deployment-staging", Prefix="runs/")
    return [o["Key"] for o in listed.get("Contents", [])]


def _serve(running: AirflowStack, sandbox: Sandbox):
    try:
        yield running.start(), sandbox
    finally:
        running.stop()


def test_contact_sync_runs_on_the_deployment(stack):
    airflow, sandbox = stack
    run_id = airflow.trigger("antavo_ometria_contacts", "2026-03-01T12:30:00Z")
    assert airflow.wait_for_state("antavo_ometria_contacts", run_id) == "success", airflow.task_states(
        "antavo_ometria_contacts", run_id)
    valid = {c["_id"] for i, c in enumerate(sandbox.antavo.customers) if not defects_of(i)}
    assert {cid for _, cid in sandbox.ometria.contacts} == valid
    if airflow.env["ANTAVO_OMETRIA_STAGING_DIR"].startswith("s3://"):  # the CeleryExecutor variant
        assert {k.rsplit("/", 1)[-1] for k in staged_objects(airflow)} >= {"customers.ndjson", "contacts.parquet",
                                                                            "report.json"}
        assert not (airflow.home / "staging").exists()


def test_backfill_resends_the_customers_updated_in_its_intervals(stack):
    airflow, sandbox = stack
    start, end = datetime(2026, 1, 10, 0, tzinfo=UTC), datetime(2026, 1, 10, 2, tzinfo=UTC)
    for minutes, customer_id in ((30, "c00000030"), (75, "c00000031"), (105, "c00000032")):
        sandbox.antavo.touch(customer_id, {}, at=start + timedelta(minutes=minutes))  # updated, payload unchanged
    before = dict(sandbox.ometria.received)
    backfill = airflow.api("POST", "/backfills", json={
        "dag_id": "antavo_ometria_contacts", "from_date": start.isoformat(), "to_date": end.isoformat(),
        "max_active_runs": 1, "reprocess_behavior": "none"})
    deadline = time.monotonic() + 180
    while True:
        runs = [r for r in airflow.api("GET", "/dags/antavo_ometria_contacts/dagRuns")["dag_runs"]
                if r["run_type"] == "backfill"]
        if runs and all(r["state"] == "success" for r in runs) and len(runs) >= 2:
            break
        assert time.monotonic() < deadline, (backfill, runs)
        failed = [r["dag_run_id"] for r in runs if r["state"] == "failed"]
        assert not failed, {run: airflow.failure_logs("antavo_ometria_contacts", run) for run in failed}
        time.sleep(POLL)
    covered = (min(datetime.fromisoformat(r["data_interval_start"]) for r in runs) - timedelta(minutes=10),
               max(datetime.fromisoformat(r["data_interval_end"]) for r in runs))
    expected = {c["_id"] for i, c in enumerate(sandbox.antavo.customers) if not defects_of(i)
                and covered[0] < datetime.fromisoformat(c["updated_at"]) < covered[1]}
    assert {"c00000030", "c00000031", "c00000032"} <= expected
    resent = {key[1] for key, count in sandbox.ometria.received.items() if count > before.get(key, 0)}
    assert resent == expected  # re-sent although unchanged: a backfill re-syncs its intervals


def test_load_killed_with_sigkill_is_retried_by_airflow_without_loss_or_repeats(stack):
    import signal

    import psutil

    airflow, sandbox = stack
    port = int(sandbox.ometria_url.rsplit(":", 1)[1])
    before = dict(sandbox.ometria.received)
    # the second push hangs and is never processed: the load task is killed while it waits
    sandbox.ometria.faults.add({"path": "/v2/push", "every": 2, "count": 1, "delay": 60, "drop": True})
    run_id = airflow.trigger("antavo_ometria_contacts", "2026-03-02T12:30:00Z", {"full_resync": True})
    deadline = time.monotonic() + 120
    while sandbox.ometria.faults.injected == 0:
        assert time.monotonic() < deadline, airflow.task_states("antavo_ometria_contacts", run_id)
        time.sleep(0.2)
    pushing = [p for p in psutil.process_iter() if p.pid != os.getpid()
               and any(c.raddr and c.raddr.port == port for c in _connections(p))]
    assert len(pushing) == 1, pushing
    pushing[0].send_signal(signal.SIGKILL)
    assert airflow.wait_for_state("antavo_ometria_contacts", run_id) == "success"
    load = next(t for t in airflow.api("GET", f"/dags/antavo_ometria_contacts/dagRuns/{run_id}/taskInstances")[
        "task_instances"] if t["task_id"] == "load")
    assert load["try_number"] >= 2  # Airflow retried the killed task
    valid = {c["_id"] for i, c in enumerate(sandbox.antavo.customers) if not defects_of(i)}
    sent = {key[1]: count - before.get(key, 0) for key, count in sandbox.ometria.received.items()}
    assert {cid for cid, n in sent.items() if n} == valid
    assert set(sent.values()) == {1}  # every contact exactly once in this run


def _connections(process):
    try:
        return process.net_connections(kind="tcp")
    except Exception:  # processes that end or that we may not inspect
        return []


def test_event_sensor_defers_to_the_triggerer_and_resumes(stack):
    airflow, sandbox = stack
    airflow.unpause("antavo_ometria_events")  # the scheduler starts the latest interval's run
    run_id = airflow.wait_for_run("antavo_ometria_events",
                                  lambda states: states.get("wait_for_events") == "deferred")
    claim = sandbox.antavo.claim_reward("c00000020", "rw-coffee", at=datetime.now(UTC) - timedelta(seconds=5))
    assert airflow.wait_for_state("antavo_ometria_events", run_id) == "success"
    states = airflow.task_states("antavo_ometria_events", run_id)
    assert states["wait_for_events"] == "success" and states["deliver_events"] == "success"
    assert sandbox.ometria.events[f"reward_claimed:{claim['id']}"]["properties"]["reward_name"] == "Free coffee"
    assert sandbox.ometria.received[("custom_event", f"reward_claimed:{claim['id']}")] == 1


def test_dashboard_in_the_airflow_ui_shows_real_runs(stack, tmp_path):
    import requests
    from browser import Browser, chromium

    airflow, sandbox = stack
    page = requests.get(f"{airflow.url}/sync-dashboard/", headers={"Authorization": f"Bearer {airflow.token}"},
                        timeout=30)
    assert page.status_code == 200 and "Contacts per run" in page.text
    assert "loyalty_reward_claimed" in page.text and "success" in page.text
    assert requests.get(f"{airflow.url}/sync-dashboard/", timeout=30).status_code in (401, 403)  # Airflow login
    views = airflow.api("GET", "/plugins")["plugins"]
    assert any(v.get("url_route") == "antavo-ometria-sync" for p in views for v in p.get("external_views", []))
    traced = requests.get(f"{airflow.url}/sync-dashboard/trace", params={"q": "c00000001"},
                          headers={"Authorization": f"Bearer {airflow.token}"}, timeout=60)
    assert traced.status_code == 200 and "Customer c00000001" in traced.text and "sent and current" in traced.text
    assert requests.get(f"{airflow.url}/sync-dashboard/trace?q=c00000001", timeout=30).status_code in (401, 403)

    if chromium() is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium'); the screenshot needs it")
    browser = Browser()
    try:
        browser.set_cookie(airflow.url, "_token", airflow.token)
        browser.open(f"{airflow.url}/plugin/antavo-ometria-sync")
        text = browser.wait_for_text(
            "(document.querySelector('iframe')?.contentDocument?.body?.innerText) || ''", "Contacts per run")
        assert "Latest quarantined and rejected records" in text and "loyalty_reward_claimed" in text
        time.sleep(1)  # let the chart settle before the picture
        shot = browser.screenshot(tmp_path / "dashboard.png")
        browser.open(f"{airflow.url}/sync-dashboard/trace?q=c00000001")
        assert "sent and current" in browser.wait_for_text("document.body.innerText", "What Ometria got")
        trace_shot = browser.screenshot(tmp_path / "trace.png")
    finally:
        browser.close()
    assert shot.stat().st_size > 20_000 and trace_shot.stat().st_size > 20_000
    target = os.environ.get("ANTAVO_OMETRIA_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for picture in (shot, trace_shot):
            (Path(target) / f"{picture.stem}-{airflow.components[-1].split()[0]}.png").write_bytes(picture.read_bytes())
