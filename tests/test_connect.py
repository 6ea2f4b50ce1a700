"""Connect before any data moves, stop at the first refused credential, and say why on screen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from antavo_ometria.antavo.client import AntavoClient, AntavoConfig
from antavo_ometria.ometria.client import OmetriaClient, OmetriaConfig
from antavo_ometria.sync.connect import check_connections
from antavo_ometria.transport import AuthenticationFailed, RetryPolicy
from antavo_ometria_tools.cli import first_error
from antavo_ometria_tools.sandbox import ANTAVO_ENVIRONMENT, ANTAVO_KEY, OMETRIA_KEY

PROJECT = Path(__file__).resolve().parents[1]
QUICK = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.05)


def clients(sandbox, secret="sandbox-secret", key=OMETRIA_KEY):
    antavo = AntavoClient(AntavoConfig(sandbox.antavo_url, ANTAVO_KEY, secret, ANTAVO_ENVIRONMENT,
                                       read_api_url=sandbox.antavo_url, requests_per_second=0, retry=QUICK))
    ometria = OmetriaClient(OmetriaConfig(key, sandbox.ometria_url, requests_per_second=0, retry=QUICK))
    return antavo, ometria


def test_the_check_names_the_list_it_found(sandbox):
    checks = check_connections(*clients(sandbox), "8400")
    assert [(c.name, c.ok) for c in checks] == [("Antavo", True), ("Ometria", True), ("list", True)]
    assert checks[2].detail == "8400 'Loyalty members' (STATIC, ACTIVE)"


def test_a_wrong_antavo_secret_is_refused_once_not_retried(sandbox):
    checks = check_connections(*clients(sandbox, secret="wrong"), "8400")
    assert not checks[0].ok and not checks[0].retryable
    assert "credentials were refused" in checks[0].detail and "HTTP 401" in checks[0].detail
    assert sandbox.antavo.requests == 1  # one refused request, no retries


def test_a_wrong_ometria_key_and_an_unknown_list(sandbox):
    wrong = check_connections(*clients(sandbox, key="wrong"), "8400")
    assert [(c.name, c.ok) for c in wrong] == [("Antavo", True), ("Ometria", False), ("list", False)]
    assert "HTTP 403" in wrong[1].detail


def test_an_unknown_list_suggests_only_lists_a_contact_can_be_added_to_by_id_and_name(sandbox):
    missing = check_connections(*clients(sandbox), "8410")  # as close to the DYNAMIC 8401 as to the STATIC 8400
    assert not missing[2].ok and "did you mean 8400 'Loyalty members'?" in missing[2].detail
    assert "(lists a contact can be added to, by ID and name: 8400 'Loyalty members'; 1 DYNAMIC list(s) left out" \
        in missing[2].detail
    assert "8401" not in missing[2].detail


def test_a_refused_credential_names_the_connection_and_the_field_to_fix(sandbox):
    from antavo_ometria.airflow.hooks import credential_fixes

    checks = check_connections(*clients(sandbox, secret="wrong", key="wrong"), "8400", credential_fixes())
    assert checks[0].detail.startswith("the credentials were refused (") and "HTTP 401" in checks[0].detail
    assert "check connection antavo_default: login = the API key, password = the API secret" in checks[0].detail
    assert checks[1].detail.startswith("the API key was refused (") and "HTTP 403" in checks[1].detail
    assert "check connection ometria_default: password = the Ometria API key" in checks[1].detail
    assert checks[2].detail == "not checked: Ometria refused the key" and not checks[2].retryable


@pytest.mark.parametrize(("conn_id", "field", "meaning"), [("antavo_default", "login", "the Antavo API key"),
                                                           ("antavo_default", "password", "the Antavo API secret"),
                                                           ("ometria_default", "password", "the Ometria API key")])
def test_a_connection_without_its_key_says_which_field_to_set(conn_id, field, meaning):
    from airflow.models.connection import Connection

    from antavo_ometria.airflow.hooks import antavo_config, ometria_config

    values = {"login": "key", "password": "secret", field: None}
    conn = Connection(conn_id=conn_id, conn_type="http", extra=json.dumps({"environment": "st2"}), **values)
    with pytest.raises(ValueError, match=f"connection '{conn_id}' has no {field}: set it to {meaning}"):
        (antavo_config if conn_id == "antavo_default" else ometria_config)(conn)


def test_an_unreachable_host_is_named(sandbox):
    antavo, _ = clients(sandbox)
    ometria = OmetriaClient(OmetriaConfig(OMETRIA_KEY, "http://127.0.0.1:9", requests_per_second=0, retry=QUICK))
    checks = check_connections(antavo, ometria, "8400")
    assert "cannot reach 127.0.0.1:9" in checks[1].detail and checks[1].retryable


def test_a_refused_ometria_key_stops_the_load_at_the_first_batch(sandbox, antavo_client, state_url, tmp_path):
    from antavo_ometria.sync.contacts.extract import extract
    from antavo_ometria.sync.contacts.load import load_staged
    from antavo_ometria.sync.contacts.plan import plan_run
    from antavo_ometria.sync.contacts.prepare import transform_staged
    from antavo_ometria.sync.store.state import StateStore
    from antavo_ometria.sync.tables.mapping import load_contact_mapping

    store = StateStore(state_url)
    store.migrate()
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    plan = plan_run(store, mapping, "antavo_ometria_contacts", "run-1")
    extract(antavo_client, tmp_path, plan)
    transform_staged(tmp_path, mapping, plan, store)
    _, wrong = clients(sandbox, key="wrong")
    with pytest.raises(AuthenticationFailed, match="HTTP 403"):
        load_staged(tmp_path, wrong, plan, store)
    assert sandbox.ometria.refused == 1  # not one refused request per batch


def test_a_refused_key_with_nothing_to_push_is_an_authentication_failure(sandbox, state_url, tmp_path):
    import pyarrow.parquet as pq

    from antavo_ometria.sync.contacts.load import load_staged
    from antavo_ometria.sync.contacts.plan import Plan
    from antavo_ometria.sync.contacts.staged_files import CONTACTS, CONTACTS_SCHEMA

    pq.write_table(CONTACTS_SCHEMA.empty_table(), tmp_path / CONTACTS)
    _, wrong = clients(sandbox, key="wrong")
    with pytest.raises(AuthenticationFailed, match="_errors: HTTP 403"):
        load_staged(tmp_path, wrong, Plan("antavo_ometria_contacts", "r", "a", "full", "first run", None, True, False,
                                          "v", None, "2026-01-01T00:00:00+00:00", None))


def test_the_first_error_of_a_failed_run_is_found_in_the_log():
    log = ("2026-03-01T12:00:00Z [error    ] Task failed with exception\nTraceback (most recent call last):\n"
           '  File "x.py", line 1, in <module>\n    raise AirflowFailException(x)\n'
           "airflow.sdk.exceptions.AirflowFailException: contacts.csv:4: [loyalty_field] unknown loyalty field\n"
           "Traceback (most recent call last):\nValueError: later\n")
    assert first_error(log) == "contacts.csv:4: [loyalty_field] unknown loyalty field"
    assert first_error("all fine\n") is None


def test_every_problem_of_a_broken_mapping_is_in_the_error_not_only_its_first_line():
    log = ("2026-03-01T12:00:00Z [error    ] Task failed with exception\nTraceback (most recent call last):\n"
           '  File "hooks.py", line 214, in fail_fast_on\n    raise AirflowFailException(str(exc)) from None\n'
           "airflow.sdk.exceptions.AirflowFailException: 2 problem(s) in the sync configuration:\n"
           "  contacts.csv:4: [loyalty_field] unknown loyalty field 'first_nmae' (did you mean 'first_name'?)\n"
           "  contacts.csv:5: the row has 2 cells, the header 4\n"
           "  warning: contacts.csv:6: [remote_field] 'gendre' is sent as a custom field ID\n"
           "2026-03-01T12:00:01Z [info     ] ::group::Post Execute\n")
    assert first_error(log).splitlines() == [
        "2 problem(s) in the sync configuration:",
        "  contacts.csv:4: [loyalty_field] unknown loyalty field 'first_nmae' (did you mean 'first_name'?)",
        "  contacts.csv:5: the row has 2 cells, the header 4",
        "  warning: contacts.csv:6: [remote_field] 'gendre' is sent as a custom field ID"]


def run_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "antavo_ometria_tools.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_a_malformed_connection_variable_is_reported_before_anything_runs(tmp_path):
    broken = '{"conn_type": "http", "password": "k",}'
    done = run_cli("run", env={"AIRFLOW_HOME": str(tmp_path), "AIRFLOW_CONN_OMETRIA_DEFAULT": broken,
                               "AIRFLOW_CONN_ANTAVO_DEFAULT": json.dumps({"conn_type": "http"})})
    assert done.returncode == 2
    assert "AIRFLOW_CONN_OMETRIA_DEFAULT is not valid JSON" in done.stderr
    assert not (tmp_path / "airflow.db").exists()  # nothing ran


@pytest.mark.airflow
def test_make_run_with_a_wrong_secret_ends_at_once_with_the_cause_on_screen(sandbox, tmp_path):
    conns = sandbox.connections()
    antavo = json.loads(conns["AIRFLOW_CONN_ANTAVO_DEFAULT"])
    antavo["password"] = "not-the-secret"
    done = run_cli("run", env={"AIRFLOW_HOME": str(tmp_path), **conns,
                               "AIRFLOW_CONN_ANTAVO_DEFAULT": json.dumps(antavo),
                               "ANTAVO_OMETRIA_STATE_URL": f"sqlite:///{tmp_path / 'state.db'}",
                               "ANTAVO_OMETRIA_RETRY_DELAY_SECONDS": "30"})
    assert done.returncode != 0
    assert "The run FAILED: Antavo: the credentials were refused" in done.stderr
    assert sandbox.antavo.requests == 1  # the connection check's first request, not retried
    assert sandbox.ometria.pushes == 0


@pytest.mark.airflow
def test_make_run_with_a_broken_mapping_prints_every_problem_and_warning(sandbox, mappings, tmp_path):
    table = mappings / "contacts.csv"
    table.write_text(table.read_text().replace("first_name,firstname,,", "first_nmae,firstname,,")
                     .replace("last_name,lastname,,", "last_name,lastname").replace("gender,gender,,", "gender,gendre,,"))
    done = run_cli("run", env={"AIRFLOW_HOME": str(tmp_path), **sandbox.connections(),
                               "ANTAVO_OMETRIA_MAPPINGS_DIR": str(mappings),
                               "ANTAVO_OMETRIA_STATE_URL": f"sqlite:///{tmp_path / 'state.db'}"})
    assert done.returncode != 0
    assert "The run FAILED: 2 problem(s) in the sync configuration, and 1 warning(s):" in done.stderr
    assert "warning: " in done.stderr and "contacts.csv:6: [remote_field] 'gendre' is sent as a custom" in done.stderr
    assert "contacts.csv:4: [loyalty_field] unknown loyalty field 'first_nmae'" in done.stderr
    assert "contacts.csv:5: the row has 2 cells, the header 4" in done.stderr
    assert sandbox.ometria.pushes == 0


@pytest.mark.airflow
def test_make_check_prints_one_line_per_check(sandbox, tmp_path):
    done = run_cli("check", env={"AIRFLOW_HOME": str(tmp_path), **sandbox.connections()})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()[-3:]
    assert [line.split()[:2] for line in lines] == [["✓", "Antavo"], ["✓", "Ometria"], ["✓", "list"]]


@pytest.mark.airflow
def test_make_check_with_a_refused_ometria_key_says_so_and_names_the_fix(sandbox, tmp_path):
    conns = sandbox.connections()
    ometria = json.loads(conns["AIRFLOW_CONN_OMETRIA_DEFAULT"])
    ometria["password"] = "not-the-key"
    done = run_cli("check", env={"AIRFLOW_HOME": str(tmp_path), **conns, "AIRFLOW_CONN_OMETRIA_DEFAULT": json.dumps(ometria)})
    assert done.returncode == 1
    lines = done.stdout.strip().splitlines()[-2:]
    assert lines[0].startswith("✗ Ometria     the API key was refused (") and "ometria_default: password" in lines[0]
    assert lines[1] == "✗ list        not checked: Ometria refused the key"


def test_the_first_error_is_the_exception_raised_last_without_its_module():
    chained = ("Traceback (most recent call last):\n  File \"a.py\", line 1\nKeyError: 'x'\n\n"
               "The above exception was the direct cause of the following exception:\n\n"
               "Traceback (most recent call last):\n  File \"b.py\", line 2\n"
               "antavo_ometria.sync.connect.ConnectionCheckFailed: Ometria: the credentials were refused\n"
               "2026-03-01T12:00:00Z [info     ] next record\nTraceback (most recent call last):\nValueError: later\n")
    assert first_error(chained) == "Ometria: the credentials were refused"


def test_a_malformed_state_store_connection_is_said_not_replaced_by_sqlite(monkeypatch):
    from antavo_ometria.airflow.hooks import StateStoreHook

    monkeypatch.setenv("AIRFLOW_CONN_ANTAVO_OMETRIA_STATE", '{"conn_type": "generic", "extra": {"url": "x"},}')
    with pytest.raises(ValueError, match="AIRFLOW_CONN_ANTAVO_OMETRIA_STATE is not valid JSON"):
        StateStoreHook().get_url()


@pytest.mark.airflow
def test_connections_stored_in_airflow_are_used_not_the_sandbox(sandbox, tmp_path):
    env = {"AIRFLOW_HOME": str(tmp_path)}
    airflow = [str(Path(sys.executable).with_name("airflow"))]
    full_env = {**os.environ, **env}
    full_env = {k: v for k, v in full_env.items() if not k.startswith("AIRFLOW_CONN_")}
    subprocess.run([*airflow, "db", "migrate"], env=full_env, capture_output=True, check=True, timeout=300)
    for name, value in sandbox.connections().items():
        conn_id = name.removeprefix("AIRFLOW_CONN_").lower()
        subprocess.run([*airflow, "connections", "add", conn_id, "--conn-json", value], env=full_env,
                       capture_output=True, check=True, timeout=120)
    done = subprocess.run([sys.executable, "-m", "antavo_ometria_tools.cli", "check"], capture_output=True, text=True,
                          timeout=300, env=full_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sandbox" not in done.stdout  # the stored connections were used
    assert f"signed requests accepted by {sandbox.antavo_url.removeprefix('http://')}" in done.stdout
