"""Who may open the REST API and the sync dashboard on the deployment docker-compose.yaml describes: a real
api-server with the FAB auth manager, prepared by compose's own airflow-init script, and real logins over HTTP."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest
import requests
from stack import PROJECT, AirflowStack

pytestmark = pytest.mark.airflow
DASHBOARD = ("/sync-dashboard/", "/sync-dashboard/trace?q=c00000001")


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-fab")
    running = AirflowStack.api_server(home, {"ANTAVO_OMETRIA_STATE_URL": f"sqlite:///{home / 'state.db'}",
                                             "ANTAVO_OMETRIA_STAGING_DIR": str(home / "staging")})
    try:
        yield running.start()
    finally:
        running.stop()


def get(airflow: AirflowStack, path: str, token: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(f"{airflow.url}{path}", headers=headers, timeout=60, allow_redirects=False)


def add_user(airflow: AirflowStack, username: str, role: str) -> str:
    """A user with one role, added by the admin through FAB's REST API; returns the user's own token."""
    password = f"{username}-pw-{airflow.port}"
    added = requests.post(f"{airflow.url}/auth/fab/v1/users", timeout=30, json={
        "username": username, "password": password, "email": f"{username}@example.com", "first_name": username,
        "last_name": "Tester", "roles": [{"name": role}]}, headers={"Authorization": f"Bearer {airflow.token}"})
    assert added.status_code in (200, 201), added.text
    return airflow.token_for(username, password)


def test_anonymous_requests_are_refused(airflow):
    # the UI's page is a static shell: what it shows comes from /ui/… and /api/v2/…, which want a login
    for path in ("/api/v2/dags", "/ui/config", "/ui/dags"):
        assert get(airflow, path).status_code == 401, path
        assert get(airflow, path, token="not-a-token").status_code in (401, 403), path
    for path in DASHBOARD:
        assert get(airflow, path).status_code in (401, 403), path
        assert get(airflow, path, token="not-a-token").status_code in (401, 403), path
    wrong = requests.post(f"{airflow.url}/auth/token", json={"username": "admin", "password": "guessed"}, timeout=30)
    assert wrong.status_code == 401 and "access_token" not in wrong.text
    login = get(airflow, "/auth/login/")  # where the UI sends a visitor who is not logged in: FAB's login form
    assert login.status_code == 200 and 'name="password"' in login.text


def test_the_admin_from_the_env_file_logs_in_and_reads_the_dashboard(airflow):
    username = airflow.login["username"]  # from the .env `make keys` wrote, as compose reads it
    assert f'User "{username}" created with role "Admin"' in (airflow.home / "airflow-init.log").read_text()
    for path in ("/api/v2/dags", "/ui/config"):
        assert get(airflow, path, airflow.token).status_code == 200, path
    page = get(airflow, "/sync-dashboard/", airflow.token)
    assert page.status_code == 200 and "Contacts per run" in page.text
    for log in ("airflow-init.log", "api-server.log"):  # the admin's password is in no log
        assert airflow.login["password"] not in (airflow.home / log).read_text(), log


def test_a_viewer_reads_the_dashboard_and_a_role_without_the_task_logs_does_not(airflow):
    viewer = add_user(airflow, "ana", "Viewer")
    for path in DASHBOARD:
        page = get(airflow, path, viewer)
        assert page.status_code == 200, (path, page.text[:300])
    assert "Contacts per run" in get(airflow, "/sync-dashboard/", viewer).text

    runs_only = {"name": "dag-runs-only", "actions": [
        {"action": {"name": "can_read"}, "resource": {"name": resource}} for resource in ("DAGs", "DAG Runs")]}
    created = requests.post(f"{airflow.url}/auth/fab/v1/roles", json=runs_only, timeout=30,
                            headers={"Authorization": f"Bearer {airflow.token}"})
    assert created.status_code in (200, 201), created.text
    reader = add_user(airflow, "ben", "dag-runs-only")
    assert get(airflow, "/api/v2/dags/~/dagRuns", reader).status_code == 200  # he may read runs, not their logs
    for path in DASHBOARD:
        refused = get(airflow, path, reader)
        assert refused.status_code == 403 and "task logs" in refused.text, (path, refused.text[:300])

    nobody = add_user(airflow, "cid", "Public")  # logged in, with no permission at all
    assert get(airflow, "/api/v2/dags", nobody).status_code == 403
    assert get(airflow, "/sync-dashboard/", nobody).status_code == 403


def test_a_connection_added_as_the_readme_shows_is_stored_encrypted_with_the_fernet_key_from_env(airflow):
    from cryptography.fernet import Fernet

    readme = (PROJECT / "README.md").read_text()
    added = re.search(r"airflow connections add antavo_default --conn-json '([^']+)'", readme)
    assert added, "the README shows how to keep the Antavo credentials in a connection"
    conn = json.loads(added.group(1))
    airflow.run("connections", "add", "antavo_default", "--conn-json", added.group(1))
    with sqlite3.connect(airflow.home / "airflow.db") as db:
        password, encrypted, extra, extra_encrypted = db.execute(
            "SELECT password, is_encrypted, extra, is_extra_encrypted FROM connection WHERE conn_id = 'antavo_default'"
        ).fetchone()
    assert encrypted and extra_encrypted and conn["password"] not in password and "st2" not in extra
    key = Fernet(airflow.env["AIRFLOW__CORE__FERNET_KEY"].encode())  # the key compose takes from .env
    assert key.decrypt(password.encode()).decode() == conn["password"]
    assert json.loads(key.decrypt(extra.encode())) == conn["extra"]
    shown = requests.get(f"{airflow.url}/api/v2/connections/antavo_default", timeout=30,
                         headers={"Authorization": f"Bearer {airflow.token}"}).json()
    assert shown["login"] == conn["login"] and shown["password"] != conn["password"]  # the API never shows it
