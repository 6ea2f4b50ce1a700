"""The columnar pass writes what the pandas path writes for the same customer: the same body, or the same
quarantine. Each case here is a value on which the two paths disagreed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from antavo_ometria.antavo.records import normalise_customer
from antavo_ometria.sync.contacts.prepare import transform_staged
from antavo_ometria.sync.contacts.staged_files import CONTACTS, QUARANTINE, read_contacts, write_customers
from antavo_ometria.sync.contacts.step_results import Plan
from antavo_ometria.sync.tables.mapping import load_contact_mapping
from antavo_ometria_tools.population import make_population

MAPPING = Path(__file__).resolve().parent / "golden" / "mappings" / "v2"


def run_transform(staging: Path, changes: dict) -> tuple[dict[str, dict], set[str]]:
    """(contact bodies by id, quarantined ids) for one customer of the sample population with `changes`."""
    customer = normalise_customer(make_population(1)[0])
    customer.update(changes)
    staging.mkdir(parents=True, exist_ok=True)
    write_customers(staging, [[customer]])
    mapping = load_contact_mapping(MAPPING)
    plan = Plan("parity", "parity", "parity", "full", "parity", None, True, False, mapping.version, None,
                "2026-12-01T00:00:00+00:00", None)
    transform_staged(staging, mapping, plan, threads=1)
    bodies = {i: json.loads(body) for i, body, _ in read_contacts(staging)}
    held = {json.loads(line)["id"] for line in (staging / QUARANTINE).read_text(encoding="utf-8").splitlines()}
    (staging / CONTACTS).unlink()
    return bodies, held


@pytest.mark.parametrize("value", ["2026-06-01T24:00:00Z", "2026-06-01T10:00:00+99:00", "2026-06-01T10:00:00+00:60"])
def test_an_impossible_time_is_held_not_moved_to_another_day(value, tmp_path):
    """The pandas path (and the engine before the columnar pass) quarantines a date of birth with hour 24 or an
    offset beyond ±23:59; DuckDB's cast rolls it into a valid-looking other date, which would be sent."""
    bodies, held = run_transform(tmp_path, {"birth_date": value})
    assert held, f"{value!r} was sent as date_of_birth {[b.get('date_of_birth') for b in bodies.values()]}"


SCRIPT = """
import json
from pathlib import Path
from test_engine_parity import run_transform
bodies, held = run_transform(Path({staging!r}), {{"created_at": "2026-06-01T10:00:00Z"}})
print(json.dumps([b.get("timestamp_acquired") for b in bodies.values()]))
"""


@pytest.mark.parametrize("zone", ["America/New_York", "Europe/London"])
def test_a_date_time_is_utc_whatever_the_workers_time_zone(zone, tmp_path):
    """DuckDB casts TIMESTAMPTZ to TIMESTAMP in the process's local time zone (ICU): a worker not on UTC would
    send every date-time shifted, and every contact's hash would change."""
    script = SCRIPT.format(staging=str(tmp_path / "s"))  # run from tests/, which `-c` puts first on the import path
    out = subprocess.run([sys.executable, "-c", script], env={"TZ": zone, "PATH": "/usr/bin:/bin"},
                         cwd=Path(__file__).resolve().parent,
                         capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["2026-06-01T10:00:00+00:00"]


def test_a_record_over_60000_bytes_is_held_and_the_others_still_go(tmp_path):
    """A customer whose values are all fine but whose body is over Ometria's record size is quarantined
    (record_too_large) by the pandas path, and the step goes on."""
    bodies, held = run_transform(tmp_path, {"properties": {"city": "x" * 60_000, "newsletter": True}})
    assert held and not bodies
