"""Event triggers: the rules table, Ometria's timing rules, and reward claims delivered exactly once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from antavo_ometria.problems import ConfigError
from antavo_ometria.sync.events.delivery import deliver
from antavo_ometria.sync.events.rules import load_rules, ometria_event_id, stagger
from antavo_ometria.sync.store.state import StateStore
from antavo_ometria.sync.tables.mapping import load_contact_mapping

PROJECT = Path(__file__).resolve().parents[1]
HEADER = "rule,antavo_action,ometria_event_type,property,source\n"
# the rules these tests deliver, in a mappings folder of their own: the shipped table may gain rules or change
REWARD_CLAIMED = "".join(f"reward_claimed,reward,loyalty_reward_claimed,{p}\n" for p in (
    "reward_id,event.reward", "reward_name,reward.title", "reward_description,reward.description",
    "points_spent,reward.points", "first_name,customer.first_name", "loyalty_points,customer.score"))
REWARD_POINTS = "reward_points,reward,loyalty_points_spent,points,event.points\n"


def rule_named(mappings: Path, name: str):
    return next(rule for rule in load_rules(mappings) if rule.name == name)


@pytest.fixture
def mappings(tmp_path) -> Path:
    """A mappings folder: the shipped contact mapping and settings, and these tests' own trigger rules."""
    folder = tmp_path / "mappings"
    folder.mkdir()
    for name in ("contacts.csv", "settings.toml"):
        (folder / name).write_bytes((PROJECT / "include" / "mappings" / name).read_bytes())
    (folder / "triggers.csv").write_text(HEADER + REWARD_CLAIMED + REWARD_POINTS, encoding="utf-8")
    return folder


def oid(event: dict, rule: str = "reward_claimed") -> str:
    """The Ometria custom event id a rule gives an Antavo event."""
    return ometria_event_id(rule, event["id"])


def expire_leases(store) -> None:
    """Every delivery lease runs out now (a delivery slower than the lease's time to live)."""
    from sqlalchemy import update

    leases = store.db.table("sync_event_leases")
    with store.engine.begin() as conn:
        conn.execute(update(leases).values(expires_at=datetime.now(UTC) - timedelta(hours=1)))


def test_shipped_reward_claim_rule():
    rule = rule_named(PROJECT / "include" / "mappings", "reward_claimed")
    assert (rule.name, rule.action, rule.event_type) == ("reward_claimed", "reward", "loyalty_reward_claimed")
    assert ("reward_name", "reward.title") in rule.properties and rule.needs_rewards


def test_rule_mistakes_are_listed_with_file_and_line(tmp_path):
    (tmp_path / "triggers.csv").write_text(HEADER + (
        "claimed,reward,loyalty_reward_claimed_by_a_loyal_customer,reward_name,reward.title\n"
        "claimed,point_add,loyalty_reward_claimed_by_a_loyal_customer,points,event.points\n"
        "claimed,reward,loyalty_reward_claimed_by_a_loyal_customer,first,customer.first_nam\n"
        "claimed,reward,loyalty_reward_claimed_by_a_loyal_customer,what,reward.colour\n"
        "claimed,reward,loyalty_reward_claimed_by_a_loyal_customer,reward_name,reward.description\n"))
    with pytest.raises(ConfigError) as raised:
        load_rules(tmp_path)
    found = [str(p).replace(str(tmp_path) + "/", "") for p in raised.value.problems]
    assert "triggers.csv:2: [ometria_event_type] Ometria event types must be under 32 characters; " \
           "'loyalty_reward_claimed_by_a_loyal_customer' has 42" in found
    assert "triggers.csv:3: [antavo_action] rule 'claimed' has antavo_action 'reward' on line 2; every row " \
           "of a rule must agree" in found
    assert "triggers.csv:4: [source] unknown customer field 'first_nam' (did you mean 'first_name'?)" in found
    assert "triggers.csv:5: [source] reward fields are id, title, description, type, points, not 'colour'" in found
    assert "triggers.csv:6: [property] 'reward_name' is already set on line 2" in found


def test_more_than_1000_events_on_one_timestamp_are_staggered():
    moment = datetime(2026, 3, 1, 12, tzinfo=UTC)
    spread = stagger([moment] * 2500 + [moment + timedelta(seconds=1)])
    assert spread[:1000] == [moment] * 1000
    assert spread[1000:2000] == [moment + timedelta(minutes=5)] * 1000
    assert spread[2000:2500] == [moment + timedelta(minutes=10)] * 500
    assert spread[2500] == moment + timedelta(seconds=1)


