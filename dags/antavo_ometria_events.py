"""
### Antavo → Ometria event triggers

Turns Antavo events into Ometria custom events that start email campaigns — for example, a customer
claiming a reward becomes a `loyalty_reward_claimed` event whose properties (reward name,
description, …) fill the tags of the Ometria email. The rules are rows in
`include/mappings/triggers.csv`: the Antavo action, the Ometria event type, and where each property
comes from (`event.*`, `reward.*`, `customer.*`).

**Continuous:** one run at a time, the next as soon as one ends. A deferrable sensor waits in the triggerer (no
worker slot) and reads Antavo's event feed every `events.poll_seconds` (settings.toml, default 5), one read for
every rule from a minute before the sensor started; the first event some rule has not pushed or decided on (not one
it holds back or had rejected) wakes `deliver_events`, which reads the feed once for all rules and pushes each new
event per rule: the contact first if Ometria does not have it yet, then the custom event (`id` = `<rule>:<Antavo
event ID>`, so two rules on one action each deliver) — once when Ometria's answer arrives; a push whose answer is
lost (a timeout, a dropped connection, a gateway's 502 or 504) is not repeated at once but by the next delivery,
with the same id, and the report counts it (whether Ometria deduplicates a repeated id is not documented). A claim
reaches Ometria in about 6 s (p95 8 s at 5 s polling, `make bench-events`).
The sensor fails when Antavo cannot be read; events that cannot be pushed fail the delivery, and the next run
sends them; an event Ometria rejects is held with the reason and retried by every run while it can still start
an automation. After a failed run the first task, `back_off`, waits in the triggerer (as long as deliveries have been failing, 1 to 15
minutes) before it reads Antavo again, so an outage neither alerts every minute nor hammers the APIs; the alert
says how long.

**Catch-up:** every delivery re-reads Ometria's whole 4-hour window (or from the rule's cursor, when further
back), so what the fast path missed (a triggerer restart, an outage, an event Antavo lists late) is sent by the
next delivery; a quiet run ends after `ANTAVO_OMETRIA_EVENT_WAIT_SECONDS` (14 minutes) with such a delivery.
Pushed ids are skipped, and a lease in the state store keeps two deliveries of one rule from pushing at once.
Older events cannot start an automation and follow `events.late_event_policy` (send and warn, or skip); more
than 1,000 events on one timestamp are staggered in 5-minute steps.
"""

from __future__ import annotations

import os

from airflow.sdk import dag, get_current_context, task

from antavo_ometria.airflow.dag_defaults import DAG_ARGS, EVENT_BACK_OFF, PUSH_POOL
from antavo_ometria.airflow.dag_defaults import EVENTS_DAG as DAG_ID
from antavo_ometria.airflow.sensors import AntavoEventSensor, RunBackOff
from antavo_ometria.sync.events.rules import rule_actions
from antavo_ometria.sync.tables.settings import mappings_dir, read_settings

# how often the trigger asks Antavo for new events (`events.poll_seconds`; tests override it by the variable)
POKE_SECONDS = float(os.environ.get("ANTAVO_OMETRIA_EVENT_POKE_SECONDS")
                     or read_settings(mappings_dir() / "settings.toml").settings.event_poll_seconds)
# a quiet run ends after this wait; its delivery still re-reads the 4-hour window: the catch-up by cursor
WAIT_SECONDS = float(os.environ.get("ANTAVO_OMETRIA_EVENT_WAIT_SECONDS", 14 * 60))


@dag(
    dag_id=DAG_ID,
    schedule="@continuous",  # one run at a time, the next one as soon as it ends
    doc_md=__doc__,
    tags=["antavo", "ometria", "events"],
    **DAG_ARGS,
)
def antavo_ometria_events():
    @task
    def check_connections() -> list[str]:
        """Connect first: a signed Antavo request, an authenticated Ometria call, and the configured list."""
        from antavo_ometria.airflow.hooks import connect_or_fail, fail_fast_on
        from antavo_ometria.problems import ConfigError
        from antavo_ometria.sync.tables.mapping import load_contact_mapping

        with fail_fast_on(ConfigError):
            list_id = load_contact_mapping(mappings_dir()).settings.list_id
        return connect_or_fail(list_id, staging=False)

    @task
    def check_rules() -> list[str]:
        """Validate the trigger rules; a broken file stops the run before any request."""
        from antavo_ometria.airflow.hooks import fail_fast_on
        from antavo_ometria.problems import ConfigError
        from antavo_ometria.sync.events.rules import load_rules

        with fail_fast_on(ConfigError):
            return [rule.name for rule in load_rules(mappings_dir())]

    # runs after the wait even when nothing new woke it (skipped): it re-reads the last 4 hours, so an event
    # Antavo made visible late is still sent and a rejected one retried; a failed wait does not run it
    @task(pool=PUSH_POOL, trigger_rule="none_failed")
    def deliver_events() -> list[dict]:
        """Push every rule's new events to Ometria as custom events, from one read of Antavo's event feed: each
        once when Ometria's answer arrives; one whose answer was lost is sent again by the next try, with the same
        id, and counted in the report."""
        import logging

        from antavo_ometria.airflow.hooks import AntavoHook, OmetriaHook, StateStoreHook, fail_fast_on
        from antavo_ometria.sync.events.delivery import deliver_all
        from antavo_ometria.sync.events.report import format_event_report
        from antavo_ometria.sync.events.rules import load_rules
        from antavo_ometria.sync.tables.mapping import load_contact_mapping
        from antavo_ometria.transport import ApiError

        mapping = load_contact_mapping(mappings_dir())
        context = get_current_context()
        with fail_fast_on(ApiError):  # e.g. refused credentials; undelivered events and 5xx are retried
            summaries = deliver_all(load_rules(mappings_dir()), AntavoHook().get_conn(), OmetriaHook().get_conn(),
                                    StateStoreHook().get_conn(), mapping, context["run_id"],
                                    late_policy=mapping.settings.late_event_policy, attempt=context["ti"].try_number)
        logging.getLogger(__name__).info("\n%s", format_event_report(summaries))
        return summaries

    rules = rule_actions(mappings_dir())
    back_off = RunBackOff(task_id="back_off", back_off=EVENT_BACK_OFF,
                          doc_md="After failed runs, waits (in the triggerer) before asking Antavo and Ometria again.")
    checked = back_off >> check_connections() >> check_rules()
    if rules:
        wait = AntavoEventSensor(task_id="wait_for_events", rules=rules,
                                 poke_interval=POKE_SECONDS, timeout=WAIT_SECONDS,
                                 doc_md="Waits (in the triggerer) for new Antavo events of any rule: one read of "
                                        "the feed each time serves them all.")
        checked >> wait >> deliver_events()


antavo_ometria_events()
