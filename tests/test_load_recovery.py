"""A load killed halfway (a real SIGKILL) and started again delivers every contact once, losing none."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from antavo_ometria.ometria.client import OmetriaClient, OmetriaConfig
from antavo_ometria.sync.contacts.extract import extract
from antavo_ometria.sync.contacts.load import load_staged
from antavo_ometria.sync.contacts.plan import plan_run
from antavo_ometria.sync.contacts.prepare import transform_staged
from antavo_ometria.sync.contacts.report import build_report, format_report
from antavo_ometria.sync.contacts.staged_files import read_journal
from antavo_ometria.sync.store.state import StateStore, StateStoreUnavailable
from antavo_ometria.sync.tables.mapping import load_contact_mapping
from antavo_ometria_tools.sandbox import OMETRIA_KEY

PROJECT = Path(__file__).resolve().parents[1]
CHILD = """
import sys, json
from pathlib import Path
from antavo_ometria.ometria.client import OmetriaClient, OmetriaConfig
from antavo_ometria.sync.contacts.load import load_staged
from antavo_ometria_tools.sandbox import OMETRIA_KEY
from antavo_ometria.sync.store.state import StateStore
staging, url, state, plan = sys.argv[1:5]
load_staged(Path(staging), OmetriaClient(OmetriaConfig(OMETRIA_KEY, url, requests_per_second=0)), json.loads(plan),
            StateStore(state))
"""


@pytest.fixture
def staged(tmp_path, antavo_client, state_url):
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    store = StateStore(state_url)
    store.migrate()
    plan = plan_run(store, mapping, "antavo_ometria_contacts", "run-1")
    staging = tmp_path / "staging"
    extract(antavo_client, staging, plan)
    transformed = transform_staged(staging, mapping, plan, store)
    assert transformed.changed == 290
    return staging, plan, store


def load_killed_at_third_push(sandbox, staging, state_url: str, plan) -> subprocess.Popen:
    """The load in a process of its own, killed (SIGKILL) while its third push hangs, never processed."""
    sandbox.ometria.faults.add({"path": "/v2/push", "every": 3, "count": 1, "delay": 30, "drop": True})
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(staging), sandbox.ometria_url, state_url,
                              json.dumps(plan.as_dict())])
    deadline = time.monotonic() + 30
    while sandbox.ometria.faults.injected == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox.ometria.faults.injected == 1, "the load never reached its third batch"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    return child


def test_killed_load_resumes_without_loss_or_repeats(staged, sandbox, state_url):
    staging, plan, store = staged
    child = load_killed_at_third_push(sandbox, staging, state_url, plan)
    assert child.returncode == -signal.SIGKILL
    assert [len(e["ids"]) for e in read_journal(staging)] == [100, 100]
    assert len(sandbox.ometria.contacts) == 200

    client = OmetriaClient(OmetriaConfig(OMETRIA_KEY, sandbox.ometria_url, requests_per_second=0))
    loaded = load_staged(staging, client, plan, store)
    assert loaded.sent == loaded.accepted == 290 and loaded.delivered_earlier == 200
    assert len(sandbox.ometria.contacts) == 290
    assert set(sandbox.ometria.received.values()) == {1}  # no contact was sent twice
    assert store.contacts.known_count() == 290


def test_a_clear_of_only_the_load_says_it_sent_nothing_again(staged, sandbox):
    # a Clear of only `load` in a completed run runs the load again with the same plan (the same attempt)
    staging, plan, store = staged
    client = OmetriaClient(OmetriaConfig(OMETRIA_KEY, sandbox.ometria_url, requests_per_second=0))
    first = load_staged(staging, client, plan, store)
    assert (first.sent, first.delivered_earlier) == (290, 0)
    pushes = sandbox.ometria.pushes
    again = load_staged(staging, client, plan, store)
    assert sandbox.ometria.pushes == pushes and set(sandbox.ometria.received.values()) == {1}
    assert (again.sent, again.accepted, again.delivered_earlier) == (290, 290, 290)
    transformed = {"customers": 300, "valid": 290, "changed": 290, "unchanged": 0, "quarantined": 10,
                   "quarantine_reasons": {}, "quality": {}, "mapping_version": plan.mapping_version,
                   "payload_mode": "legacy"}
    report = build_report(staging, plan, {"path": "", "customers": 300, "mode": "full", "duplicate_ids": 0},
                          transformed, again)
    assert report["delivered_earlier"] == 290 and report["status"] == "success"
    assert "all by an earlier try of this load: this try sent none again" in format_report(report)


def test_unreachable_state_store_fails_clearly_before_anything_is_sent(sandbox):
    store = StateStore("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(StateStoreUnavailable, match="state store .* is unavailable"):
        store.migrate()
    assert sandbox.ometria.pushes == 0


def test_plan_backfill_and_manual_runs(state_url):
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    store = StateStore(state_url)
    store.migrate()
    first = plan_run(store, mapping, "d", "r1", (datetime(2026, 3, 1, 11, tzinfo=UTC),
                                                  datetime(2026, 3, 1, 12, tzinfo=UTC)))
    assert first.mode == "full" and first.send_unchanged
    store.runs.finish("d", "r1", "success")
    backfill = plan_run(store, mapping, "d", "r2", (datetime(2026, 2, 1, 11, tzinfo=UTC),
                                                     datetime(2026, 2, 1, 12, tzinfo=UTC)), run_type="backfill")
    assert backfill.mode == "incremental" and backfill.send_unchanged  # a backfill re-sends its interval
    assert backfill.since == "2026-02-01T10:50:00+00:00" and backfill.until == "2026-02-01T12:00:00+00:00"
    store.runs.finish("d", "r2", "success")
    manual = plan_run(store, mapping, "d", "r3")  # no data interval: resume where syncing got to
    assert manual.mode == "incremental" and not manual.send_unchanged
    assert manual.since == "2026-03-01T11:50:00+00:00"