def test_a_burst_split_across_deliveries_is_staggered_after_what_earlier_deliveries_sent_with_its_timestamp(
        parts, sandbox, antavo_client, ometria_client):
    """The fast path sends what it has read so far: the 1,001st claim of a second, read by a later delivery, still
    goes 5 minutes later, counted from the events the state store recorded sent with that timestamp."""
    rule, store, mapping = parts
    second = (datetime.now(UTC) - timedelta(minutes=2)).replace(microsecond=0)
    row = {"rule": rule.name, "event_type": rule.event_type, "customer_id": "c1", "status": "sent", "late": False,
           "request_id": "r", "run_id": "run-0"}
    store.record_events([{**row, "event_id": f"{rule.name}:earlier-{n}", "sent_at": second,
                          "event_time": second + timedelta(microseconds=900 * n)} for n in range(1000)])
    claim = sandbox.antavo.claim_reward("c00000003", "rw-10off", at=second)
    deliver(rule, antavo_client, ometria_client, store, mapping, "run-1")
    assert sandbox.ometria.events[oid(claim)]["timestamp"] == (second + timedelta(minutes=5)).isoformat()
    later = second + timedelta(minutes=5)
    assert store.events.sent_per_timestamp(rule.event_type, [(second, later)]) == {second: 1000, later: 1}


@pytest.fixture
def parts(sandbox, antavo_client, ometria_client, state_url, mappings):
    store = StateStore(state_url)
    store.migrate()
    return rule_named(mappings, "reward_claimed"), store, load_contact_mapping(mappings)


def test_reward_claim_becomes_one_custom_event_and_the_contact_comes_first(parts, sandbox, antavo_client, ometria_client):
    rule, store, mapping = parts
    now = datetime.now(UTC)
    claim = sandbox.antavo.claim_reward("c00000001", "rw-10off", at=now - timedelta(minutes=3))
    sandbox.antavo.add_event("c00000002", "point_add", {"points": 50}, at=now - timedelta(minutes=2))
    summary = deliver(rule, antavo_client, ometria_client, store, mapping, "run-1")
    assert (summary["matched"], summary["sent"], summary["accepted"], summary["contacts_pushed_first"]) == (1, 1, 1, 1)
    customer = sandbox.antavo.by_id["c00000001"]
    assert sandbox.ometria.events == {oid(claim): {
        "@type": "custom_event", "id": oid(claim), "event_type": "loyalty_reward_claimed",
        "timestamp": (now - timedelta(minutes=3)).replace(microsecond=0).isoformat(),
        "identity_email": customer["email"], "identity_account_id": customer["external_ids"]["crm_id"],
        "properties": {"reward_id": "rw-10off", "reward_name": "£10 off your next order",
                       "reward_description": "A voucher worth £10 on any order over £50.", "points_spent": 1000,
                       "first_name": customer["first_name"], "loyalty_points": customer["score"]},
    }}
    assert ("antavo", "c00000001") in sandbox.ometria.contacts  # pushed before its event
    pushes = sandbox.ometria.pushes
    again = deliver(rule, antavo_client, ometria_client, store, mapping, "run-2")
    assert (again["matched"], again["already_pushed"], again["sent"]) == (1, 1, 0)  # re-read in the overlap
    assert sandbox.ometria.pushes == pushes and sandbox.ometria.received[("custom_event", oid(claim))] == 1


@pytest.mark.parametrize("policy, sent, skipped", [("send", 1, 0), ("skip", 0, 1)])
def test_late_events_follow_the_policy(parts, sandbox, antavo_client, ometria_client, policy, sent, skipped):
    rule, store, mapping = parts
    now = datetime.now(UTC)
    store.set_event_cursor(rule.name, now - timedelta(hours=6))  # the sync was down for a while
    sandbox.antavo.claim_reward("c00000003", "rw-coffee", at=now - timedelta(hours=5))
    summary = deliver(rule, antavo_client, ometria_client, store, mapping, "run-1", late_policy=policy)
    assert (summary["late"], summary["sent"], summary["skipped_late"]) == (sent, sent, skipped)
    assert len(sandbox.ometria.events) == sent
    again = deliver(rule, antavo_client, ometria_client, store, mapping, "run-2", late_policy=policy)
    assert again["sent"] == again["skipped_late"] == 0  # a skipped event is not reconsidered either


