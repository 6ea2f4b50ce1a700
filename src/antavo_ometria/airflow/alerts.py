"""Failure notification: when a task fails for good, POST a short JSON summary to a webhook.

Set the Airflow Variable `antavo_ometria_alert_webhook` (or AIRFLOW_VAR_ANTAVO_OMETRIA_ALERT_WEBHOOK) to
a Slack/Teams/incident webhook URL. The message carries the DAG, run, task, try and the error; no
payloads, no credentials.
"""

from __future__ import annotations

import logging
import re

import requests

log = logging.getLogger(__name__)
VARIABLE = "antavo_ometria_alert_webhook"
SECRET_LIKE = re.compile(r"(?i)(password|secret|api[_-]?key|token|auth[a-z]*)(['\"]?\s*[:=]\s*)\S+")


def redact(text: str) -> str:
    return SECRET_LIKE.sub(r"\1\2[redacted]", text)


def _back_off_note(context) -> str:
    """For the events DAG: how long its next delivery attempt waits, as it backs off while the APIs fail."""
    from datetime import UTC, datetime

    from antavo_ometria.airflow.dag_defaults import EVENT_BACK_OFF, EVENTS_DAG
    from antavo_ometria.sync.events.delivery import back_off

    if context["ti"].dag_id != EVENTS_DAG:
        return ""
    try:
        failing_since = context.get("prev_end_date_success") or context["dag_run"].start_date
    except Exception:  # no run history to read: the alert goes out without the note
        return ""
    wait = back_off(failing_since, datetime.now(UTC), *EVENT_BACK_OFF)
    return (f"; deliveries back off while this lasts: the next attempt waits {wait.total_seconds() / 60:.1f} min "
            f"(at most {EVENT_BACK_OFF[1].total_seconds() / 60:g}) and sends everything not delivered meanwhile")


def notify_failure(context) -> None:
    """Airflow `on_failure_callback`: tell the webhook, if one is configured. Never raises."""
    from airflow.sdk import Variable

    url = Variable.get(VARIABLE, default=None)
    if not url:
        return
    ti = context["ti"]
    error = context.get("exception")
    message = {
        "text": f"Antavo → Ometria sync: {ti.dag_id}.{ti.task_id} failed (try {ti.try_number}) in run {ti.run_id}"
                + _back_off_note(context),
        "dag_id": ti.dag_id, "task_id": ti.task_id, "run_id": ti.run_id, "try_number": ti.try_number,
        "error": redact(f"{type(error).__name__}: {error}")[:2000] if error else None,
    }
    try:
        requests.post(url, json=message, timeout=10).raise_for_status()
    except requests.RequestException as exc:
        log.error("could not send the failure notification: %s", type(exc).__name__)
