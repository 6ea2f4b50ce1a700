"""Event delivery under the failures that break it: a rule failing for another reason, a lost lease, an outage that
fails the connection check, a member who left, an event held for its contact until Ometria accepts the contact."""

from datetime import UTC, datetime, timedelta

import pytest
from test_events import expire_leases, mappings, oid  # noqa: F401  (the fixture and helpers)

from antavo_ometria.sync.events.rules import load_rules
from antavo_ometria.sync.store.state import StateStore
from antavo_ometria.sync.tables.mapping import load_contact_mapping


def test_a_rule_that_fails_for_another_reason_does_not_stop_the_other_rules(sandbox, antavo_client, ometria_client,
                                                                             state_url, mappings):  # noqa: F811
    """A rule that cannot deliver, for any reason (here an Antavo 404 on a customer's rewards: deleted since the
    claim), does not stop the others: they deliver, and the task fails once all have run."""
    from antavo_ometria.sync.events.delivery import deliver_all

    store = StateStore(state_url)
    store.migrate()
    rules = load_rules(mappings)
    assert [r.name for r in rules] == ["reward_claimed", "reward_points"]  # the rewards-reading rule comes first
    claim = sandbox.antavo.claim_reward("c00000031", "rw-coffee", at=datetime.now(UTC) - timedelta(minutes=2))
    sandbox.antavo.faults.add({"path": "/customers/c00000031/rewards", "status": 404, "count": 10**6,
                               "body": {"error": {"message": "Customer not found", "code": 404}}})
    with pytest.raises(Exception):  # noqa: B017 - the first rule cannot deliver: the task goes red, as it should
        deliver_all(rules, antavo_client, ometria_client, store, load_contact_mapping(mappings), "run-1")
    # ...but the second rule, which needs no reward, must still have delivered its event
    assert sandbox.ometria.received[("custom_event", oid(claim, "reward_points"))] == 1


