"""Fault scenarios: the contact sync and reward-claim delivery against a sandbox that misbehaves, over one
run or several, each step tried again as Airflow would (a retryable failure up to the DAG's retries).

Every scenario ends by counting, per id, what the Ometria sandbox itself accepted (its own log, not the
sync's report): a contact or event that should be there and is not, or is there with stale values, is
*lost*; a custom event accepted again after Ometria had confirmed it, or one contact stored under two
records, is *stored twice*; a record accepted again with an identical payload is *re-sent* (harmless for
contacts, which Ometria upserts by id). Used by tests/test_reliability.py and by benchmarks/reliability.py
(which writes the reliability table).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from antavo_ometria.airflow.dag_defaults import DEFAULT_ARGS
from antavo_ometria.antavo.client import AntavoClient, AntavoConfig
from antavo_ometria.ometria.client import OmetriaClient, OmetriaConfig
from antavo_ometria.problems import ConfigError
from antavo_ometria.sync.contacts.extract import extract
from antavo_ometria.sync.contacts.load import load_staged
from antavo_ometria.sync.contacts.plan import plan_run
from antavo_ometria.sync.contacts.prepare import transform_staged
from antavo_ometria.sync.contacts.quality import QualityGateFailed
from antavo_ometria.sync.contacts.report import RunNotDelivered, report_run
from antavo_ometria.sync.events.delivery import deliver
from antavo_ometria.sync.events.rules import load_rules
from antavo_ometria.sync.store.state import StateStore
from antavo_ometria.sync.tables.mapping import load_contact_mapping
from antavo_ometria.transport import RetryPolicy
from antavo_ometria_tools.population import defects_of
from antavo_ometria_tools.sandbox import ANTAVO_ENVIRONMENT, ANTAVO_KEY, ANTAVO_SECRET, OMETRIA_KEY, Sandbox

PROJECT = Path(__file__).resolve().parents[1]
DAG_ID = "antavo_ometria_contacts"
CUSTOMERS = 2500  # three Read API pages
CLAIMS = 20
FAST_RETRIES = RetryPolicy(attempts=6, backoff=0.05, max_backoff=0.5)
TASK_TRIES = 1 + DEFAULT_ARGS["retries"]  # as the DAGs run each task
FAIL_FAST = (RunNotDelivered, QualityGateFailed, ConfigError)  # the DAGs fail these at once (fail_fast_on)
FOREVER = 10**9  # a fault that outlasts every retry
PUSH = "/v2/push"
LIST_ID = 8400  # the shipped settings' list


def attempt(step: Callable):
    """Run a step as Airflow runs a task: again after a retryable failure, up to the DAG's retries."""
    for tries in range(1, TASK_TRIES + 1):
        try:
            return step()
        except Exception as exc:
            if isinstance(exc, FAIL_FAST) or getattr(exc, "retryable", True) is False or tries == TASK_TRIES:
                raise


