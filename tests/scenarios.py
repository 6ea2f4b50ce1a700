"""Fault scenarios: a full contact sync and a batch of reward claims against a sandbox that misbehaves.

Each scenario ends by comparing what the Ometria sandbox holds with what it should hold. Used by
tests/test_reliability.py and by benchmarks/reliability.py (which writes the reliability table).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from antavo_ometria.antavo import AntavoClient, AntavoConfig
from antavo_ometria.event_rules import load_rules
from antavo_ometria.events import deliver
from antavo_ometria.mapping import load_contact_mapping
from antavo_ometria.ometria import OmetriaClient, OmetriaConfig
from antavo_ometria.pipeline import build_report, extract, load_staged, plan_run, transform_staged
from antavo_ometria.sandbox import ANTAVO_ENVIRONMENT, ANTAVO_KEY, ANTAVO_SECRET, OMETRIA_KEY, Sandbox
from antavo_ometria.sandbox.population import defects_of
from antavo_ometria.state import StateStore
from antavo_ometria.transport import RetryPolicy

PROJECT = Path(__file__).resolve().parents[1]
CUSTOMERS = 2500  # three Read API pages
CLAIMS = 20
FAST_RETRIES = RetryPolicy(attempts=6, backoff=0.05, max_backoff=0.5)

PUSH = "/v2/push"
# name → faults injected into (Antavo, Ometria)
SCENARIOS: dict[str, tuple[list[dict], list[dict]]] = {
    "no fault": ([], []),
    "Ometria 429 on every 3rd push, no Retry-After": ([], [{"status": 429, "every": 3, "count": 10, "path": PUSH}]),
    "Ometria 429 with Retry-After: 1": ([], [{"status": 429, "retry_after": "1", "every": 4, "count": 4,
                                              "path": PUSH}]),
    "Ometria queue full (429, X-QueueSize-Remaining: 0)": ([], [{"status": 429, "every": 5, "count": 3, "path": PUSH,
                                                                 "headers": {"X-QueueSize-Limit": "50000",
                                                                             "X-QueueSize-Remaining": "0"}}]),
    "Ometria 500 and 503 responses": ([], [{"status": 500, "every": 4, "count": 3, "path": PUSH},
                                           {"status": 503, "every": 5, "count": 3, "path": PUSH}]),
    "Ometria responds after the client timeout": ([], [{"delay": 2.5, "every": 6, "count": 2, "path": PUSH}]),
    "Ometria drops connections": ([], [{"drop": True, "every": 3, "count": 5, "path": PUSH}]),
    "Antavo 429 mid-extraction": ([{"status": 429, "every": 2, "count": 2, "path": "/v1/customers"},
                                   {"status": 429, "every": 3, "count": 2, "path": "/customers"}], []),
    "Antavo 5xx mid-extraction": ([{"status": 503, "every": 2, "count": 2, "path": "/v1/customers"},
                                   {"status": 502, "every": 2, "count": 3, "path": "/customers"}], []),
    "Antavo error inside a 200": ([{"status": 200, "every": 2, "count": 2, "path": "/v1/customers",
                                    "body": {"error": {"message": "temporarily unavailable", "code": 1}}}], []),
    "Antavo empty page that should not be empty": ([{"status": 200, "every": 2, "count": 1, "path": "/v1/customers",
                                                     "body": {"status": "success", "payload": {"customers": []},
                                                              "metadata": {"pagination": {"next": "/v1/customers"}}}}],
                                                   []),
}


@dataclass
class Outcome:
    scenario: str
    contacts_expected: int
    contacts_delivered: int
    events_expected: int
    events_delivered: int
    lost: int
    stored_twice: int
    sent_twice: int  # pushed again after a response was lost; harmless because Ometria upserts by id
    faults_injected: int


def run(name: str) -> Outcome:
    antavo_faults, ometria_faults = SCENARIOS[name]
    work = Path(tempfile.mkdtemp(prefix="scenario-"))
    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    (rule,) = load_rules(PROJECT / "include" / "mappings")
    with Sandbox(customers=CUSTOMERS) as sandbox:
        now = datetime.now(UTC)
        claims = [sandbox.antavo.claim_reward(f"c{i:08d}", "rw-coffee", at=now - timedelta(minutes=30 - i))
                  for i in range(1, 200) if not defects_of(i)][:CLAIMS]
        for fault in antavo_faults:
            sandbox.antavo.faults.add(fault)
        for fault in ometria_faults:
            sandbox.ometria.faults.add(fault)
        antavo = AntavoClient(AntavoConfig(sandbox.antavo_url, ANTAVO_KEY, ANTAVO_SECRET, ANTAVO_ENVIRONMENT,
                                           read_api_url=sandbox.antavo_url, requests_per_second=0,
                                           retry=FAST_RETRIES))
        ometria = OmetriaClient(OmetriaConfig(OMETRIA_KEY, sandbox.ometria_url, requests_per_second=0, timeout=1.0,
                                              retry=FAST_RETRIES))
        store = StateStore(f"sqlite:///{work / 'state.db'}")
        store.migrate()
        staging = work / "staging"
        plan = plan_run(store, mapping, "antavo_ometria_contacts", "run-1")
        extracted = extract(antavo, staging, plan)
        transformed = transform_staged(staging, mapping, plan, store)
        loaded = load_staged(staging, ometria, plan, store)
        build_report(staging, plan, extracted, transformed, loaded, store)
        deliver(rule, antavo, ometria, store, mapping, "run-1")

        expected_contacts = {c["_id"] for i, c in enumerate(sandbox.antavo.customers) if not defects_of(i)}
        held = {cid for _, cid in sandbox.ometria.contacts}
        expected_events = {e["id"] for e in claims}
        events = set(sandbox.ometria.events)
        received = sandbox.ometria.received
        return Outcome(
            scenario=name,
            contacts_expected=len(expected_contacts),
            contacts_delivered=len(held & expected_contacts),
            events_expected=len(expected_events),
            events_delivered=len(events & expected_events),
            lost=len(expected_contacts - held) + len(expected_events - events),
            stored_twice=len(held) - len(set(held)) + len(events) - len(set(events)),
            sent_twice=sum(1 for count in received.values() if count > 1),
            faults_injected=sandbox.antavo.faults.injected + sandbox.ometria.faults.injected,
        )
