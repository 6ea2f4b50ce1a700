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


# -- bad input ---------------------------------------------------------------------------------
BAD_INPUTS = {  # name → (what is wrong, the check that must hold the customer back)
    "malformed email": ({"email": "not-an-email"}, "email_format"),
    "missing email": ({"email": None}, "email_missing"),
    "impossible date": ({"birth_date": "1990-02-30"}, "date_format"),
    "malformed date": ({"birth_date": "17/05/1990"}, "date_format"),
    "malformed phone": ({"mobile_phone": "call me maybe"}, "phone"),
    "unknown country": ({"country": "Narnia"}, "country"),
    "record over 60 KB": ({"properties": {"city": "x" * 70_000}}, "record_too_large"),
    "text where a number belongs": ({"purchase_count": "many"}, "type"),
    "control characters": ({"first_name": "Bell\x07e"}, "control_characters"),
    "missing id": ({"id": None}, "id_missing"),
    "duplicate id": ({}, "id_duplicate"),
}


def customer(cid: str | None, **changes) -> dict:
    """A valid normalised customer for the shipped mapping, with unicode in its names, then `changes`."""
    base = {"id": cid, "email": f"{cid}@example.com", "first_name": "Zoë 🎁 Ñandú", "last_name": "O'Brien-Łukasz",
            "birth_date": "1990-05-17", "country": "GB", "mobile_phone": "+447700900123",
            "created_at": "2026-01-01T00:00:00+00:00", "score": 10, "spent": 1, "purchase_count": 2,
            "purchase_last_date": "2026-01-02", "external_ids": {"crm_id": f"CRM-{cid}"},
            "properties": {"city": "Kraków", "favourite_store": "s1", "newsletter": True}}
    return {**base, **changes}


def bad_input_population(per_class: int = 3, valid: int = 30) -> tuple[list[dict], list[str | None]]:
    """(customers, the bad-input class of each or None for a valid one)."""
    customers, classes = [customer(f"ok-{i}") for i in range(valid)], [None] * valid
    for name, (changes, _) in BAD_INPUTS.items():
        for n in range(per_class):
            cid = "twin" if name == "duplicate id" else f"{name.replace(' ', '-')}-{n}"
            customers.append(customer(cid, **changes))
            classes.append(name)
    return customers, classes


def run_bad_inputs() -> list[tuple[str, int, int, int]]:
    """(class, held back by the expected check, delivered, lost) for each bad-input class, then the valid ones."""
    from antavo_ometria.pipeline import prepare_contacts
    from antavo_ometria.transform import customer_columns

    mapping = load_contact_mapping(PROJECT / "include" / "mappings")
    customers, classes = bad_input_population()
    _, _, gate = prepare_contacts(customer_columns(customers, mapping.loyalty_fields), mapping, {"twin"})
    rows = []
    for name in [*BAD_INPUTS, None]:
        positions = [i for i, c in enumerate(classes) if c == name]
        check = BAD_INPUTS[name][1] if name else None
        held = sum(1 for i in positions if check in {f["check"] for f in gate.failures.get(i, [])})
        delivered = sum(1 for i in positions if gate.valid.iloc[i])
        lost = len(positions) - held - delivered if name else len(positions) - delivered
        rows.append((name or "valid customers (unicode names)", held, delivered, lost))
    return rows