def test_event_of_an_invalid_customer_is_held_with_the_reason(parts, sandbox, antavo_client, ometria_client):
    rule, store, mapping = parts
    sandbox.antavo.claim_reward("c00000007", "rw-coffee", at=datetime.now(UTC) - timedelta(minutes=1))  # bad email
    summary = deliver(rule, antavo_client, ometria_client, store, mapping, "run-1")
    assert (summary["held"], summary["sent"]) == (1, 0)
    (held,) = store.held_records(kind="event_held")
    assert "email" in held["reasons"][0] and "is not an email address" in held["reasons"][0]


@pytest.mark.airflow
def test_events_dag_delivers_a_reward_claim(airflow_db, connections):
    from airflow.models import DagBag
    from airflow.utils.state import DagRunState

    dag = DagBag(dag_folder=str(PROJECT / "dags")).get_dag("antavo_ometria_events")
    claim = connections.antavo.claim_reward("c00000010", "rw-10off", at=datetime.now(UTC) - timedelta(minutes=1))
    run = dag.test()
    assert run.state == DagRunState.SUCCESS
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["wait_for_events"] == states["deliver_events"] == "success"
    assert set(states.values()) == {"success"}, states  # every task, whichever the DAG has
    assert list(connections.ometria.events) == [oid(claim)]
    assert connections.ometria.events[oid(claim)]["properties"]["reward_name"] == "£10 off your next order"

    # a claim Antavo lists 10 minutes late: before what the sensor watches (a minute before the cursor), so the fast
    # path misses it; the sensor gives up after its wait, and the delivery (the catch-up) re-reads the 4-hour window
    late = connections.antavo.claim_reward("c00000012", "rw-10off", at=datetime.now(UTC) - timedelta(minutes=10))
    quiet = dag.test()
    states = {ti.task_id: ti.state for ti in quiet.get_task_instances()}
    assert states["wait_for_events"] == "skipped" and states["deliver_events"] == "success"
    assert connections.ometria.received[("custom_event", oid(claim))] == 1
    assert connections.ometria.received[("custom_event", oid(late))] == 1


# -- no silent loss ------------------------------------------------------------------------------
def test_an_ometria_outage_fails_the_delivery_and_keeps_the_cursor_before_the_claims(
        parts, sandbox, antavo_client, ometria_client):
    from antavo_ometria.sync.events.delivery import EventsNotDelivered

    rule, store, mapping = parts
    now = datetime.now(UTC)
    store.set_event_cursor(rule.name, now - timedelta(hours=1))
    claims = [sandbox.antavo.claim_reward(f"c0000002{i}", "rw-coffee", at=now - timedelta(minutes=50 - i))
              for i in range(1, 4)]
    sandbox.ometria.faults.add({"status": 503, "count": 10**6, "path": "/v2/push"})
    with pytest.raises(EventsNotDelivered, match="3 loyalty_reward_claimed event"):
        deliver(rule, antavo_client, ometria_client, store, mapping, "run-1")
    assert sandbox.ometria.events == {} and sandbox.ometria.contacts == {}
    assert store.event_cursor(rule.name) < now - timedelta(minutes=49)  # before the first undelivered claim
    assert store.pushed_event_ids([oid(c) for c in claims]) == set()

    sandbox.ometria.faults.clear()  # Ometria is back, an hour later: nothing was lost
    later = deliver(rule, antavo_client, ometria_client, store, mapping, "run-2", now=now + timedelta(hours=1))
    assert (later["sent"], later["contacts_pushed_first"]) == (3, 3)
    assert [sandbox.ometria.received[("custom_event", oid(c))] for c in claims] == [1, 1, 1]


def test_events_of_a_contact_that_could_not_be_pushed_first_wait_for_it(parts, sandbox, antavo_client, ometria_client):
    from antavo_ometria.sync.events.delivery import EventsNotDelivered

    rule, store, mapping = parts
    claim = sandbox.antavo.claim_reward("c00000030", "rw-coffee", at=datetime.now(UTC) - timedelta(minutes=5))
    sandbox.ometria.faults.add({"status": 503, "count": 4, "path": "/v2/push"})  # the contact push, all attempts
    with pytest.raises(EventsNotDelivered):
        deliver(rule, antavo_client, ometria_client, store, mapping, "run-1")
    assert sandbox.ometria.events == {}  # the event did not go ahead of its contact
    summary = deliver(rule, antavo_client, ometria_client, store, mapping, "run-2")
    assert (summary["sent"], summary["contacts_pushed_first"]) == (1, 1)
    assert list(sandbox.ometria.events) == [oid(claim)]


