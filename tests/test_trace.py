"""Trace one customer: each closing verdict, on real runs against the sandbox."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from antavo_ometria.sync.contacts.extract import extract
from antavo_ometria.sync.contacts.load import load_staged
from antavo_ometria.sync.contacts.plan import plan_run
from antavo_ometria.sync.contacts.prepare import transform_staged
from antavo_ometria.sync.contacts.report import report_run
from antavo_ometria.sync.events.delivery import deliver
from antavo_ometria.sync.events.rules import load_rules
from antavo_ometria.sync.store.state import StateStore
from antavo_ometria.sync.tables.mapping import load_contact_mapping
from antavo_ometria.sync.trace import format_trace, trace

PROJECT = Path(__file__).resolve().parents[1]
MAPPINGS = PROJECT / "include" / "mappings"
DAG = "antavo_ometria_contacts"


@pytest.fixture
def synced(sandbox, antavo_client, ometria_client, state_url, tmp_path):
    """A deployment after one full sync; `again()` runs another."""
    store = StateStore(state_url)
    store.migrate()
    mapping = load_contact_mapping(MAPPINGS)
    root = tmp_path / "staging"

    def again(run_id: str) -> dict:
        staging = root / DAG / run_id
        steps = {"plan": plan_run(store, mapping, DAG, run_id)}
        steps["extract"] = extract(antavo_client, staging, steps["plan"], paths=mapping.loyalty_fields)
        steps["transform"] = transform_staged(staging, mapping, steps["plan"], store)
        steps["load"] = load_staged(staging, ometria_client, steps["plan"], store)
        return report_run(staging, steps, store, DAG, run_id)

    sandbox.ometria.reject_ids.add("c00000020")  # an email another contact already owns
    again("run-1")
    return store, mapping, root, again


def test_sent_and_current_then_changed_since(synced, antavo_client, sandbox):
    store, mapping, root, again = synced
    now = trace("c00000001", store, mapping, antavo_client, root)
    assert now.verdict.startswith("sent and current (last sent ") and not now.differs
    assert now.last_sent["run_id"] == "run-1" and now.last_sent["request_id"]
    assert now.last_sent["payload"] == now.record  # the payload itself is kept, not only its hash
    sandbox.antavo.touch("c00000001", {"first_name": "Anneliese"})
    later = trace("c00000001", store, mapping, antavo_client, root)
    assert later.verdict == "sent, but changed since: the next run sends it"
    assert [d for d in later.differs if d.startswith("firstname:")] == [
        f"firstname: {now.record['firstname']!r} → 'Anneliese'"]
    again("run-2")
    assert trace("c00000001", store, mapping, antavo_client, root).verdict.startswith("sent and current")


def test_found_by_email(synced, antavo_client, sandbox):
    store, mapping, root, _ = synced
    email = sandbox.antavo.by_id["c00000003"]["email"]
    found = trace(email, store, mapping, antavo_client, root)
    assert found.customer_id == "c00000003" and found.verdict.startswith("sent and current")


def test_held_back_with_the_reason_and_released_once_fixed(synced, antavo_client, sandbox):
    store, mapping, root, again = synced
    held = trace("c00000007", store, mapping, antavo_client, root)  # a malformed email
    assert held.verdict == "held back: email: email = 'ana.7.example.com' is not an email address"
    assert [f["verdict"] for f in held.fields if f["remote_field"] == "email"] == [held.problems[0]]
    assert [(h["kind"], h["released_at"]) for h in held.history] == [("quarantined", None)]
    assert "[not released]" in format_trace(held)
    sandbox.antavo.touch("c00000007", {"email": "ana.7@example.com"})
    again("run-2")
    fixed = trace("c00000007", store, mapping, antavo_client, root)
    assert fixed.verdict.startswith("sent and current")
    assert fixed.history[0]["kind"] == "quarantined" and fixed.history[0]["released_at"] is not None
    assert "released" in format_trace(fixed)


def test_rejected_by_ometria(synced, antavo_client):
    store, mapping, root, _ = synced
    rejected = trace("c00000020", store, mapping, antavo_client, root)
    assert rejected.verdict.startswith("owed: rejected by Ometria (request ")
    assert "(1 tries); tried again from " in rejected.verdict  # when, and what to do
    assert "fix the field in Ometria or its row in contacts.csv" in rejected.verdict


def test_never_seen_by_the_sync(synced, antavo_client):
    store, mapping, root, _ = synced
    assert trace("c09999999", store, mapping, antavo_client, root).verdict == (
        "never seen by the sync: Antavo has no customer c09999999")
    assert trace("nobody@example.com", store, mapping, antavo_client, root).verdict == (
        "Antavo has no customer with the email 'nobody@example.com'")
    with pytest.raises(ValueError, match="give an Antavo customer id or email"):
        trace("  ", store, mapping, antavo_client, root)  # never "everyone's history"


def test_sent_before_but_deleted_since_and_not_sent_yet(synced, antavo_client, sandbox):
    store, mapping, root, _ = synced
    sandbox.antavo.customers.remove(sandbox.antavo.by_id.pop("c00000002"))
    deleted = trace("c00000002", store, mapping, antavo_client, root)
    assert deleted.verdict.startswith("sent before, but Antavo no longer has her: nothing more is sent (last sent ")
    new = dict(sandbox.antavo.by_id["c00000001"], _id="c00009999", email="new.9999@example.com")
    sandbox.antavo.customers.append(new)
    sandbox.antavo.by_id["c00009999"] = new
    sandbox.antavo.changed()
    assert trace("c00009999", store, mapping, antavo_client, root).verdict.startswith("not sent yet: ")


def test_rejected_then_changed_says_the_next_run_sends_it(synced, antavo_client, sandbox):
    store, mapping, root, _ = synced
    sandbox.antavo.touch("c00000020", {"first_name": "Renamed"})
    assert trace("c00000020", store, mapping, antavo_client, root).verdict.startswith(
        "changed since her last try: the next run sends it (owed: rejected by Ometria")


def test_antavo_unreachable_and_no_staging_file_is_not_called_deleted(synced, sandbox, antavo_client, tmp_path):
    store, mapping, _, _ = synced
    sandbox.antavo.faults.add({"status": 503, "count": 10**6, "path": "/"})
    unknown = trace("c00000002", store, mapping, antavo_client, tmp_path / "empty")
    assert unknown.verdict.startswith("unknown today: Antavo could not be read and no staging file holds her "
                                      "(last sent ")


def test_an_event_held_because_its_customer_failed_the_gate(synced, sandbox, antavo_client, ometria_client):
    store, mapping, root, _ = synced
    rule = next(r for r in load_rules(MAPPINGS) if r.name == "reward_claimed")
    claim = sandbox.antavo.claim_reward("c00000007", "rw-coffee", at=datetime.now(UTC) - timedelta(minutes=2))
    sent = sandbox.antavo.claim_reward("c00000001", "rw-coffee", at=datetime.now(UTC) - timedelta(minutes=1))
    deliver(rule, antavo_client, ometria_client, store, mapping, "ev-1")
    held = trace("c00000007", store, mapping, antavo_client, root)
    assert [(e["event_id"], e["status"].split(":")[0]) for e in held.events] == [(f"reward_claimed:{claim['id']}", "held")]
    assert "is not an email address" in held.events[0]["status"]
    delivered = trace("c00000001", store, mapping, antavo_client, root)
    assert [(e["event_id"], e["status"]) for e in delivered.events] == [(f"reward_claimed:{sent['id']}", "sent")]


def test_when_antavo_cannot_be_reached_the_latest_staging_file_answers(synced, sandbox, antavo_client):
    store, mapping, root, _ = synced
    sandbox.antavo.faults.add({"status": 503, "count": 10**6, "path": "/"})
    offline = trace("c00000002", store, mapping, antavo_client, root)
    assert "Antavo could not be read" in offline.source and "staging file" in offline.source
    assert "run-1/customers.ndjson of 20" in offline.source  # with its date
    assert offline.verdict.startswith("sent and current")


def test_the_dashboard_page_shows_the_same(synced, antavo_client):
    from antavo_ometria.airflow.dashboard import render_trace

    store, mapping, root, _ = synced
    page = render_trace(trace("c00000007", store, mapping, antavo_client, root))
    assert "Customer c00000007" in page and "held back: email: email = &#x27;ana.7.example.com&#x27;" in page


def test_last_payloads_are_kept_compressed(synced):
    store, *_ = synced
    import sqlalchemy as sa

    contacts = store.table("sync_contacts")
    with store.engine.connect() as conn:
        sizes = [len(p) for (p,) in conn.execute(sa.select(contacts.c.payload)) if p]
    assert len(sizes) > 280 and sum(sizes) / len(sizes) < 400  # bytes a contact; see the README for a million


def test_a_customer_fixed_back_to_what_was_sent_is_no_longer_held(synced, antavo_client, sandbox):
    store, mapping, root, again = synced
    good = sandbox.antavo.by_id["c00000004"]["email"]
    sandbox.antavo.touch("c00000004", {"email": "broken.example.com"})
    again("run-2")
    assert "c00000004" in store.held.ids("quarantined")
    sandbox.antavo.touch("c00000004", {"email": good})  # the same payload as was sent: not sent again
    again("run-3")
    assert "c00000004" not in store.held.ids("quarantined")
    fixed = trace("c00000004", store, mapping, antavo_client, root)
    assert fixed.verdict.startswith("sent and current") and fixed.history[0]["released_at"] is not None
    assert store.held.prune_released(datetime.now(UTC) + timedelta(seconds=1)) >= 1
    assert trace("c00000004", store, mapping, antavo_client, root).history == []
