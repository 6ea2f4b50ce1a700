"""A sensor that waits for new Antavo events matching a trigger rule.

Deferrable by default: the waiting happens in Airflow's triggerer (`AntavoEventTrigger`), not in a
worker slot. With `deferrable=False` it pokes instead (use `mode="reschedule"` to free the slot
between pokes). With no new event before `timeout`, the task is skipped; an error (Antavo down,
credentials revoked) fails it, so that the failure alert fires. `soft_fail` is deliberately not
used: Airflow turns every error of a soft-failing deferred sensor into a skip (apache/airflow#71255).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSensorTimeout, AirflowSkipException

from antavo_ometria.airflow.triggers import AntavoEventTrigger


class AntavoEventSensor(BaseSensorOperator):
    template_fields = ("action",)
    ui_color = "#f0eee4"

    def __init__(self, *, rule: str, action: str, antavo_conn_id: str = "antavo_default",
                 deferrable: bool = True, **kwargs: Any):
        kwargs.setdefault("timeout", 14 * 60)
        super().__init__(**kwargs)
        self.rule, self.action, self.antavo_conn_id, self.deferrable = rule, action, antavo_conn_id, deferrable

    def _since(self) -> datetime:
        """The rule's cursor in the state store; on a first run, the last 4 hours (Ometria's window)."""
        from antavo_ometria.airflow.hooks import StateStoreHook
        from antavo_ometria.ometria.contract import LATE_AFTER

        return StateStoreHook().get_conn().event_cursor(self.rule) or datetime.now(UTC) - LATE_AFTER

    def poke(self, context: Any) -> PokeReturnValue | bool:
        from antavo_ometria.airflow.hooks import AntavoHook
        from antavo_ometria.sync.events import new_matching_events

        since = self._since()
        found = new_matching_events(AntavoHook(self.antavo_conn_id).get_conn(), self.action, since,
                                    datetime.now(UTC))
        self.log.info("%d new %s event(s) since %s", len(found), self.action, since.isoformat())
        return PokeReturnValue(is_done=True, xcom_value={"found": len(found), "since": since.isoformat()}) \
            if found else False

    def execute(self, context: Any) -> Any:
        if not self.deferrable:
            try:
                return super().execute(context)
            except AirflowSensorTimeout as timeout:  # nothing new: skipped; any other error fails the task
                raise AirflowSkipException(f"no new {self.action} events: {timeout}") from None
        since = self._since().isoformat()
        self.log.info("deferring: waiting in the triggerer for %s events after %s", self.action, since)
        self.defer(
            trigger=AntavoEventTrigger(self.action, since, self.antavo_conn_id,
                                       poll_interval=float(self.poke_interval), timeout=float(self.timeout)),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Any, event: dict) -> dict:
        if event["status"] == "error":
            failure = AirflowException if event.get("retryable", True) else AirflowFailException
            raise failure(f"watching Antavo events failed: {event['message']}")
        if event["status"] == "timeout":
            raise AirflowSkipException(f"no new {self.action} events since {event['since']} "
                                       f"({event['polls']} checks)")
        self.log.info("%d new %s event(s) after %d check(s)", event["found"], self.action, event["polls"])
        return event