def test_poison_events_are_held_and_the_rest_delivered(parts, sandbox, antavo_client, ometria_client):
    rule, store, mapping = parts
    now = datetime.now(UTC)
    good = sandbox.antavo.claim_reward("c00000040", "rw-coffee", at=now - timedelta(minutes=4))
    deleted = sandbox.antavo.add_event("c09999999", "reward", {"reward": "rw-coffee"}, at=now - timedelta(minutes=3))
    orphan = sandbox.antavo.add_event("c00000041", "reward", {"reward": "rw-coffee"}, at=now - timedelta(minutes=2))
    orphan["Customer"] = None
    summary = deliver(rule, antavo_client, ometria_client, store, mapping, "run-1")
    assert (summary["sent"], summary["held"]) == (1, 2)
    assert list(sandbox.ometria.events) == [oid(good)]
    reasons = {r["antavo_id"]: r["reasons"] for r in store.held_records(kind="event_held")}
    assert reasons == {oid(deleted): ["customer c09999999: Antavo has no customer c09999999 (404 Not Found)"],
                       oid(orphan): ["the event names no customer"]}


def test_a_crash_between_push_and_record_re_pushes_the_same_event_id(parts, sandbox, antavo_client, ometria_client,
                                                                     monkeypatch):
    """Ometria answered, but the worker was killed before it recorded the event: nothing tells the next delivery
    that Ometria has it, so it is sent again with the same id, by the next delivery, never twice within one. Two is
    the documented outcome: exactly once only when the answer is recorded, at least once otherwise (as for a lost
    answer); Ometria upserts by id (one event), and whether a repeated id starts an automation again is not
    documented."""
    rule, store, mapping = parts
    claim = sandbox.antavo.claim_reward("c00000050", "rw-coffee", at=datetime.now(UTC) - timedelta(minutes=1))

    def crash(rows):
        raise RuntimeError("worker killed after the push")

    monkeypatch.setattr(store, "record_events", crash)
    with pytest.raises(RuntimeError):
        deliver(rule, antavo_client, ometria_client, store, mapping, "run-1")
    monkeypatch.undo()
    deliver(rule, antavo_client, ometria_client, store, mapping, "run-2")
    assert sandbox.ometria.received[("custom_event", oid(claim))] == 2  # pushed again, under the same id
    assert list(sandbox.ometria.events) == [oid(claim)]  # which Ometria upserts: one event


@pytest.mark.airflow
def test_a_sensor_whose_trigger_errors_fails_instead_of_skipping(airflow_db, connections):
    """Revoked credentials or an Antavo outage must fail the wait (an alert fires), never skip it."""
    from airflow.models import DagBag

    dag = DagBag(dag_folder=str(PROJECT / "dags")).get_dag("antavo_ometria_events")
    connections.antavo.faults.add({"status": 401, "count": 10**6, "path": "/customers/-/events", "body": {
        "error": {"message": "Unauthorized", "code": 2132, "resendable": False}}})
    run = dag.test()
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["wait_for_events"] == "failed", states
    assert states["deliver_events"] == "upstream_failed"


def test_an_event_with_a_number_json_cannot_carry_is_held_not_sent_as_infinity(parts, sandbox, antavo_client,
                                                                               ometria_client):
    rule, store, mapping = parts
    now = datetime.now(UTC)
    good = sandbox.antavo.claim_reward("c00000060", "rw-10off", at=now - timedelta(minutes=3))
    bad = sandbox.antavo.claim_reward("c00000061", "rw-coffee", at=now - timedelta(minutes=2))
    sandbox.antavo.faults.add({"path": "/customers/c00000061/rewards", "count": 10**6,
                               "mangle": [['"points": 300', '"points": 1e400']]})  # inf once parsed
    summary = deliver(rule, antavo_client, ometria_client, store, mapping, "run-1")
    assert (summary["sent"], summary["held"]) == (1, 1)
    assert list(sandbox.ometria.events) == [oid(good)]
    (held,) = store.held_records(kind="event_held")
    assert held["antavo_id"] == oid(bad) and "points_spent = inf" in held["reasons"][0]


def test_a_rejected_event_does_not_push_the_others_of_its_batch_again(parts, sandbox, antavo_client, ometria_client):
    rule, store, mapping = parts
    now = datetime.now(UTC)
    claims = [sandbox.antavo.claim_reward(f"c0000007{i}", "rw-coffee", at=now - timedelta(minutes=9 - i))
              for i in range(1, 7)]
    sandbox.ometria.reject_ids.add(oid(claims[2]))
    summary = deliver(rule, antavo_client, ometria_client, store, mapping, "run-1")
    assert (summary["sent"], summary["accepted"], summary["rejected"]) == (6, 5, 1)
    assert [sandbox.ometria.received[("custom_event", oid(c))] for c in claims] == [1, 1, 0, 1, 1, 1]