class Deployment:
    """What a deployment keeps between runs: the sandbox accounts, one state store, one staging folder."""

    def __init__(self, customers: int = CUSTOMERS):
        self.work = Path(tempfile.mkdtemp(prefix="scenario-"))
        self.sandbox = Sandbox(customers=customers).start()
        self.mappings = self.work / "mappings"
        shutil.copytree(PROJECT / "include" / "mappings", self.mappings)
        self.antavo = AntavoClient(AntavoConfig(self.sandbox.antavo_url, ANTAVO_KEY, ANTAVO_SECRET, ANTAVO_ENVIRONMENT,
                                                read_api_url=self.sandbox.antavo_url, requests_per_second=0,
                                                retry=FAST_RETRIES))
        self.ometria = OmetriaClient(OmetriaConfig(OMETRIA_KEY, self.sandbox.ometria_url, requests_per_second=0,
                                                   timeout=1.0, retry=FAST_RETRIES))
        self.state_file = self.work / "state.db"
        self.store = StateStore(f"sqlite:///{self.state_file}")
        self.store.migrate()
        self.rule = next(r for r in load_rules(self.mappings) if r.name == "reward_claimed")
        self.expected_values: dict[str, dict] = {}  # contact id → field values Ometria must end up with
        self.claims: list[dict] = []
        self.poison_customers: set[str] = set()  # must be held back with a reason, never sent
        self.poison_events: set[str] = set()
        self.leavers: set[str] = set()  # members who left the programme: must leave the list
        self.outages = 0  # faults outside the sandbox's fault list (the state store going away, a field deleted …)

    def close(self) -> None:
        self.sandbox.stop()
        self.store.engine.dispose()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- runs, as the DAGs run them ------------------------------------------------------------
    def sync(self, run_id: str, interval=(None, None), reconcile: bool = False) -> str:
        """One contact-sync run: plan → extract → transform → load, then the report step whatever happened."""
        mapping = load_contact_mapping(self.mappings)
        staging = self.work / "staging" / run_id
        steps: dict = {}
        try:
            steps["plan"] = attempt(lambda: plan_run(self.store, mapping, DAG_ID, run_id, interval,
                                                     reconcile=reconcile))
            steps["extract"] = attempt(lambda: extract(self.antavo, staging, steps["plan"], paths=mapping.loyalty_fields))
            steps["transform"] = attempt(lambda: transform_staged(staging, mapping, steps["plan"], self.store))
            steps["load"] = attempt(lambda: load_staged(staging, self.ometria, steps["plan"], self.store))
        except Exception:
            pass  # that step failed for good; the report step runs all the same (trigger rule all_done)
        try:
            attempt(lambda: report_run(staging, steps, self.store, DAG_ID, run_id))
        except Exception:
            return "failed"
        return "success"

    def deliver_events(self, run_id: str) -> str:
        mapping = load_contact_mapping(self.mappings)
        try:
            attempt(lambda: deliver(self.rule, self.antavo, self.ometria, self.store, mapping, run_id))
        except Exception:
            return "failed"
        return "success"

    # -- what happens in Antavo ------------------------------------------------------------------
    def claim(self, count: int, start: int = 1) -> None:
        now = datetime.now(UTC)
        valid = [i for i in range(start, start + 10 * count) if not defects_of(i)][:count]
        self.claims += [self.sandbox.antavo.claim_reward(f"c{i:08d}", "rw-coffee", at=now - timedelta(minutes=30 - n))
                        for n, i in enumerate(valid)]

    def rename(self, indexes, at: datetime | None = None, tag: str = "Renamed") -> None:
        for i in indexes:
            if not defects_of(i):
                name = f"{tag} {i}"
                self.sandbox.antavo.touch(f"c{i:08d}", {"first_name": name}, at=at)
                self.expected_values[f"c{i:08d}"] = {"firstname": name}

    # -- a state store that goes away and comes back ---------------------------------------------
    def state_store_gone(self) -> None:
        self.outages += 1
        self.store.engine.dispose()
        self.state_file.rename(self.work / "state.away")
        self.state_file.mkdir()  # a folder where the database file was: every new connection fails

    def state_store_back(self) -> None:
        self.state_file.rmdir()
        (self.work / "state.away").rename(self.state_file)
        self.store.engine.dispose()

    # -- counting what Ometria holds ---------------------------------------------------------------
    def outcome(self, name: str, runs: list[str]) -> Outcome:
        self.sandbox.antavo.settle(), self.sandbox.ometria.settle()  # a late answer's records count too
        customers = self.sandbox.antavo.customers
        expected = {c["_id"] for i, c in enumerate(customers) if not defects_of(i)} - self.poison_customers
        stored: dict[str, list[dict]] = defaultdict(list)
        for (_, contact_id), record in self.sandbox.ometria.contacts.items():
            stored[contact_id].append(record)
        stale = [cid for cid, values in self.expected_values.items() if cid in stored
                 and any(stored[cid][0].get(k) != v for k, v in values.items())]
        expected_events = {e["id"] for e in self.claims} - self.poison_events
        events = {i.split(":", 1)[-1] for i in self.sandbox.ometria.events}  # `<rule>:<Antavo event id>`
        stored_twice, resent = _repeats(self.sandbox.ometria.deliveries)
        held = {r["antavo_id"].split(":", 1)[-1] if r["kind"].startswith("event_") else r["antavo_id"]
                for r in self.store.held.find(limit=100_000) if r["reasons"] and r["antavo_id"]}
        poison = self.poison_customers | self.poison_events
        return Outcome(
            scenario=name, runs=runs,
            contacts_expected=len(expected), contacts_delivered=len(expected & set(stored)) - len(stale),
            events_expected=len(expected_events), events_delivered=len(expected_events & events),
            held=len(poison & held), held_expected=len(poison),
            lost=len(expected - set(stored)) + len(stale) + len(expected_events - events),
            stored_twice=stored_twice + sum(len(records) > 1 for records in stored.values()),
            poison_sent=len(poison & (set(stored) | events)),
            resent=resent,
            owed=self.store.contacts.owed_count(),
            removed_from_list=sum(LIST_ID not in stored[i][0]["lists"] for i in self.leavers  # joined, then left
                                  if stored[i] and "lists" in stored[i][0]),
            leavers=len(self.leavers),
            faults_injected=self.sandbox.antavo.faults.injected + self.sandbox.ometria.faults.injected + self.outages,
        )


