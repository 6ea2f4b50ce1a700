"""Staging on object storage: an S3-compatible server (moto, over real HTTP on loopback) holds every file a
run stages, so workers on different machines can share a run; and the same runs on `file://`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
BUCKET = "sync-staging"
DAG = "antavo_ometria_contacts"


@pytest.fixture(scope="module")
def s3():
    """An S3-compatible server on 127.0.0.1 with an empty bucket; yields its URL."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer
    from stack import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="k",
                 aws_secret_access_key="s").create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


def aws_connection(url: str, bucket_key: str = "k") -> str:
    return json.dumps({"conn_type": "aws", "login": bucket_key, "password": "s",
                       "extra": {"endpoint_url": url, "region_name": "us-east-1"}})


@pytest.fixture
def s3_staging(s3, monkeypatch, tmp_path):
    """Runs stage into s3://aws_staging@<bucket>/<test> (the connection named in the URL, as Airflow does)."""
    monkeypatch.setenv("AIRFLOW_CONN_AWS_STAGING", aws_connection(s3))
    url = f"s3://aws_staging@{BUCKET}/{tmp_path.name}"
    monkeypatch.setenv("ANTAVO_OMETRIA_STAGING_DIR", url)
    return url


def objects(s3_url: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="k",
                          aws_secret_access_key="s")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


STEP = """
import json, sys
from antavo_ometria.airflow.hooks import AntavoHook, OmetriaHook, StateStoreHook
from antavo_ometria.airflow.staging_location import staging_root
from antavo_ometria.sync.tables.mapping import load_contact_mapping
from antavo_ometria.sync.tables.settings import mappings_dir
from antavo_ometria.sync.contacts.staged_files import staging_dir

step, run_id = sys.argv[1:3]
mapping, store = load_contact_mapping(mappings_dir()), StateStoreHook().get_conn()
staging = staging_dir(staging_root(), "antavo_ometria_contacts", run_id)
if step == "plan_extract":
    from antavo_ometria.sync.contacts.extract import extract
    from antavo_ometria.sync.contacts.plan import plan_run
    store.ensure_schema()
    plan = plan_run(store, mapping, "antavo_ometria_contacts", run_id)
    done = {"plan": plan.as_dict(), "extract": extract(AntavoHook().get_conn(), staging, plan,
                                                      paths=mapping.loyalty_fields).as_dict()}
elif step == "transform":
    from antavo_ometria.sync.contacts.prepare import transform_staged
    done = transform_staged(staging, mapping, json.loads(sys.argv[3]), store).as_dict()
else:
    from antavo_ometria.sync.contacts.load import load_staged
    done = load_staged(staging, OmetriaHook().get_conn(), json.loads(sys.argv[3]), store).as_dict()
print(json.dumps(done))
"""


@pytest.mark.airflow
def test_extract_and_transform_in_different_processes_share_nothing_but_the_bucket(
        s3, s3_staging, connections, tmp_path, monkeypatch):
    """Each step runs in its own process with its own (empty) AIRFLOW_HOME; only the bucket and the state
    store's database are shared, as between Celery workers on different machines."""
    from antavo_ometria.airflow.staging_location import staging_root
    from antavo_ometria.sync.contacts.report import report_run
    from antavo_ometria.sync.contacts.staged_files import staging_dir
    from antavo_ometria.sync.store.state import StateStore

    def step(name: str, *args: str) -> dict:
        home = tmp_path / f"worker-{name}"
        home.mkdir()
        env = {**os.environ, "AIRFLOW_HOME": str(home)}
        done = subprocess.run([sys.executable, "-c", STEP, name, "run-1", *args], env=env, capture_output=True,
                              text=True, timeout=300, cwd=home)
        assert done.returncode == 0, done.stderr[-3000:]
        assert not [p for p in home.rglob("*") if p.suffix in (".ndjson", ".parquet", ".json")]  # nothing on its disk
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = step("plan_extract")
    plan = json.dumps(first["plan"])
    transformed = step("transform", plan)
    loaded = step("load", plan)
    store = StateStore(os.environ["ANTAVO_OMETRIA_STATE_URL"])
    report = report_run(staging_dir(staging_root(), DAG, "run-1"), {**first, "transform": transformed, "load": loaded},
                        store, DAG, "run-1")
    assert report["status"] == "success" and report["sent"] == transformed["changed"] > 0
    stored = Counter(i for (_, i) in connections.ometria.contacts)
    assert len(stored) == report["accepted"] and set(stored.values()) == {1}  # every contact once
    names = {key.rsplit("/", 1)[-1] for key in objects(s3, tmp_path.name)}
    assert {"customers.ndjson", "contacts.parquet", "quarantine.ndjson", "report.json", "gx_validation.json"} <= names