def test_an_event_listed_twice_and_a_held_event_re_read_count_once(parts, sandbox, antavo_client, ometria_client):
    rule, store, mapping = parts
    now = datetime.now(UTC)
    claim = sandbox.antavo.claim_reward("c00000080", "rw-coffee", at=now - timedelta(minutes=3))
    sandbox.antavo.events.append(dict(claim))  # the feed lists it twice
    held = sandbox.antavo.claim_reward("c00000007", "rw-coffee", at=now - timedelta(minutes=2))  # bad email
    summary = deliver(rule, antavo_client, ometria_client, store, mapping, "run-1")
    assert (summary["matched"], summary["sent"], summary["held"]) == (2, 1, 1)
    deliver(rule, antavo_client, ometria_client, store, mapping, "run-2")  # re-reads both in the overlap
    assert sandbox.ometria.received[("custom_event", oid(claim))] == 1
    assert [r["antavo_id"] for r in store.held_records(kind="event_held")] == [oid(held)]


def test_an_event_listed_twice_on_postgresql(sandbox, antavo_client, ometria_client, postgres_state_url, mappings):
    store = StateStore(postgres_state_url)
    store.migrate()
    rule = rule_named(mappings, "reward_claimed")
    claim = sandbox.antavo.claim_reward("c00000081", "rw-coffee", at=datetime.now(UTC) - timedelta(minutes=3))
    sandbox.antavo.events.append(dict(claim))
    summary = deliver(rule, antavo_client, ometria_client, store, load_contact_mapping(mappings), "run-1")
    assert summary["sent"] == 1 and store.pushed_event_ids([oid(claim)]) == {oid(claim)}
    store.engine.dispose()


# -- owed until Ometria accepts it ---------------------------------------------------------------
def _sandbox_control(url: str, path: str, body: dict) -> dict:
    import json
    from urllib.request import Request, urlopen

    request = Request(f"{url}/_sandbox/{path}", data=json.dumps(body).encode(), method="POST",
                      headers={"Content-Type": "application/json"})
    with urlopen(request, timeout=5) as answer:
        return json.load(answer)


def test_a_rejected_event_is_held_with_its_reason_and_retried_until_ometria_accepts_it(
        parts, sandbox, antavo_client, ometria_client):
    rule, store, mapping = parts
    now = datetime.now(UTC)
    claims = [sandbox.antavo.claim_reward(f"c0000009{i}", "rw-coffee", at=now - timedelta(minutes=20 - i))
              for i in range(1, 4)]
    _sandbox_control(sandbox.ometria_url, "reject", {"ids": [oid(claims[1])]})
    first = deliver(rule, antavo_client, ometria_client, store, mapping, "run-1")
    assert (first["accepted"], first["rejected"]) == (2, 1)
    assert store.pushed_event_ids([oid(c) for c in claims]) == {oid(claims[0]), oid(claims[2])}  # not "sent"
    (held,) = store.held_records(kind="event_rejected")
    assert held["antavo_id"] == oid(claims[1]) and "Ometria rejected it" in held["reasons"][0]
    assert "retried on each run until" in held["reasons"][0]

    _sandbox_control(sandbox.ometria_url, "reject", {"ids": []})  # e.g. the identity conflict was resolved
    later = deliver(rule, antavo_client, ometria_client, store, mapping, "run-2", now=now + timedelta(minutes=15))
    assert (later["retried"], later["retried_accepted"], later["sent"]) == (1, 1, 1)
    assert [sandbox.ometria.received[("custom_event", oid(c))] for c in claims] == [1, 1, 1]
    assert store.held_records(kind="event_rejected") == []


