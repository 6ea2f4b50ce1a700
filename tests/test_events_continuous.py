"""Reward claims on a real deployment of the continuous events DAG: each claim reaches Ometria once, also
when another run of the DAG overlaps and when the triggerer restarts while the sensor waits in it.

Counts come from what the Ometria sandbox stored per id, not from the sync's own records; the timing itself is
measured by `make bench-events` (BENCHMARKS.md), not asserted here.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from stack import POLL, AirflowStack

from antavo_ometria_tools.population import defects_of
from antavo_ometria_tools.sandbox import Sandbox

pytestmark = pytest.mark.airflow
PROJECT = Path(__file__).resolve().parents[1]
DAG = "antavo_ometria_events"
SENSOR = "wait_for_events"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("airflow-events")
    with Sandbox(customers=200) as sandbox:
        env = {**sandbox.connections(), "ANTAVO_OMETRIA_STAGING_DIR": str(tmp / "staging"),
               "ANTAVO_OMETRIA_STATE_URL": f"sqlite:///{tmp / 'state.db'}",
               "ANTAVO_OMETRIA_EVENT_POKE_SECONDS": "1", "ANTAVO_OMETRIA_EVENT_WAIT_SECONDS": "300",
               "ANTAVO_OMETRIA_RETRY_DELAY_SECONDS": "2"}
        airflow = AirflowStack.local(tmp, env).start()
        try:
            airflow.unpause(DAG)
            yield airflow, sandbox
        finally:
            airflow.stop()


def valid_customers(sandbox) -> list[str]:
    return [c["_id"] for i, c in enumerate(sandbox.antavo.customers) if not defects_of(i)]


def claim(sandbox, customer: str) -> str:
    made = sandbox.antavo.claim_reward(customer, "rw-coffee", at=datetime.now(UTC))
    return f"reward_claimed:{made['id']}"


def wait_until_delivered(sandbox, ids: list[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not set(ids) <= set(sandbox.ometria.events):
        assert time.monotonic() < deadline, f"not in Ometria after {timeout}s: {set(ids) - set(sandbox.ometria.events)}"
        time.sleep(POLL)


def sensor_waiting(airflow: AirflowStack) -> str:
    return airflow.wait_for_run(DAG, lambda states: states.get(SENSOR) == "deferred", timeout=240)


def test_claims_spread_over_runs_reach_ometria_once_each_while_another_run_overlaps(deployment, tmp_path):
    airflow, sandbox = deployment
    sensor_waiting(airflow)
    customers = valid_customers(sandbox)
    # another run of the same DAG on the same accounts and state store (`make events` next to the deployment)
    env = {k: v for k, v in airflow.env.items() if not k.startswith("AIRFLOW__")}
    airflow_bin = str(Path(sys.executable).with_name("airflow"))
    env = {**env, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "ANTAVO_OMETRIA_EVENT_WAIT_SECONDS": "30"}
    subprocess.run([airflow_bin, "db", "migrate"], env=env, capture_output=True, check=True, timeout=300)
    overlapping = subprocess.Popen([airflow_bin, "dags", "test", DAG], env=env, stderr=subprocess.STDOUT,
                                   stdout=(tmp_path / "dags_test.log").open("w"))
    ids = []
    for n in range(8):  # several runs: each ends after its delivery, the next starts at once
        ids.append(claim(sandbox, customers[n]))
        time.sleep(3)
    wait_until_delivered(sandbox, ids)
    assert overlapping.wait(240) == 0, (tmp_path / "dags_test.log").read_text()[-3000:]
    assert {i: sandbox.ometria.received[("custom_event", i)] for i in ids} == dict.fromkeys(ids, 1)
    runs = airflow.api("GET", f"/dags/{DAG}/dagRuns")["dag_runs"]
    assert len(runs) >= 2  # the continuous schedule started the next run once one had delivered
    assert not [r for r in runs if r["state"] == "failed"], runs


def test_claims_made_while_the_triggerer_is_down_arrive_once_it_is_back(deployment):
    airflow, sandbox = deployment
    sensor_waiting(airflow)
    before = dict(sandbox.ometria.received)
    airflow.stop_component("triggerer")
    customers = valid_customers(sandbox)[20:]
    ids = [claim(sandbox, customers[n]) for n in range(3)]
    time.sleep(5)
    assert not set(ids) & set(sandbox.ometria.events)  # nobody watched Antavo meanwhile
    airflow.start_component("triggerer")
    wait_until_delivered(sandbox, ids)
    more = [claim(sandbox, customers[3])]  # and the fast path works again after the restart
    wait_until_delivered(sandbox, more)
    after = {key: n - before.get(key, 0) for key, n in sandbox.ometria.received.items()}
    assert {i: after[("custom_event", i)] for i in ids + more} == dict.fromkeys(ids + more, 1)
