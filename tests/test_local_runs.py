"""`make run` as a newcomer uses it: the local sandbox is kept between runs, so the second run is incremental."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from antavo_ometria_tools.sandbox import Sandbox, running

PROJECT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.airflow, pytest.mark.usefixtures("sandbox_ports")]  # 8701/8702: see conftest.py


def make_run(home: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "ANTAVO_OMETRIA_STATE"))}
    done = subprocess.run([sys.executable, "-m", "antavo_ometria_tools.cli", "run", "--customers", "200", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**env, "AIRFLOW_HOME": str(home), "ANTAVO_OMETRIA_STAGING_DIR": str(home / "staging")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_the_second_run_is_incremental_and_picks_up_a_change_made_in_the_sandbox(tmp_path):
    if running() is not None:
        pytest.skip("a sandbox is already serving on 127.0.0.1:8701/8702 (make sandbox); stop it to run this test")
    first = make_run(tmp_path)
    assert "(full load;" in first and "The Ometria sandbox now holds 193 contacts" in first

    # `make sandbox` in another terminal (it keeps the accounts of the run before), a change made in it a
    # moment ago, then `make run`: incremental, and only that customer is sent
    with Sandbox(customers=200, antavo_port=8701, ometria_port=8702, state_file=tmp_path / "sandbox.json") as sandbox:
        assert len(sandbox.ometria.contacts) == 193  # kept between runs, like the state store
        sandbox.antavo.touch("c00000001", {"first_name": "Anneliese"})
        second = make_run(tmp_path)
        assert "using the sandbox already running" in second
        assert "(incremental load," in second and "  sent                1" in second
        assert sandbox.ometria.contacts[("antavo", "c00000001")]["firstname"] == "Anneliese"

    # `make run FRESH=1` starts the sandbox and its state store over (checked without a fourth run)
    from argparse import Namespace

    from antavo_ometria_tools.cli import SANDBOX_STATE, _accounts, airflow_env

    assert (tmp_path / SANDBOX_STATE).exists()
    env = {**airflow_env(), "AIRFLOW_HOME": str(tmp_path)}
    fresh = _accounts({k: v for k, v in env.items() if not k.startswith("AIRFLOW_CONN_")},
                      Namespace(fresh=True, customers=200))
    try:
        assert not (tmp_path / SANDBOX_STATE).exists() and not fresh.ometria.contacts  # new accounts, no history
    finally:
        fresh.stop()


def test_make_events_ends_with_the_delivery_report_and_what_the_sandbox_holds(tmp_path):
    """`make events` as the user reads it: one claim sent, one held with its reason, counts per rule."""
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    with Sandbox(customers=200, state_file=tmp_path / "sandbox.json") as sandbox:  # the accounts the run finds
        sent = sandbox.antavo.claim_reward("c00000001", "rw-coffee", at=now - timedelta(minutes=2))
        held = sandbox.antavo.claim_reward("c00000007", "rw-coffee", at=now - timedelta(minutes=1))  # bad email
        sandbox.antavo.add_event("c00000002", "point_add", {"points": 50}, at=now - timedelta(minutes=1))
    shown = make_run(tmp_path, "--dag", "events")
    report = shown[shown.index("Antavo → Ometria event triggers"):]
    lines = [line.strip() for line in report.splitlines()]
    assert lines[1].startswith("reward_claimed → loyalty_reward_claimed")
    assert "matched             2" in lines and "unaccounted         0" in lines
    assert "already sent        0   (by an earlier run: not sent again)" in lines
    assert next(x for x in lines if x.startswith("sent ")).startswith("sent                1   (1 accepted, 0 rejected")
    assert next(x for x in lines if x.startswith("held ")) == "held                1   (not sendable as they are: reasons below)"
    assert f"reward_claimed:{held['id']}: customer c00000007: email: email = 'ana.7.example.com' is not an email " \
           "address" in lines
    assert "The Ometria sandbox now holds 1 contacts and 1 custom events (1 loyalty_reward_claimed)." in lines
    assert "{'rule'" not in shown  # no raw dict in the output
    assert "    matched             2" in (tmp_path / "last_run.log").read_text()  # the deliver task's log: the same
    with Sandbox(customers=200, state_file=tmp_path / "sandbox.json") as after:
        assert list(after.ometria.events) == [f"reward_claimed:{sent['id']}"]