def test_a_rejected_event_whose_window_passed_is_held_as_expired_and_not_retried(
        parts, sandbox, antavo_client, ometria_client):
    rule, store, mapping = parts
    now = datetime.now(UTC)
    claim = sandbox.antavo.claim_reward("c00000095", "rw-coffee", at=now - timedelta(hours=3, minutes=50))
    _sandbox_control(sandbox.ometria_url, "reject", {"ids": [oid(claim)]})
    assert deliver(rule, antavo_client, ometria_client, store, mapping, "run-1")["rejected"] == 1
    _sandbox_control(sandbox.ometria_url, "reject", {"ids": []})
    later = deliver(rule, antavo_client, ometria_client, store, mapping, "run-2", now=now + timedelta(minutes=20))
    assert later["expired"] == 1 and later["sent"] == 0
    assert sandbox.ometria.received[("custom_event", oid(claim))] == 0
    assert store.held_records(kind="event_rejected") == []
    (expired,) = store.held_records(kind="event_expired")
    assert expired["antavo_id"] == oid(claim) and "window has passed" in expired["reasons"][0]
    assert [e["status"] for e in store.events_of("c00000095")] == ["expired"]
    # catching up from an old cursor re-reads it: still not sent
    store.set_event_cursor(rule.name, now - timedelta(hours=5))
    deliver(rule, antavo_client, ometria_client, store, mapping, "run-3", now=now + timedelta(minutes=35))
    assert sandbox.ometria.received[("custom_event", oid(claim))] == 0


def test_two_rules_on_the_same_antavo_action_both_deliver(sandbox, antavo_client, ometria_client, state_url, mappings):
    store = StateStore(state_url)
    store.migrate()
    rules = [rule_named(mappings, "reward_claimed"), rule_named(mappings, "reward_points")]
    assert [r.action for r in rules] == ["reward", "reward"]
    mapping = load_contact_mapping(mappings)
    claim = sandbox.antavo.claim_reward("c00000096", "rw-10off", at=datetime.now(UTC) - timedelta(minutes=2))
    for run in ("run-1", "run-2"):  # the second run re-reads the claim: neither rule sends it again
        for rule in rules:
            deliver(rule, antavo_client, ometria_client, store, mapping, run)
    assert {i: e["event_type"] for i, e in sandbox.ometria.events.items()} == {
        oid(claim, "reward_claimed"): "loyalty_reward_claimed", oid(claim, "reward_points"): "loyalty_points_spent"}
    assert [sandbox.ometria.received[("custom_event", oid(claim, r.name))] for r in rules] == [1, 1]


def test_an_event_antavo_lists_late_but_within_the_window_is_still_sent_once(
        parts, sandbox, antavo_client, ometria_client):
    rule, store, mapping = parts
    now = datetime.now(UTC)
    assert deliver(rule, antavo_client, ometria_client, store, mapping, "run-1")["matched"] == 0
    store.set_event_cursor(rule.name, now)  # the feed was read up to now
    late = sandbox.antavo.claim_reward("c00000097", "rw-coffee", at=now - timedelta(hours=1))  # listed only now
    summary = deliver(rule, antavo_client, ometria_client, store, mapping, "run-2", now=now + timedelta(minutes=15))
    assert (summary["sent"], summary["late"]) == (1, 0)
    again = deliver(rule, antavo_client, ometria_client, store, mapping, "run-3", now=now + timedelta(minutes=30))
    assert (again["already_pushed"], again["sent"]) == (1, 0)
    assert sandbox.ometria.received[("custom_event", oid(late))] == 1


# -- overlapping deliveries ---------------------------------------------------------------------
def test_two_deliveries_of_one_rule_at_once_push_each_claim_once(parts, sandbox, antavo_client, ometria_client):
    """Two runs overlapping (a second run, `make events` next to the deployment) share the state store."""
    import threading

    rule, store, mapping = parts
    now = datetime.now(UTC)
    claims = [sandbox.antavo.claim_reward(f"c000000{60 + i}", "rw-coffee", at=now - timedelta(seconds=30 - i))
              for i in range(6)]
    summaries, errors = [], []

    def run(run_id: str) -> None:
        try:
            summaries.append(deliver(rule, antavo_client, ometria_client, StateStore(store.url), mapping, run_id))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"run-{n}",)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    valid = [c for c in claims if oid(c) in sandbox.ometria.events]
    assert [sandbox.ometria.received[("custom_event", oid(c))] for c in valid] == [1] * len(valid)
    assert sum(s["sent"] for s in summaries) == len(valid) and sum(s["held"] for s in summaries) == len(claims) - len(valid)
    assert sorted(s["already_pushed"] for s in summaries) == [0, len(claims)]  # the second found them all done


