"""What the command line and the run report say on screen when something needs the user's attention."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import requests

from antavo_ometria.sync.contacts.report import format_report
from antavo_ometria_tools.cli import main

PROJECT = Path(__file__).resolve().parents[1]


def test_make_trace_without_an_id_prints_the_usage_line_not_a_traceback(capsys):
    assert main(["trace", ""]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("usage: make trace ID=<Antavo customer id or email>")
    assert "Traceback" not in err


def test_make_trace_without_an_id_through_make():
    done = subprocess.run(["make", "--no-print-directory", "-s", "trace"], cwd=PROJECT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "usage: make trace ID=<Antavo customer id or email>" in done.stderr
    assert "Traceback" not in done.stderr


def held_report(staging: str, kinds: dict[str, int]) -> dict:
    """A run report holding back `kinds` records of each kind, in the order the report lists them."""
    rows = [{"id": f"c{kind[0]}{n:07}", "reasons": [f"{kind} for a reason"]}
            for kind, count in kinds.items() for n in range(count)]
    counts = dict.fromkeys(("extracted", "unchanged", "changed", "sent", "batches", "accepted", "rejected",
                            "quarantined", "failed", "refused_oversized", "unaccounted"), 0)
    return {**counts, "status": "success", "mode": "full", "payload_mode": "legacy", "mapping_version": "abc",
            "quarantine_reasons": {}, "not_delivered": rows, "held_kinds": kinds, "async_errors": [],
            "staging": staging}


def test_the_records_not_listed_are_said_to_be_where_each_kind_is_kept():
    report = held_report("/staging/run-1", {"quarantined": 3, "oversized": 1, "rejected": 2, "failed": 1})
    lines = format_report(report, limit=2).splitlines()
    assert lines[-4:] == [
        "    … 1 more quarantined, in /staging/run-1/quarantine.ndjson",
        "    … 1 more over 60 KB, in /staging/run-1/oversized.ndjson",
        "    … 2 more rejected by Ometria, in the state store (sync_held_records, with their payloads)",
        "    … 1 more not delivered (the next run sends them), in the state store (sync_held_records)",
    ]


def test_rejected_records_are_not_said_to_be_in_the_quarantine_file():
    report = held_report("/staging/run-1", {"quarantined": 0, "oversized": 0, "rejected": 25, "failed": 0})
    text = format_report(report)
    assert "quarantine.ndjson" not in text
    assert text.splitlines()[-1] == ("    … 5 more rejected by Ometria, in the state store (sync_held_records, "
                                     "with their payloads)")


def test_make_ui_runs_airflow_standalone_from_the_virtualenv_in_the_projects_airflow_home(monkeypatch):
    from antavo_ometria_tools.cli import airflow_env, ui_command, ui_login

    for name in ("AIRFLOW_HOME", "AIRFLOW__CORE__DAGS_FOLDER", "AIRFLOW__API__PORT", "AIRFLOW__CORE__AUTH_MANAGER",
                 "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a fresh shell: the virtualenv is not on PATH
    command, env = ui_command(airflow_env())
    bin_dir = Path(command[0]).parent
    assert command[1:] == ["standalone"] and Path(command[0]).name == "airflow" and Path(command[0]).exists()
    assert env["PATH"].split(":")[0] == str(bin_dir)  # standalone starts its components as `airflow …`
    assert env["AIRFLOW_HOME"] == str(PROJECT / ".airflow")
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(PROJECT / "dags")
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith(".SimpleAuthManager")  # the login it prints is that one's
    assert ui_login(env) == ("http://localhost:8080",
                             PROJECT / ".airflow" / "simple_auth_manager_passwords.json.generated")
    make = subprocess.run(["make", "-n", "ui"], cwd=PROJECT, capture_output=True, text=True, timeout=60)
    assert make.returncode == 0 and "-m antavo_ometria_tools.cli ui" in make.stdout


@pytest.mark.airflow
def test_make_ui_starts_the_ui_with_the_sandbox_and_prints_the_url_and_login(tmp_path, sandbox_ports):
    """A real start, bounded: about 25 s on two cores, skipped where a server cannot start in time."""
    import os
    import signal
    import socket
    import sys
    import time

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__API__PORT": str(port)}
    env = {k: v for k, v in env.items() if not k.startswith("AIRFLOW_CONN_")}
    ui = subprocess.Popen([sys.executable, "-m", "antavo_ometria_tools.cli", "ui", "--customers", "50"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any(line.startswith("Airflow UI:") for line in lines):
            line = ui.stdout.readline()
            if not line:
                break
            lines.append(line)
        shown = "".join(lines)
        if "Airflow UI:" not in shown:
            pytest.skip(f"standalone did not start here in time:\n{shown[-2000:]}")
        assert "No real credentials set: using the local sandbox" in shown
        login = json.loads((tmp_path / "simple_auth_manager_passwords.json.generated").read_text())
        assert f"Airflow UI: http://localhost:{port}  (login: user 'admin' password '{login['admin']}'" in shown
        assert requests.get(f"http://localhost:{port}/api/v2/monitor/health", timeout=10).ok
    finally:
        ui.send_signal(signal.SIGTERM)  # the command stops standalone's process group and the sandbox
        assert ui.wait(90) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://localhost:{port}/api/v2/monitor/health", timeout=5)
