"""The events DAG scheduled by an AssetWatcher instead of `@continuous` (plugins/antavo_feed_watcher.py): measured by
`python -m benchmarks.events --compare`, not shipped."""

from __future__ import annotations

import os

from airflow.sdk import Asset, AssetWatcher, dag, get_current_context, task
from antavo_feed_watcher import AntavoFeedWatcher  # the plugins folder is on the path

from antavo_ometria.airflow.dag_defaults import DAG_ARGS, PUSH_POOL
from antavo_ometria.airflow.dag_defaults import EVENTS_DAG as DAG_ID
from antavo_ometria.sync.events.rules import rule_actions
from antavo_ometria.sync.tables.settings import mappings_dir

ANTAVO_EVENTS = Asset("antavo_events", uri="antavo://events", watchers=[AssetWatcher(
    name="antavo_event_feed", trigger=AntavoFeedWatcher(sorted(set(rule_actions(mappings_dir()).values())),
                                                        poll_interval=float(os.environ["ANTAVO_OMETRIA_EVENT_POKE_SECONDS"])))])


@dag(dag_id=DAG_ID, schedule=[ANTAVO_EVENTS], tags=["antavo", "ometria", "events"], **DAG_ARGS)
def antavo_ometria_events():
    @task(pool=PUSH_POOL)
    def deliver_events() -> list[dict]:
        from antavo_ometria.airflow.hooks import AntavoHook, OmetriaHook, StateStoreHook
        from antavo_ometria.sync.events.delivery import deliver_all
        from antavo_ometria.sync.events.rules import load_rules
        from antavo_ometria.sync.tables.mapping import load_contact_mapping

        mapping = load_contact_mapping(mappings_dir())
        return deliver_all(load_rules(mappings_dir()), AntavoHook().get_conn(), OmetriaHook().get_conn(),
                           StateStoreHook().get_conn(), mapping, get_current_context()["run_id"],
                           late_policy=mapping.settings.late_event_policy)

    deliver_events()


antavo_ometria_events()