def test_a_delivery_lease_is_kept_by_its_holder_and_freed_when_it_expires(parts):
    _, store, _ = parts
    assert store.take_lease("reward_claimed", "run-1", timedelta(minutes=10))
    assert not store.take_lease("reward_claimed", "run-2", timedelta(minutes=10))
    assert store.take_lease("reward_claimed", "run-1", timedelta(minutes=10))  # a retry of the same run
    assert store.take_lease("other_rule", "run-2", timedelta(minutes=10))  # rules do not wait for each other
    store.take_lease("reward_claimed", "run-1", timedelta(seconds=-1))  # run-1 was killed; its lease ran out
    assert store.take_lease("reward_claimed", "run-2", timedelta(minutes=10))
    store.release_lease("reward_claimed", "run-2")
    assert store.lease_holder("reward_claimed") is None


def test_the_dashboard_shows_the_last_hours_claim_to_ometria_latency_next_to_the_counts(
        parts, sandbox, antavo_client, ometria_client):
    import re

    from antavo_ometria.airflow.dashboard import render

    rule, store, mapping = parts
    now = datetime.now(UTC)
    sandbox.antavo.claim_reward("c00000070", "rw-coffee", at=now - timedelta(seconds=40))
    sandbox.antavo.claim_reward("c00000071", "rw-coffee", at=now - timedelta(seconds=20))
    deliver(rule, antavo_client, ometria_client, store, mapping, "run-1")
    accepted = datetime.now(UTC)
    page = render(store)
    row = re.search(r"<tr><td>reward_claimed</td>.*?</tr>", page).group(0)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells[2] == "2"  # delivered
    p50, p95, most = (float(x) for x in re.fullmatch(r"(\d+) s / (\d+) s / (\d+) s \(2\)", cells[-1]).groups())
    # Antavo's timestamps are whole seconds (up to 1 s earlier than the claim) and the page rounds to the second
    slack = (accepted - now).total_seconds() + 1.5
    assert 19 <= p50 <= 20 + slack and 39 <= p95 == most <= 40 + slack


# -- back-off while an API is down ---------------------------------------------------------------
def test_while_deliveries_fail_each_attempt_waits_as_long_as_they_have_failed_within_bounds():
    from antavo_ometria.sync.events.delivery import back_off

    now, first, most = datetime(2026, 12, 4, 12, tzinfo=UTC), timedelta(minutes=1), timedelta(minutes=15)
    assert back_off(None, now, first, most) == timedelta(0)  # the last run succeeded: no wait
    assert back_off(now - timedelta(seconds=20), now, first, most) == first
    assert back_off(now - timedelta(minutes=4), now, first, most) == timedelta(minutes=4)  # so the waits double
    assert back_off(now - timedelta(hours=3), now, first, most) == most


@pytest.mark.airflow
def test_after_a_failed_run_the_next_one_backs_off_the_alert_says_so_and_nothing_is_lost(
        airflow_db, connections, monkeypatch):
    from airflow.models import DagBag
    from airflow.utils.state import DagRunState
    from test_dags import Inbox

    from antavo_ometria.airflow import dag_defaults

    monkeypatch.setattr(dag_defaults, "EVENT_BACK_OFF", (timedelta(seconds=3), timedelta(seconds=4)))
    dag = DagBag(dag_folder=str(PROJECT / "dags")).get_dag("antavo_ometria_events")
    inbox = Inbox()
    try:
        monkeypatch.setenv("AIRFLOW_VAR_ANTAVO_OMETRIA_ALERT_WEBHOOK", inbox.server.url + "/hook")
        connections.antavo.faults.add({"status": 401, "count": 10**6, "path": "/customers/-/events", "body": {
            "error": {"message": "Unauthorized", "code": 2132, "resendable": False}}})
        claim = connections.antavo.claim_reward("c00000012", "rw-coffee", at=datetime.now(UTC) - timedelta(minutes=1))
        assert dag.test().state == DagRunState.FAILED
    finally:
        inbox.close()
    (alert,) = [m for m in inbox.received if m["task_id"] == "wait_for_events"]
    assert "the next attempt waits" in alert["text"] and "sends everything not delivered" in alert["text"]

    connections.antavo.faults.clear()  # Antavo is back
    polls = connections.antavo.requests_by_path["/customers/-/events"]
    run = dag.test()
    assert run.state == DagRunState.SUCCESS
    waited = next(ti for ti in run.get_task_instances() if ti.task_id == "back_off")
    assert (waited.end_date - waited.start_date).total_seconds() >= 3  # it backed off before asking Antavo again
    assert connections.ometria.received[("custom_event", oid(claim))] == 1
    assert connections.antavo.requests_by_path["/customers/-/events"] - polls <= 3  # one look, then the delivery



