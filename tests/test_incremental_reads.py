"""Incremental runs read the changed customers the cheaper way: a request per profile, or a Read API scan.

Either way the same customers are staged and the same contacts come out; the report says which way and why."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from antavo_ometria.sync.contacts.extract import choose_reads, extract
from antavo_ometria.sync.contacts.prepare import transform_staged
from antavo_ometria.sync.contacts.staged_files import read_contacts
from antavo_ometria.sync.contacts.step_results import Plan
from antavo_ometria.sync.tables.mapping import load_contact_mapping

PROJECT = Path(__file__).resolve().parents[1]
SINCE = datetime(2026, 6, 1, tzinfo=UTC)


def test_the_cheaper_way_is_chosen_from_the_counts():
    assert choose_reads(12_000, 1_000_000)[0] == "scan"  # ~1,021 pages against 12,000 profile requests
    assert choose_reads(500, 1_000_000)[0] == "profiles"
    assert choose_reads(1_021, 1_000_000)[0] == "profiles"  # a tie is no reason to read every page
    assert choose_reads(1_022, 1_000_000)[0] == "scan"
    way, why = choose_reads(50, None)
    assert way == "profiles" and "no full load yet" in why
    assert "12,000 profile reads against a Read API scan of ~1,021 pages (1,000,000 customers)" in \
        choose_reads(12_000, 1_000_000)[1]


def plan(previous_full_count: int | None) -> Plan:
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    return Plan("dag", "run", "attempt", "incremental", None, None, True, False, mapping.version,
                SINCE.isoformat(), (SINCE + timedelta(hours=1)).isoformat(), previous_full_count)


@pytest.fixture
def changed(sandbox):
    """40 customers changed in the window; one of them was deactivated, so a scan of active customers misses it."""
    at = SINCE + timedelta(minutes=10)
    ids = [f"c{i:08d}" for i in range(3, 300, 7)][:40]
    for i in ids:
        sandbox.antavo.touch(i, {"first_name": f"Changed {i}"}, at=at)
    sandbox.antavo.touch(ids[-1], {"status": "inactive"}, at=at)
    return ids


@pytest.mark.parametrize("mappings", [PROJECT / "include" / "mappings",
                                      PROJECT / "include" / "mappings" / "examples" / "v2"], ids=["legacy", "v2"])
def test_a_scan_and_profile_reads_stage_the_same_customers_and_contacts(sandbox, antavo_client, tmp_path, mappings):
    """Over three Read API pages, with changed customers where pages overlap and at both ends, and one
    deactivated (the scan of active customers misses it; it is read by profile)."""
    from antavo_ometria_tools.population import make_population

    sandbox.antavo.customers = make_population(2100)
    at = SINCE + timedelta(minutes=10)
    changed = [f"c{i:08d}" for i in (0, 1, *range(975, 1005), *range(1955, 1985), 2098, 2099)]
    for i in changed:
        sandbox.antavo.touch(i, {"first_name": f"Changed {i}"}, at=at)
    sandbox.antavo.touch(changed[40], {"status": "inactive"}, at=at)
    mapping = load_contact_mapping(mappings)
    staged = {}
    for name, population in (("profiles", None), ("scan", 2100)):
        staging = tmp_path / name
        before = sandbox.antavo.requests
        extracted = extract(antavo_client, staging, plan(population), paths=mapping.loyalty_fields)
        requests_made = sandbox.antavo.requests - before
        transform_staged(staging, mapping, plan(population))
        staged[name] = {"requests": requests_made, "extracted": extracted,
                        "contacts": [(i, body) for i, body, _ in read_contacts(staging)],
                        "held": sorted((staging / "quarantine.ndjson").read_text().splitlines())}
    profiles, scan = staged["profiles"], staged["scan"]
    assert profiles["extracted"].reads == "profiles" and scan["extracted"].reads == "scan"
    # the inactive one is read (by profile), and is no longer staged as a customer to send: it leaves
    assert profiles["extracted"].customers == scan["extracted"].customers == len(changed) - 1
    for name in ("profiles", "scan"):
        assert (tmp_path / name / "inactive.ndjson").read_text().strip() == json.dumps({"id": changed[40]}).replace(" ", "")
    assert profiles["requests"] == 1 + len(changed)  # a search page, then one request per profile
    # a search page, three Read API pages (and up to concurrency - 1 read ahead past the end), the one it missed
    assert 1 + 3 + 1 <= scan["requests"] <= 1 + 3 + (antavo_client.config.concurrency - 1) + 1
    assert sorted(scan["contacts"]) == sorted(profiles["contacts"])  # byte for byte
    assert scan["held"] == profiles["held"]
    ids = [i for i, _ in scan["contacts"]]
    assert len(ids) == len(set(ids)) and len(ids) + len(scan["held"]) == len(changed) - 1
    assert all(b"Changed" in body for _, body in scan["contacts"])
    assert "1 the scan did not list (active status), read one by one" in scan["extracted"].reads_reason


def test_the_report_says_how_the_changed_customers_were_read(sandbox, antavo_client, changed, tmp_path):
    from antavo_ometria.sync.contacts.report import build_report, format_report

    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    planned = replace(plan(300), dry_run=True)
    extracted = extract(antavo_client, tmp_path, planned, paths=mapping.loyalty_fields)
    transformed = transform_staged(tmp_path, mapping, planned)
    report = build_report(tmp_path, planned, extracted, transformed, None)
    assert report["reads"] == extracted.reads_reason
    assert "read by      scan: 40 profile reads against a Read API scan of ~1 pages" in format_report(report)
    assert "1 the scan did not list" in report["reads"]
    assert json.loads((tmp_path / "report.json").read_text())["reads"] == report["reads"]


def test_the_sandbox_answers_after_its_latency_and_requests_overlap():
    from antavo_ometria_tools.sandbox import Sandbox

    with Sandbox(customers=10, antavo_latency=0.3) as slow:
        url = f"{slow.antavo_url}/customers?updated_at.gt=2026-01-01T00:00:00Z"  # unsigned: refused, after the wait
        answers: list[int] = []
        started = time.monotonic()
        threads = [threading.Thread(target=lambda: answers.append(requests.get(url).status_code)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
    assert answers == [401] * 4
    assert 0.3 <= elapsed < 1.2  # four requests of 0.3 s each, in flight together