def _repeats(deliveries: list[tuple[str, str, str, bool]]) -> tuple[int, int]:
    """(stored twice, re-sent) from the sandbox's own log of accepted records.

    Stored twice: a custom event accepted again after Ometria had confirmed it. Re-sent: any record
    accepted again with the same content (a contact's repeat is an upsert: harmless)."""
    confirmed: set[tuple[str, str]] = set()
    seen: set[tuple[str, str, str]] = set()
    stored_twice = resent = 0
    for kind, record_id, digest, answered in deliveries:
        if kind == "custom_event" and (kind, record_id) in confirmed:
            stored_twice += 1
        if (kind, record_id, digest) in seen:
            resent += 1
        seen.add((kind, record_id, digest))
        if answered:
            confirmed.add((kind, record_id))
    return stored_twice, resent


@dataclass
class Outcome:
    scenario: str
    runs: list[str]
    contacts_expected: int
    contacts_delivered: int
    events_expected: int
    events_delivered: int
    held: int  # poison records held back with a reason
    held_expected: int
    lost: int
    stored_twice: int
    poison_sent: int
    resent: int
    faults_injected: int
    owed: int = 0  # contacts the state store still owes Ometria at the end
    removed_from_list: int = 0  # of the members who left, those no longer on the list
    leavers: int = 0
    notes: list[str] = field(default_factory=list)


