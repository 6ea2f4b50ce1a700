"""The events DAG's fast path: what wakes the sensor (an event some rule has not decided on yet), what does not
(what every rule pushed, held or had rejected: the delivery at the end of the quiet wait retries those), how far
the cursor moves, and a quiet wait that survives a triggerer restart.

Counts come from the sandboxes: what Antavo was asked, what Ometria stored per id."""

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from test_events import mappings, oid, parts  # noqa: F401  (fixtures, helpers)

from antavo_ometria.antavo.records import event_time
from antavo_ometria.sync.events.delivery import EventsNotDelivered, deliver, read_feed, watch


def next_poll(antavo_client, watched) -> list[dict]:
    """What one poll of the trigger the sensor would defer to finds."""
    feed = read_feed(antavo_client, set(watched.since), min(watched.since.values()), datetime.now(UTC))
    return feed.newer_than(watched.since, watched.settled)


def test_held_and_rejected_events_do_not_wake_the_sensor_on_every_poll(
        parts, sandbox, antavo_client, ometria_client):  # noqa: F811
    """An event held for its customer (deleted from Antavo) and one Ometria rejects are decided on, not pushed: were
    they new to the sensor, the continuous DAG would run back to back. The delivery at the end of the quiet wait
    retries the rejected one; a claim listed meanwhile still wakes the sensor."""
    rule, store, mapping = parts
    now = datetime.now(UTC)
    orphan = sandbox.antavo.add_event("c09999999", "reward", {"reward": "rw-coffee"}, at=now - timedelta(seconds=20))
    refused = sandbox.antavo.claim_reward("c00000161", "rw-coffee", at=now - timedelta(seconds=10))
    sandbox.ometria.reject_ids.add(oid(refused))
    summary = deliver(rule, antavo_client, ometria_client, store, mapping, "run-1")
    assert (summary["held"], summary["rejected"]) == (1, 1)
    rules = {rule.name: rule.action}
    watched = watch(store, antavo_client, rules, datetime.now(UTC))
    assert (watched.new, next_poll(antavo_client, watched)) == ([], [])
    assert {orphan["id"], refused["id"]} <= set(watched.settled[rule.action])  # in the minute before the cursor

    again = deliver(rule, antavo_client, ometria_client, store, mapping, "run-2")  # the end of the quiet wait
    assert (again["retried"], again["rejected"]) == (1, 1)
    watched = watch(store, antavo_client, rules, datetime.now(UTC))
    assert (watched.new, next_poll(antavo_client, watched)) == ([], [])
    claim = sandbox.antavo.claim_reward("c00000162", "rw-coffee", at=datetime.now(UTC))
    assert [e["id"] for e in next_poll(antavo_client, watched)] == [claim["id"]]
    assert sandbox.ometria.received[("custom_event", oid(refused))] == 0  # retried by each delivery, never stored


def test_the_cursor_stays_just_before_the_first_claim_not_delivered_though_later_ones_were_read(
        parts, sandbox, antavo_client, ometria_client):  # noqa: F811
    """The cursor moves to the end of what a delivery read only when nothing read is left undelivered."""
    rule, store, mapping = parts
    now = datetime.now(UTC)
    first, second = (sandbox.antavo.claim_reward(f"c0000017{i}", "rw-coffee", at=now - timedelta(minutes=3 - i))
                     for i in range(2))
    sandbox.ometria.faults.add({"status": 503, "count": 10**6, "path": "/v2/push", "after": 2})  # contacts, `first`
    with pytest.raises(EventsNotDelivered):
        deliver(rule, antavo_client, ometria_client, store, mapping, "run-1")
    assert store.event_cursor(rule.name) == event_time(second) - timedelta(microseconds=1)
    assert [sandbox.ometria.received[("custom_event", oid(c))] for c in (first, second)] == [1, 0]
    assert [e["id"] for e in watch(store, antavo_client, {rule.name: rule.action}, datetime.now(UTC)).new] == [
        second["id"]]  # the next run wakes its delivery at once

    sandbox.ometria.faults.clear()
    deliver(rule, antavo_client, ometria_client, store, mapping, "run-2")
    assert store.event_cursor(rule.name) >= now
    assert [sandbox.ometria.received[("custom_event", oid(c))] for c in (first, second)] == [1, 1]


