"""`make preview` and `make diff`: which customers they map, and what they read from Antavo to get them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from antavo_ometria_tools.sandbox import ANTAVO_SECRET

PROJECT = Path(__file__).resolve().parents[1]


def screen(command: list[str], home: Path, antavo: str | None = None) -> subprocess.CompletedProcess:
    """A command run as a user runs it, with only the Antavo connection set (or none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env["AIRFLOW_HOME"] = str(home)  # no Airflow database here: the environment decides, as for `make run`
    if antavo is not None:
        env["AIRFLOW_CONN_ANTAVO_DEFAULT"] = antavo
    return subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "antavo_ometria_tools.cli", *args]


def assert_read_only_and_bounded(seen: list[tuple[str, str]], limit: int) -> None:
    """One signed GET of one Read API page, no bigger than asked for."""
    assert [method for method, _ in seen] == ["GET"], seen
    target = urlsplit(seen[0][1])
    query = dict(parse_qsl(target.query))
    assert target.path == "/v1/customers" and int(query["limit"]) == limit and query["offset"] == "0", seen


def test_make_preview_reads_a_few_real_customers_when_the_antavo_connection_is_set(sandbox, tmp_path):
    sandbox.antavo.touch("c00000001", {"first_name": "Anneliese"})  # not who the synthetic population holds
    done = screen(["make", "--no-print-directory", "-s", "preview", "N=4"], tmp_path,
                  sandbox.connections()["AIRFLOW_CONN_ANTAVO_DEFAULT"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == (f"Sample: 4 customers read from Antavo at {sandbox.antavo_url} (1 signed read-only "
                        "request: the oldest active customers)")
    assert [line.split()[2] for line in lines if line.startswith("── customer")] == [
        "c00000000", "c00000001", "c00000002", "c00000003"]
    assert "Anneliese" in done.stdout
    assert_read_only_and_bounded(sandbox.antavo.seen, 4)
    assert ANTAVO_SECRET not in done.stdout + done.stderr


def test_make_diff_says_it_maps_the_synthetic_population_when_no_antavo_connection_is_set(tmp_path):
    done = screen(["make", "--no-print-directory", "-s", "diff"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == ("Sample: 200 customers of the synthetic sandbox population: no Antavo "
                                           "connection is set (antavo_default)")


def test_diff_maps_the_same_real_customers_with_the_old_and_the_new_mapping(sandbox, mappings, tmp_path):
    sandbox.antavo.touch("c00000000", {"purchase_count": 987})
    before = tmp_path / "before"
    before.mkdir()
    for name in ("contacts.csv", "settings.toml"):
        (before / name).write_bytes((mappings / name).read_bytes())
    table = mappings / "contacts.csv"
    table.write_text(table.read_text().replace("purchase_count,purchase_count,integer,",
                                               "purchase_count,purchase_count,string,"))
    done = screen(cli("diff", "--before", str(before), "--after", str(mappings), "-n", "20"), tmp_path / "home",
                  sandbox.connections()["AIRFLOW_CONN_ANTAVO_DEFAULT"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"Sample: 20 customers read from Antavo at {sandbox.antavo_url} (1 signed")
    assert '        c00000000: 987 → "987"' in lines
    assert "On 20 sample customers:" in done.stdout
    assert_read_only_and_bounded(sandbox.antavo.seen, 20)


def test_a_refused_antavo_secret_stops_the_preview_instead_of_showing_synthetic_customers(sandbox, tmp_path):
    connection = json.loads(sandbox.connections()["AIRFLOW_CONN_ANTAVO_DEFAULT"])
    connection["password"] = "not-the-secret"
    done = screen(cli("preview", "-n", "3"), tmp_path, json.dumps(connection))
    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr.startswith("✗ Antavo      could not read sample customers:")
    assert "401" in done.stderr
    assert "check connection antavo_default: login = the API key, password = the API secret" in done.stderr
    assert "not-the-secret" not in done.stderr
    assert [method for method, _ in sandbox.antavo.seen] == ["GET"]  # refused once, not retried