# -- one run, faults within the retry budget -------------------------------------------------------
FAULTS: dict[str, tuple[list[dict], list[dict]]] = {  # name → faults injected into (Antavo, Ometria)
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


def _one_run_with(antavo_faults: list[dict], ometria_faults: list[dict]):
    def scenario(dep: Deployment) -> list[str]:
        dep.claim(CLAIMS)
        for fault in antavo_faults:
            dep.sandbox.antavo.faults.add(fault)
        for fault in ometria_faults:
            dep.sandbox.ometria.faults.add(fault)
        return [dep.sync("run-1"), dep.deliver_events("run-1")]
    return scenario


# -- several runs, faults that outlast the retries -------------------------------------------------
def _outage(where: str):
    """A healthy first run; then changes and claims while one API is down for a whole run; then it is back."""
    def scenario(dep: Deployment) -> list[str]:
        runs = [dep.sync("run-1")]
        dep.rename(range(1, 41))
        dep.claim(CLAIMS)
        app = dep.sandbox.ometria if where == "Ometria" else dep.sandbox.antavo
        app.faults.add({"status": 503, "count": FOREVER, "path": PUSH if where == "Ometria" else "/"})
        runs += [dep.sync("run-2"), dep.deliver_events("run-2")]
        app.faults.clear()
        return runs + [dep.sync("run-3"), dep.deliver_events("run-3")]
    return scenario


def _state_store_gone_mid_load(dep: Deployment) -> list[str]:
    runs = [dep.sync("run-1")]
    dep.rename(range(1, 400))
    dep.claim(CLAIMS)
    pushes = dep.sandbox.ometria.pushes
    dep.sandbox.ometria.on_push = lambda count: dep.state_store_gone() if count == pushes + 2 else None
    runs += [dep.sync("run-2"), dep.deliver_events("run-2")]
    dep.sandbox.ometria.on_push = None
    dep.state_store_back()
    return runs + [dep.sync("run-3"), dep.deliver_events("run-3")]


def _cleared_after_a_mapping_change(dep: Deployment) -> list[str]:
    runs = [dep.sync("run-1")]
    table = dep.mappings / "contacts.csv"
    table.write_text(table.read_text().replace("properties.city,city", "properties.favourite_store,city"))
    for i, customer in enumerate(dep.sandbox.antavo.customers):
        store = (customer.get("properties") or {}).get("favourite_store")
        if not defects_of(i) and store:  # the legacy payload is flat: `city` now carries the favourite store
            dep.expected_values[customer["_id"]] = {"city": store}
    return runs + [dep.sync("run-1")]  # Airflow's Clear: the same run id, planned again


def _hour(offset: int) -> datetime:
    base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)
    return base + timedelta(hours=offset)


def _failed_hour_then_healthy(dep: Deployment) -> list[str]:
    runs = [dep.sync("hour-1", (_hour(0), _hour(1)))]
    dep.rename(range(1, 31), at=_hour(1) + timedelta(minutes=30))
    dep.sandbox.antavo.faults.add({"status": 503, "count": FOREVER, "path": "/"})
    runs.append(dep.sync("hour-2", (_hour(1), _hour(2))))
    dep.sandbox.antavo.faults.clear()
    return runs + [dep.sync("hour-3", (_hour(2), _hour(3)))]


def _paused_three_hours(dep: Deployment) -> list[str]:
    runs = [dep.sync("hour-1", (_hour(0), _hour(1)))]
    for hour in (1, 2, 3):  # changes while the DAG is paused
        dep.rename(range(hour * 10, hour * 10 + 10), at=_hour(hour) + timedelta(minutes=20), tag=f"Paused {hour}")
    return runs + [dep.sync("hour-5", (_hour(4), _hour(5)))]  # unpaused: Airflow runs the latest interval only


def _sensor_trigger_errors(dep: Deployment) -> list[str]:
    """Revoked Antavo credentials while the event sensor waits: the sensor fails (an alert), it does not skip."""
    from airflow.sdk.exceptions import AirflowException, AirflowSkipException

    from antavo_ometria.airflow.sensors import AntavoEventSensor
    from antavo_ometria.airflow.triggers import AntavoEventTrigger

    runs = [dep.sync("run-1"), dep.deliver_events("run-1")]
    dep.claim(CLAIMS)
    dep.sandbox.antavo.faults.add({"status": 401, "count": FOREVER, "path": "/customers/-/events",
                                   "body": {"error": {"message": "Unauthorized", "code": 2132, "resendable": False}}})
    with _environment(dep.sandbox.connections()):  # the trigger reads the connection as the triggerer does
        trigger = AntavoEventTrigger({dep.rule.action: (datetime.now(UTC) - timedelta(hours=1)).isoformat()},
                                     poll_interval=0.1, timeout=5)
        event = asyncio.run(anext(trigger.run())).payload
    sensor = AntavoEventSensor(task_id="wait", rules={dep.rule.name: dep.rule.action})
    try:
        sensor.execute_complete({}, event)
        runs.append("success")
    except AirflowSkipException:
        runs.append("skipped")
    except AirflowException:
        runs.append("failed")
    dep.sandbox.antavo.faults.clear()
    return runs + [dep.deliver_events("run-2")]


