"""Shared fixtures. Airflow is pointed at a throw-away home before anything imports it."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    home = Path(tempfile.mkdtemp(prefix="antavo-ometria-tests-"))
    os.environ.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "GX_ANALYTICS_ENABLED": "false",
        "ANTAVO_OMETRIA_STAGING_DIR": str(home / "staging"),
        "ANTAVO_OMETRIA_EVENT_POKE_SECONDS": "0.5",
        "ANTAVO_OMETRIA_EVENT_WAIT_SECONDS": "3",
        "ANTAVO_OMETRIA_RETRY_DELAY_SECONDS": "1",
        # the load reads the staged contacts 64 at a time: every test's run spans several read batches
        "ANTAVO_OMETRIA_LOAD_READ_ROWS": "64",
    })


# `make test` hands whole files to its workers in this order: the files that take minutes (real Airflow deployments,
# back-offs, many DAG runs) first, costliest first, so that the quick files fill in around them and no worker is
# left with a long file at the end while the others idle. Files not listed follow in their usual order.
LONG_FILES = ("test_deployment_celery.py", "test_deployment.py", "test_events_failures.py", "test_sync_state.py",
              "test_events_continuous.py", "test_local_runs.py", "test_reliability.py", "test_connect.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: n for n, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: a file keeps its own order


@pytest.fixture(scope="session")
def airflow_metadata():
    """A fresh Airflow metadata database (SQLite) for the DAG tests of this session (of this worker)."""
    from airflow.utils.db import resetdb

    resetdb()


@pytest.fixture
def airflow_db(airflow_metadata):
    """The session's Airflow metadata database without the DAG runs of the tests before (their task instances and
    XComs go with them): a run looks back at the run before it (the events DAG backs off after a failed one), and a
    test must not find the runs of whichever test its worker ran before."""
    import sqlalchemy as sa
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        session.execute(sa.delete(DagRun))


@pytest.fixture
def sandbox_ports():
    """Held while a test serves a sandbox on `make sandbox`'s ports (127.0.0.1:8701 and :8702), or runs a command that
    would use a sandbox it finds there (`make run`, `make ui` without credentials): such tests wait for each other,
    whichever worker (or test run on this machine) they are on, instead of one finding the other's sandbox."""
    import fcntl

    with (Path(tempfile.gettempdir()) / "antavo-ometria-sandbox-ports.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture
def sandbox():
    from antavo_ometria_tools.sandbox import Sandbox

    with Sandbox(customers=300) as running:
        yield running


POSTGRES = ("127.0.0.1", 5432)


def reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def state_url(tmp_path):
    """The state store for one test: a fresh SQLite file."""
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def postgres_state_url():
    """A fresh database on the local PostgreSQL server, dropped afterwards."""
    if not reachable(*POSTGRES):
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432; start it to run the PostgreSQL variant")
    import uuid

    import sqlalchemy as sa

    name = f"sync_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def connections(sandbox, monkeypatch, state_url):
    """Point `antavo_default` and `ometria_default` at the sandbox through AIRFLOW_CONN_* variables."""
    for name, value in sandbox.connections().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ANTAVO_OMETRIA_STATE_URL", state_url)
    return sandbox


@pytest.fixture
def antavo_client(sandbox):
    from antavo_ometria.antavo.client import AntavoClient, AntavoConfig
    from antavo_ometria.transport import RetryPolicy
    from antavo_ometria_tools.sandbox import ANTAVO_ENVIRONMENT, ANTAVO_KEY, ANTAVO_SECRET

    return AntavoClient(AntavoConfig(sandbox.antavo_url, ANTAVO_KEY, ANTAVO_SECRET, ANTAVO_ENVIRONMENT,
                                     read_api_url=sandbox.antavo_url, requests_per_second=0,
                                     retry=RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.05)))


@pytest.fixture
def ometria_client(sandbox):
    from antavo_ometria.ometria.client import OmetriaClient, OmetriaConfig
    from antavo_ometria.transport import RetryPolicy
    from antavo_ometria_tools.sandbox import OMETRIA_KEY

    return OmetriaClient(OmetriaConfig(OMETRIA_KEY, sandbox.ometria_url, requests_per_second=0, timeout=2,
                                       retry=RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.05)))


@pytest.fixture
def mappings(tmp_path):
    """A copy of the shipped mapping folder that a test may edit."""
    target = tmp_path / "mappings"
    target.mkdir()
    for source in (PROJECT / "include" / "mappings").glob("*.*"):
        (target / source.name).write_bytes(source.read_bytes())
    return target
