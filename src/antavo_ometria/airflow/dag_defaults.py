"""What every DAG of the sync shares: ids, the push pool, owner, retries, the failure notification."""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum

from antavo_ometria.airflow.alerts import notify_failure

CONTACTS_DAG = "antavo_ometria_contacts"
EVENTS_DAG = "antavo_ometria_events"
PUSH_POOL = "ometria_push"  # caps concurrent pushes across DAGs: Ometria's rate limit is per account

RETRY_DELAY = timedelta(seconds=float(os.environ.get("ANTAVO_OMETRIA_RETRY_DELAY_SECONDS", 30)))
# while event deliveries fail, each attempt waits as long as they have been failing, within these: an outage
# alerts about every 15 minutes, not every minute (tests shorten them)
EVENT_BACK_OFF = (timedelta(seconds=float(os.environ.get("ANTAVO_OMETRIA_EVENT_BACK_OFF_SECONDS", 60))),
                  timedelta(seconds=float(os.environ.get("ANTAVO_OMETRIA_EVENT_BACK_OFF_MAX_SECONDS", 15 * 60))))
DEFAULT_ARGS = {"owner": "data-engineering", "retries": 2, "retry_delay": RETRY_DELAY,
                "on_failure_callback": notify_failure}
# one run at a time (each run resumes where the last one got to), from the first scheduled interval on
DAG_ARGS = {"start_date": pendulum.datetime(2026, 1, 1, tz="UTC"), "catchup": False, "max_active_runs": 1,
            "default_args": DEFAULT_ARGS}