@contextmanager
def _environment(values: dict[str, str]):
    """os.environ with `values` set, as it was afterwards: a scenario leaves no connection behind for what runs next
    in the same process."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _poison_among_good_ones(dep: Deployment) -> list[str]:
    """A null, bytes that are not UTF-8, a repeated customer and numbers no JSON can carry, among good customers;
    an event with no customer, one whose customer was deleted, and one whose customer's tier is a bare string."""
    antavo = dep.sandbox.antavo
    antavo.listed_extras[500] = None
    antavo.touch("c00000002", {"first_name": "Broken-Bytes"})
    antavo.faults.add({"path": "/v1/customers", "count": FOREVER, "mangle": [["Broken-Bytes", "Broken\xff\xfeBytes"]]})
    repeated = dict(antavo.by_id["c00001003"], first_name="Older Copy", updated_at="2020-01-01T00:00:00+00:00")
    antavo.listed_extras[1001] = repeated  # the next page repeats a customer: the copy updated last must win
    dep.expected_values["c00001003"] = {"firstname": antavo.by_id["c00001003"]["first_name"]}
    antavo.touch("c00000003", {"score": 1e30})
    antavo.touch("c00000004", {"purchase_count": 2**63})
    dep.poison_customers |= {"c00000002", "c00000003", "c00000004"}
    dep.claim(CLAIMS, start=5)
    deleted = antavo.add_event("c09999999", "reward", {"reward": "rw-coffee"}, at=datetime.now(UTC))
    orphan = antavo.add_event("c00000005", "reward", {"reward": "rw-coffee"}, at=datetime.now(UTC))
    orphan["Customer"] = None
    dep.claims += [deleted, orphan]
    dep.poison_events |= {deleted["id"], orphan["id"]}
    first = dep.claims[0]["Customer"]["id"]
    antavo.faults.add({"path": f"/customers/{first}", "count": FOREVER,
                       "mangle": [['"structure": {"id": "gold", "name": "gold"}', '"structure": "gold"'],
                                  ['"structure": {"id": "silver", "name": "silver"}', '"structure": "silver"']]})
    return [dep.sync("run-1"), dep.deliver_events("run-1")]


def _custom_field_deleted(dep: Deployment) -> list[str]:
    runs = [dep.sync("hour-1", (_hour(0), _hour(1)))]
    dep.rename(range(1, 61), at=_hour(1) + timedelta(minutes=30))
    field_type = dep.sandbox.ometria.custom_fields.pop("loyalty_points")  # deleted in the Ometria account
    runs.append(dep.sync("hour-2", (_hour(1), _hour(2))))
    dep.outages += any("loyalty_points" in e["error_path"] for e in dep.sandbox.ometria.errors)  # it did refuse
    dep.sandbox.ometria.custom_fields["loyalty_points"] = field_type  # created again
    return runs + [dep.sync("hour-3", (_hour(2), _hour(3)))]


def _http_400_for_a_while(dep: Deployment) -> list[str]:
    dep.sandbox.ometria.refuse_requests = 4  # a proxy answers 400 to whole requests, then recovers
    runs = [dep.sync("run-1")]
    dep.outages += 4 - dep.sandbox.ometria.refuse_requests  # the refusals that were answered
    return runs