def test_a_delivery_that_lost_its_lease_stops_pushing(sandbox, antavo_client, ometria_client, state_url, mappings,  # noqa: F811
                                                      monkeypatch):
    """A delivery whose lease expired (a slow Ometria, a long contacts-first or rewards read) and was taken by
    another run stops pushing: the lease holder sends the rest, each event once."""
    from antavo_ometria.sync.events import delivery as events

    store = StateStore(state_url)
    store.migrate()
    rule = next(r for r in load_rules(mappings) if r.name == "reward_claimed")
    now = datetime.now(UTC)
    claims = [sandbox.antavo.claim_reward(f"c0000004{i}", "rw-coffee", at=now - timedelta(minutes=5 - i))
              for i in range(3)]
    real_push = events.push_isolating
    calls = []

    def push_then_lose_the_lease(*args, **kwargs):
        answer = real_push(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # the lease expires, and another run (`make events`) takes it
            expire_leases(store)
            assert store.take_lease(rule.name, "manual__other", events.LEASE_TTL)
        return answer

    monkeypatch.setattr(events, "push_isolating", push_then_lose_the_lease)
    with pytest.raises(events.EventsNotDelivered, match="passed to manual__other"):  # red: it did not send them all
        events.deliver(rule, antavo_client, ometria_client, store, load_contact_mapping(mappings), "run-1")
    assert store.lease_holder(rule.name) == "manual__other"
    # the lease is renewed before every push: the delivery that lost it pushes none of the others...
    assert [sandbox.ometria.received[("custom_event", oid(c))] for c in claims] == [1, 0, 0]
    store.release_lease(rule.name, "manual__other")
    events.deliver(rule, antavo_client, ometria_client, store, load_contact_mapping(mappings), "run-2")
    # ...and its cursor stayed before them, so the next delivery sends them, each once
    assert [sandbox.ometria.received[("custom_event", oid(c))] for c in claims] == [1, 1, 1]


@pytest.mark.airflow
def test_during_an_outage_the_next_run_backs_off_before_it_asks_the_apis_again(airflow_db, connections, monkeypatch):
    """An outage fails the connection check, the first task that asks the APIs: the next continuous run still backs
    off before it asks again, so an outage does not alert on every run."""
    from airflow.models import DagBag
    from airflow.utils.state import DagRunState

    from antavo_ometria.airflow import dag_defaults

    first = 60
    monkeypatch.setattr(dag_defaults, "EVENT_BACK_OFF", (timedelta(seconds=first), timedelta(seconds=first)))
    dag = DagBag(dag_folder=str(__import__("pathlib").Path(__file__).resolve().parents[1] / "dags")).get_dag(
        "antavo_ometria_events")
    connections.antavo.faults.add({"status": 503, "count": 10**6, "path": "/"})  # Antavo is down
    first_run = dag.test()
    assert first_run.state == DagRunState.FAILED
    failed_at = max(ti.end_date for ti in first_run.get_task_instances() if ti.end_date)
    second = dag.test()
    assert second.state == DagRunState.FAILED
    tis = {ti.task_id: ti for ti in second.get_task_instances()}
    assert tis["check_connections"].state == "failed"  # the outage fails the connection check
    # the outage goes on: the next attempt must wait the back-off before asking the APIs again
    asked_again = (tis["check_connections"].start_date - failed_at).total_seconds()
    assert asked_again >= first, f"the next run asked Antavo again {asked_again:.1f} s after the failure"


def test_an_event_of_a_member_who_left_does_not_put_them_back_on_the_list(parts_left):
    """A member the contact run removed from the list (recorded LEFT) whose event is still in the window (claimed
    just before leaving) is not pushed 'first' with `@add_to_lists`, which would put them back on the list."""
    sandbox, cid = parts_left
    stored = [v for (_, i), v in sandbox.ometria.contacts.items() if i == cid or v.get("id") == cid]
    assert all(8400 not in c.get("lists", []) for c in stored), stored


@pytest.fixture
def parts_left(sandbox, antavo_client, ometria_client, state_url, mappings):  # noqa: F811
    from antavo_ometria.sync.events.delivery import deliver

    store = StateStore(state_url)
    store.migrate()
    rule = next(r for r in load_rules(mappings) if r.name == "reward_claimed")
    cid = "c00000052"
    sandbox.antavo.by_id[cid]["status"] = "inactive"  # left the programme in Antavo
    store.record_accepted([(cid, "hash-before-leaving")], "v1", "contacts-run-1")
    store.contacts.record_left([cid], "contacts-run-2", "left the programme: removed from the list")
    sandbox.antavo.claim_reward(cid, "rw-coffee", at=datetime.now(UTC) - timedelta(minutes=30))
    deliver(rule, antavo_client, ometria_client, store, load_contact_mapping(mappings), "events-run-1")
    return sandbox, cid


@pytest.fixture
def claimed(state_url, mappings):  # noqa: F811
    """(the state store, the reward_claimed rule, the contact mapping) for a delivery of reward claims."""
    store = StateStore(state_url)
    store.migrate()
    rule = next(r for r in load_rules(mappings) if r.name == "reward_claimed")
    return store, rule, load_contact_mapping(mappings)


def test_an_event_whose_contact_ometria_rejected_is_sent_once_the_contact_is_accepted(sandbox, antavo_client,
                                                                                      ometria_client, claimed):
    """An event whose contact Ometria rejects is held with the reason, and the rule's cursor moves past it (a later
    event moved it on). It stays owed beyond Ometria's 4-hour window: once the contact is accepted, the next
    delivery sends it from the state store (late, under late_event_policy = send), once."""
    from antavo_ometria.sync.events.delivery import deliver

    store, rule, mapping = claimed
    now = datetime.now(UTC)
    stuck = sandbox.antavo.claim_reward("c00000053", "rw-coffee", at=now - timedelta(minutes=60))
    later = sandbox.antavo.claim_reward("c00000054", "rw-coffee", at=now - timedelta(minutes=5))
    sandbox.ometria.reject_ids.add("c00000053")  # the contact, e.g. its email belongs to another contact
    summary = deliver(rule, antavo_client, ometria_client, store, mapping, "run-1", now=now)  # green
    assert (summary["accepted"], summary["held"]) == (1, 1)
    assert sandbox.ometria.received[("custom_event", oid(later))] == 1
    assert [r["antavo_id"] for r in store.held_records(kind="event_held")] == [oid(stuck)]

    sandbox.ometria.reject_ids.clear()  # the contact is fixed in Ometria's eyes...
    past_window = now + timedelta(hours=4, minutes=30)
    summary = deliver(rule, antavo_client, ometria_client, store, mapping, "run-2", now=past_window)
    assert summary["accepted"] == 0  # ...but not yet accepted by a push: the event stays held
    assert ("custom_event", oid(stuck)) not in sandbox.ometria.received

    store.contacts.record_accepted([("c00000053", "h")], mapping.version, "contacts-run")  # the contact run delivered it
    summary = deliver(rule, antavo_client, ometria_client, store, mapping, "run-3", now=past_window)
    assert (summary["accepted"], summary["late"], summary["retried_accepted"]) == (1, 1, 1)
    assert sandbox.ometria.received[("custom_event", oid(stuck))] == 1
    assert store.held_records(kind="event_held") == []  # delivered: no longer held
    deliver(rule, antavo_client, ometria_client, store, mapping, "run-4", now=past_window)
    assert sandbox.ometria.received[("custom_event", oid(stuck))] == 1  # once
    assert sandbox.ometria.received[("custom_event", oid(later))] == 1


def test_an_event_held_for_a_contact_accepted_before_is_not_looked_up_again_on_every_run(sandbox, antavo_client,
                                                                                         ometria_client, claimed):
    """A customer Ometria accepted earlier (status sent) whose event is held for the customer (here: no longer found
    in Antavo) is not 'accepted since': later deliveries must not read, look up and hold the event again, run
    after run, for as long as the customer stays in that state."""
    from antavo_ometria.sync.events.delivery import deliver

    store, rule, mapping = claimed
    now = datetime.now(UTC)
    cid = "c00000055"
    store.contacts.record_accepted([(cid, "h")], mapping.version, "contacts-run")  # accepted long ago
    stuck = sandbox.antavo.claim_reward(cid, "rw-coffee", at=now - timedelta(minutes=60))
    sandbox.antavo.claim_reward("c00000056", "rw-coffee", at=now - timedelta(minutes=5))  # moves the cursor on
    del sandbox.antavo.by_id[cid]  # erased from Antavo since (or: its record now fails a check)
    summary = deliver(rule, antavo_client, ometria_client, store, mapping, "run-1", now=now)
    assert (summary["held"], summary["accepted"]) == (1, 1)
    past_window = now + timedelta(hours=4, minutes=30)
    tries = [deliver(rule, antavo_client, ometria_client, store, mapping, f"run-{n}", now=past_window)
             for n in (2, 3, 4)]
    rows = store.held_records(kind="event_held", antavo_id=oid(stuck), history=True)
    assert [s["retried"] for s in tries] == [0, 0, 0], (tries[-1]["held_reasons"], len(rows))
    assert len(rows) == 1, [(r["run_id"], r["released_at"]) for r in rows]


def test_an_owed_event_that_a_retry_of_the_same_run_cannot_push_stays_owed(sandbox, antavo_client, ometria_client,
                                                                           claimed):
    """An owed event held again by a run's first try (its customer briefly not found in Antavo) is tried again within
    the hour; not delivered by the retry of that same run (Ometria down), it must stay owed: the retry's clear of
    what its first try held must not drop it, nor may a later delivery miss it."""
    from antavo_ometria.sync.events.delivery import EventsNotDelivered, deliver

    store, rule, mapping = claimed
    now = datetime.now(UTC)
    cid = "c00000053"
    stuck = sandbox.antavo.claim_reward(cid, "rw-coffee", at=now - timedelta(minutes=60))
    sandbox.antavo.claim_reward("c00000054", "rw-coffee", at=now - timedelta(minutes=5))  # moves the cursor on
    sandbox.ometria.reject_ids.add(cid)
    deliver(rule, antavo_client, ometria_client, store, mapping, "run-1", now=now)
    sandbox.ometria.reject_ids.clear()
    store.contacts.record_accepted([(cid, "h")], mapping.version, "contacts-run")  # the contact run delivered it
    past_window = now + timedelta(hours=4, minutes=30)
    customer = sandbox.antavo.by_id.pop(cid)  # briefly not found in Antavo
    deliver(rule, antavo_client, ometria_client, store, mapping, "run-2", now=past_window)  # held again
    sandbox.antavo.by_id[cid] = customer
    an_hour_passes(store, oid(stuck))
    sandbox.ometria.faults.add({"status": 503, "count": 10**6, "path": "/v2/push"})
    with pytest.raises(EventsNotDelivered):  # Airflow's retry of run-2, while Ometria is down
        deliver(rule, antavo_client, ometria_client, store, mapping, "run-2", now=past_window)
    sandbox.ometria.faults.clear()
    deliver(rule, antavo_client, ometria_client, store, mapping, "run-3", now=past_window)
    assert sandbox.ometria.received[("custom_event", oid(stuck))] == 1, store.held_records(
        kind="event_held", antavo_id=oid(stuck), history=True)


def delivered_then_killed(sandbox, antavo_client, ometria_client, claimed, monkeypatch):
    """An owed event pushed and recorded sent by a delivery killed before it released the event's held record; then
    a later delivery. Returns (store, the event's Ometria id)."""
    from antavo_ometria.sync.events import delivery

    store, rule, mapping = claimed
    now = datetime.now(UTC)
    stuck = sandbox.antavo.claim_reward("c00000053", "rw-coffee", at=now - timedelta(minutes=60))
    sandbox.antavo.claim_reward("c00000054", "rw-coffee", at=now - timedelta(minutes=5))
    sandbox.ometria.reject_ids.add("c00000053")
    delivery.deliver(rule, antavo_client, ometria_client, store, mapping, "run-1", now=now)
    sandbox.ometria.reject_ids.clear()
    store.contacts.record_accepted([("c00000053", "h")], mapping.version, "contacts-run")
    past_window = now + timedelta(hours=4, minutes=30)

    def killed(*args, **kwargs):
        raise SystemExit("worker killed")

    with monkeypatch.context() as patch:
        patch.setattr(delivery, "_record_held", killed)
        with pytest.raises(SystemExit):
            delivery.deliver(rule, antavo_client, ometria_client, store, mapping, "run-2", now=past_window)
    assert sandbox.ometria.received[("custom_event", oid(stuck))] == 1
    delivery.deliver(rule, antavo_client, ometria_client, store, mapping, "run-3", now=past_window)
    return store, oid(stuck)


def test_an_owed_event_pushed_by_a_delivery_killed_before_it_released_it_is_not_sent_again(
        sandbox, antavo_client, ometria_client, claimed, monkeypatch):
    store, key = delivered_then_killed(sandbox, antavo_client, ometria_client, claimed, monkeypatch)
    assert sandbox.ometria.received[("custom_event", key)] == 1


def test_an_owed_event_pushed_by_a_delivery_killed_before_it_released_it_is_no_longer_shown_held(
        sandbox, antavo_client, ometria_client, claimed, monkeypatch):
    store, key = delivered_then_killed(sandbox, antavo_client, ometria_client, claimed, monkeypatch)
    assert [r["antavo_id"] for r in store.held_records(kind="event_held")] == []


def an_hour_passes(store: StateStore, key: str) -> None:
    """The event's held record as it is an hour later: due a retry (delivery.HELD_RETRY)."""

    held = store.db.table("sync_held_records")
    with store.db.engine.begin() as conn:
        conn.execute(held.update().where(held.c.antavo_id == key).values(
            created_at=datetime.now(UTC) - timedelta(hours=1, minutes=1)))