def test_a_restarted_trigger_keeps_the_quiet_wait_s_end(connections):
    """The trigger's kwargs carry the end of the quiet wait as a UTC moment: recreated from them after a triggerer
    restart, it ends the wait when the first one would have, not `timeout` after the restart."""
    from antavo_ometria.airflow.triggers import AntavoEventTrigger

    first = AntavoEventTrigger({"reward": datetime.now(UTC).isoformat()}, poll_interval=0.05, timeout=1)
    _, kwargs = first.serialize()
    time.sleep(1.1)
    restarted = AntavoEventTrigger(**kwargs)  # what the triggerer builds from the stored kwargs
    assert restarted.deadline == first.deadline
    event = asyncio.run(asyncio.wait_for(anext(restarted.run()), 10)).payload
    assert (event["status"], event["polls"]) == ("timeout", 1)


def test_the_sensor_defers_with_the_quiet_wait_s_end_and_what_its_rules_decided_on(
        parts, connections, antavo_client, ometria_client, monkeypatch):  # noqa: F811
    """After a delivery the sensor defers: the trigger watches from a minute before the cursor, knows the ids already
    decided on and the moment its wait ends. A claim listed before the sensor starts wakes the delivery at once."""
    from airflow.sdk.exceptions import TaskDeferred

    from antavo_ometria.airflow.sensors import AntavoEventSensor
    from antavo_ometria.sync.events.delivery import WAKE_OVERLAP

    rule, store, mapping = parts
    claim = connections.antavo.claim_reward("c00000181", "rw-coffee", at=datetime.now(UTC) - timedelta(seconds=3))
    deliver(rule, antavo_client, ometria_client, store, mapping, "run-1")
    sensor = AntavoEventSensor(task_id="wait", rules={rule.name: rule.action}, poke_interval=5, timeout=840)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    trigger = deferred.value.trigger
    (since,) = (datetime.fromisoformat(moment) for moment in trigger.since.values())  # a minute before the later of
    assert store.event_cursor(rule.name) - WAKE_OVERLAP <= since <= datetime.now(UTC) - WAKE_OVERLAP  # cursor, read
    assert trigger.settled == {rule.action: [claim["id"]]}
    wait = datetime.fromisoformat(trigger.deadline) - datetime.now(UTC)
    assert timedelta(minutes=13) < wait <= timedelta(minutes=14)

    connections.antavo.claim_reward("c00000182", "rw-coffee", at=datetime.now(UTC))
    assert sensor.execute({})["found"] == 1
    assert sensor.poke({}).is_done
    assert claim["id"] in trigger.settled[rule.action]  # the delivered claim is handed over as decided


def test_a_rule_no_delivery_has_run_for_yet_does_not_have_every_poll_read_the_whole_4_hour_feed(
        sandbox, antavo_client, state_url):
    """A fresh install, or a rule just added to triggers.csv, has no cursor: the sensor watches it from the start of
    Ometria's 4-hour window. When its action is quiet nothing there is new, so the sensor defers and each poll of
    the trigger (every 5 s, for the 14-minute quiet wait) reads Antavo's whole feed of those 4 hours, every action, a
    page per 100 events, against Antavo's 1,500 requests a minute shared with the contacts DAG. A poll should read
    about the last minute, as it does once a delivery has set the cursor (or the first run should deliver at once)."""
    from antavo_ometria.sync.store.state import StateStore

    store = StateStore(state_url)
    store.migrate()
    now = datetime.now(UTC)
    for n in range(450):  # the rest of the programme goes on: points, checkouts...
        sandbox.antavo.add_event(f"c{200 + n % 50:08d}", "point_add", {"points": 5},
                                 at=now - timedelta(hours=3, minutes=50) + timedelta(seconds=30 * n))
    watched = watch(store, antavo_client, {"reward_claimed": "reward"}, datetime.now(UTC))
    assert watched.new == []  # nothing to wake for: the sensor defers
    reads = sandbox.antavo.requests_by_path["/customers/-/events"]
    next_poll(antavo_client, watched)
    assert sandbox.antavo.requests_by_path["/customers/-/events"] - reads == 1