def _quiet_change_then_reconciliation(dep: Deployment) -> list[str]:
    runs = [dep.sync("hour-1", (_hour(0), _hour(1)))]
    for i in range(1, 21):
        if not defects_of(i):
            dep.sandbox.antavo.change_quietly(f"c{i:08d}", {"first_name": f"Quiet {i}"})  # updated_at not bumped
            dep.expected_values[f"c{i:08d}"] = {"firstname": f"Quiet {i}"}
    runs.append(dep.sync("hour-2", (_hour(1), _hour(2))))
    stored = dep.sandbox.ometria.contacts
    dep.outages += sum(stored.get(("antavo", i), {}).get("firstname") != v["firstname"]  # the hourly run missed them
                       for i, v in dep.expected_values.items())
    return runs + [dep.sync("hour-3", (_hour(2), _hour(3)), reconcile=True)]


def _members_leave(dep: Deployment) -> list[str]:
    runs = [dep.sync("hour-1", (_hour(0), _hour(1)))]
    for i in range(1, 11):
        if not defects_of(i):
            dep.sandbox.antavo.touch(f"c{i:08d}", {"status": "inactive"}, at=_hour(1) + timedelta(minutes=10))
            dep.leavers.add(f"c{i:08d}")
            dep.outages += 8400 in dep.sandbox.ometria.contacts.get(("antavo", f"c{i:08d}"), {}).get("lists", [])
    return runs + [dep.sync("hour-2", (_hour(1), _hour(2)), reconcile=True)]


SCENARIOS: dict[str, Callable[[Deployment], list[str]]] = {
    "a custom field deleted in Ometria, then created again": _custom_field_deleted,
    "Ometria answers 400 to whole requests for a while": _http_400_for_a_while,
    "a change that does not bump updated_at, then a reconciliation": _quiet_change_then_reconciliation,
    "members leave the programme (reconciliation)": _members_leave,
    **{name: _one_run_with(*faults) for name, faults in FAULTS.items()},
    "Ometria down for a whole run, then back": _outage("Ometria"),
    "Antavo down for a whole run, then back": _outage("Antavo"),
    "state store gone mid-load for the rest of the run, then back": _state_store_gone_mid_load,
    "same run cleared and re-run after a mapping change": _cleared_after_a_mapping_change,
    "a failed hour, then a healthy one": _failed_hour_then_healthy,
    "DAG paused for three hours, then unpaused": _paused_three_hours,
    "event sensor's trigger errors (Antavo 401), then fixed": _sensor_trigger_errors,
    "poison customers and events among good ones": _poison_among_good_ones,
}
# what each run must end as: a failure that outlasts the retries is red, never green
EXPECTED_RUNS: dict[str, list[str]] = {
    "a custom field deleted in Ometria, then created again": ["success", "failed", "success"],
    "a change that does not bump updated_at, then a reconciliation": ["success", "success", "success"],
    "members leave the programme (reconciliation)": ["success", "success"],
    "Ometria down for a whole run, then back": ["success", "failed", "failed", "success", "success"],
    "Antavo down for a whole run, then back": ["success", "failed", "failed", "success", "success"],
    "state store gone mid-load for the rest of the run, then back": ["success", "failed", "failed", "success",
                                                                     "success"],
    "same run cleared and re-run after a mapping change": ["success", "success"],
    "a failed hour, then a healthy one": ["success", "failed", "success"],
    "DAG paused for three hours, then unpaused": ["success", "success"],
    "event sensor's trigger errors (Antavo 401), then fixed": ["success", "success", "failed", "success"],
}


def run(name: str) -> Outcome:
    dep = Deployment()
    try:
        runs = SCENARIOS[name](dep)
        return dep.outcome(name, runs)
    finally:
        dep.close()


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
    "number too large for JSON (1e30)": ({"score": 1e30}, "number_range"),
    "integer past 2**63": ({"purchase_count": 2**63}, "number_range"),
    "infinite number": ({"score": float("inf")}, "number_range"),
    "a list where text belongs": ({"first_name": ["Ana", "Maria"]}, "text_type"),
    "infinity where text belongs": ({"last_name": float("inf")}, "text_type"),
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
    from antavo_ometria.sync.contacts.prepare import prepare_contacts
    from antavo_ometria.sync.contacts.transform import customer_columns

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