# -- the decision, without I/O -------------------------------------------------------------------
def antavo_event(number: int, customer: str, minutes_ago: float, now: datetime, **extra) -> dict:
    moment = (now - timedelta(minutes=minutes_ago)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return {"id": f"ev{number:08d}", "action": "reward", "customer_id": customer, "timestamp": moment,
            "properties": {"reward": "rw-coffee"}, **extra}


@pytest.mark.parametrize("policy", ["send", "skip"])
def test_each_matching_event_is_sendable_held_skipped_or_waiting_for_its_contact(policy):
    from antavo_ometria.antavo.records import HELD
    from antavo_ometria.sync.events.delivery import classify

    now = datetime(2026, 12, 4, 12, tzinfo=UTC)
    fresh, old = antavo_event(1, "c1", 5, now), antavo_event(2, "c1", 5 * 60, now)
    broken = antavo_event(3, "", 5, now, **{HELD: ["the event names no customer"]})
    bad_email, gone, waiting = (antavo_event(4, "c2", 5, now), antavo_event(5, "c3", 5, now),
                                antavo_event(6, "c4", 5, now))
    decision = classify([fresh, old, broken, bad_email, gone, waiting], known={"c1", "c2", "c4"},
                        problems={"c2": "email is not an email address"}, waiting_for_contact={"c4"},
                        late_cut=now - timedelta(hours=4), late_policy=policy)
    assert decision.sendable == ([fresh, old] if policy == "send" else [fresh])
    assert decision.skipped == ([] if policy == "send" else [old])
    assert decision.late == (1 if policy == "send" else 0)
    assert decision.held == [(broken, "the event names no customer"),
                             (bad_email, "customer c2: email is not an email address"),
                             (gone, "customer c3: not found in Antavo")]
    assert decision.waiting == [waiting]


def test_event_delivery_does_not_reach_into_the_contact_runs_steps():
    import ast

    source = (PROJECT / "src" / "antavo_ometria" / "sync" / "events" / "delivery.py").read_text(encoding="utf-8")
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"antavo_ometria.sync.contacts.load", "antavo_ometria.sync.contacts.prepare"}
    assert "antavo_ometria.sync.contact_push" in imported  # the contacts first, remembered as the contact run does


def test_one_read_of_antavo_s_feed_serves_every_rule(sandbox, antavo_client, ometria_client, state_url, mappings):
    from antavo_ometria.sync.events.delivery import deliver_all

    store = StateStore(state_url)
    store.migrate()
    (mappings / "triggers.csv").write_text(HEADER + REWARD_CLAIMED + REWARD_POINTS
                                           + "points_added,point_add,loyalty_points_added,points,event.points\n")
    rules = load_rules(mappings)
    now = datetime.now(UTC)
    claim = sandbox.antavo.claim_reward("c00000031", "rw-coffee", at=now - timedelta(minutes=2))
    added = sandbox.antavo.add_event("c00000032", "point_add", {"points": 50}, at=now - timedelta(minutes=1))
    reads = sandbox.antavo.requests_by_path["/customers/-/events"]
    summaries = deliver_all(rules, antavo_client, ometria_client, store, load_contact_mapping(mappings), "run-1")
    assert sandbox.antavo.requests_by_path["/customers/-/events"] - reads == 1  # one page, read once for three rules
    assert {s["rule"]: s["accepted"] for s in summaries} == {"reward_claimed": 1, "reward_points": 1, "points_added": 1}
    assert {i: sandbox.ometria.received[("custom_event", i)] for i in sandbox.ometria.events} == {
        oid(claim, "reward_claimed"): 1, oid(claim, "reward_points"): 1, oid(added, "points_added"): 1}
    deliver_all(rules, antavo_client, ometria_client, store, load_contact_mapping(mappings), "run-2")
    assert max(sandbox.ometria.received.values()) == 1  # the next run re-reads them and sends none again


def test_only_an_event_new_to_a_rule_of_its_action_wakes_the_delivery():
    from antavo_ometria.sync.events.delivery import Feed

    now = datetime(2026, 12, 4, 12, tzinfo=UTC)
    claim, added = antavo_event(1, "c1", 30, now), {**antavo_event(2, "c2", 10, now), "action": "point_add"}
    feed = Feed(now - timedelta(hours=4), now, {"reward": [claim], "point_add": [added]})
    # the point_add rule's cursor is past its event: the reward rule's earlier cursor does not make it new
    assert feed.newer_than({"reward": now - timedelta(minutes=20), "point_add": now - timedelta(minutes=5)}) == []
    assert feed.newer_than({"reward": now - timedelta(minutes=40), "point_add": now - timedelta(minutes=5)}) == [claim]