@pytest.mark.airflow
@pytest.mark.parametrize("where", ["s3", "file"])
def test_both_dags_run_end_to_end_with_staging_at_a_url(airflow_db, connections, where, request, tmp_path,
                                                        monkeypatch):
    from airflow.models import DagBag
    from airflow.utils.state import DagRunState

    from antavo_ometria.airflow.staging_location import staging_root
    from antavo_ometria.sync.contacts.staged_files import staging_dir

    if where == "s3":
        url = request.getfixturevalue("s3_staging")
    else:
        url = f"file://{tmp_path / 'shared-staging'}"
        monkeypatch.setenv("ANTAVO_OMETRIA_STAGING_DIR", url)
    connections.antavo.claim_reward("c00000010", "rw-coffee", at=datetime.now(UTC) - timedelta(minutes=1))
    dags = DagBag(dag_folder=str(PROJECT / "dags"))
    contacts = dags.get_dag(DAG).test()
    assert contacts.state == DagRunState.SUCCESS
    report = json.loads((staging_dir(staging_root(), DAG, contacts.run_id) / "report.json").read_text())
    assert report["status"] == "success" and report["sent"] == len(connections.ometria.contacts) > 0
    assert str(staging_root()).startswith(url.split("://")[0])
    if where == "file":
        return  # the event triggers stage nothing: once is enough
    events = dags.get_dag("antavo_ometria_events").test()
    assert events.state == DagRunState.SUCCESS
    assert len(connections.ometria.events) == 1


@pytest.mark.airflow
def test_a_missing_bucket_fails_the_first_task_before_any_request(airflow_db, s3, connections, monkeypatch):
    from airflow.models import DagBag

    monkeypatch.setenv("AIRFLOW_CONN_AWS_STAGING", aws_connection(s3))
    monkeypatch.setenv("ANTAVO_OMETRIA_STAGING_DIR", "s3://aws_staging@no-such-bucket/runs")
    run = DagBag(dag_folder=str(PROJECT / "dags")).get_dag(DAG).test()
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert (states["check_connections"], states["plan"]) == ("failed", "upstream_failed")
    assert connections.antavo.requests == 0 and connections.ometria.pushes == 0
    assert connections.ometria.refused == 0 and connections.ometria.pushes == 0  # Ometria was not called either


def test_wrong_credentials_are_named_in_the_staging_check(tmp_path, monkeypatch):
    """A server that checks credentials refuses the key: the check says which staging URL and why."""
    boto3 = pytest.importorskip("boto3")
    import requests
    from moto.server import ThreadedMotoServer
    from stack import free_port

    from antavo_ometria.airflow.staging_location import StagingUnusable, check_staging, staging_root

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="k",
                     aws_secret_access_key="s").create_bucket(Bucket=BUCKET)
        requests.post(f"{url}/moto-api/reset-auth", data="0", timeout=10).raise_for_status()  # from now on, check keys
        # a connection of its own: Airflow keeps one filesystem per connection id for the life of the process
        monkeypatch.setenv("AIRFLOW_CONN_AWS_REFUSED", aws_connection(url, bucket_key="not-a-key"))
        monkeypatch.setenv("ANTAVO_OMETRIA_STAGING_DIR", f"s3://aws_refused@{BUCKET}/runs")
        with pytest.raises(StagingUnusable, match=f"s3://aws_refused@{BUCKET}/runs is not usable: PermissionError: The AWS Access Key Id you provided does not exist"):
            check_staging(staging_root())
    finally:  # moto's setting is one per process: the other tests' server must not check keys
        requests.post(f"{url}/moto-api/reset-auth", data="inf", timeout=10)
        server.stop()


def test_credentials_in_the_url_or_a_relative_file_url_are_refused(monkeypatch):
    from antavo_ometria.airflow.staging_location import staging_root

    for wrong, why in (("s3://AKIAEXAMPLE:secret@bucket/runs", "must not hold credentials"),
                       ("file://shared/staging", "three slashes")):
        monkeypatch.setenv("ANTAVO_OMETRIA_STAGING_DIR", wrong)
        with pytest.raises(ValueError, match=why) as raised:
            staging_root()
        assert "secret" not in str(raised.value)


def test_a_journal_in_parts_reads_back_in_the_order_it_was_written_and_after_a_legacy_file(s3, s3_staging):
    from antavo_ometria.airflow.staging_location import staging_root
    from antavo_ometria.sync.contacts.staged_files import LEGACY_JOURNAL, Journal, read_journal, staging_dir

    staging = staging_dir(staging_root(), DAG, "journal")
    assert read_journal(staging) == []
    (staging / LEGACY_JOURNAL).write_text('{"n": 0}\n')
    first = Journal(staging)
    first.append([{"n": 1}])
    first.append([{"n": 2}, {"n": 3}])
    Journal(staging).append([{"n": 4}])  # a retry, maybe on another worker with another clock
    assert [e["n"] for e in read_journal(staging)] == [0, 1, 2, 3, 4]


def test_the_retention_removes_old_run_folders_from_the_bucket_too(s3, s3_staging):
    from datetime import timedelta

    from antavo_ometria.airflow.staging_location import staging_root
    from antavo_ometria.sync.contacts.staged_files import REPORT, prune_staging, staging_dir

    root = staging_root()
    old, current = staging_dir(root, DAG, "old"), staging_dir(root, DAG, "current")
    for folder in (old, current):
        (folder / REPORT).write_text("{}")
        (folder / "load" / "part.ndjson").write_text("{}\n")
    assert prune_staging(root, DAG, keep=current) == []  # just written: younger than the 7 days kept
    # every object counts as older than a retention that ends in the future
    removed = prune_staging(root, DAG, keep=current, older_than=timedelta(seconds=-60))
    assert [str(f) for f in removed] == [str(old)]
    keys = objects(s3, s3_staging.rsplit("/", 1)[-1])
    assert keys and all("/current-" in key for key in keys)
