"""A sensor that waits for new Antavo events matching any trigger rule: one read of the feed serves them all.

Deferrable by default: the waiting happens in Airflow's triggerer (`AntavoEventTrigger`), not in a
worker slot. With `deferrable=False` it pokes instead (use `mode="reschedule"` to free the slot
between pokes). With no new event before `timeout`, the task is skipped; an error (Antavo down,
credentials revoked) fails it, so that the failure alert fires. `soft_fail` is deliberately not
used: Airflow turns every error of a soft-failing deferred sensor into a skip (apache/airflow#71255).

`RunBackOff`, the events DAG's first task, waits (in the triggerer) after a failed run as long as deliveries have been
failing (1 to 15 minutes), before anything asks Antavo or Ometria again: an outage neither alerts every minute nor
hammers the APIs.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import BaseOperator, BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSensorTimeout, AirflowSkipException

from antavo_ometria.airflow.dag_defaults import EVENT_BACK_OFF
from antavo_ometria.airflow.triggers import AntavoEventTrigger


class AntavoEventSensor(BaseSensorOperator):
    template_fields = ("rules",)
    ui_color = "#f0eee4"

    def __init__(self, *, rules: dict[str, str], antavo_conn_id: str = "antavo_default",
                 deferrable: bool = True, **kwargs: Any):
        kwargs.setdefault("timeout", 14 * 60)
        super().__init__(**kwargs)
        self.rules, self.antavo_conn_id, self.deferrable = dict(rules), antavo_conn_id, deferrable  # rule → action
        self.actions = sorted(set(self.rules.values()))

    def _watch(self):
        """One read of Antavo's feed and the state store: what is new to a rule already, and what to watch for."""
        from antavo_ometria.airflow.hooks import AntavoHook, StateStoreHook
        from antavo_ometria.sync.events.delivery import watch

        return watch(StateStoreHook().get_conn(), AntavoHook(self.antavo_conn_id).get_conn(), self.rules,
                     datetime.now(UTC))

    def _found(self, watched, polls: int) -> dict:
        since = min(watched.since.values()).isoformat()
        self.log.info("%d new %s event(s) after %s", len(watched.new), "/".join(self.actions), since)
        return {"status": "found", "found": len(watched.new), "since": since, "polls": polls}

    def poke(self, context: Any) -> PokeReturnValue | bool:
        watched = self._watch()
        return PokeReturnValue(is_done=True, xcom_value=self._found(watched, 1)) if watched.new else False

    def execute(self, context: Any) -> Any:
        if not self.deferrable:
            try:
                return super().execute(context)
            except AirflowSensorTimeout as timeout:  # nothing new: skipped; any other error fails the task
                raise AirflowSkipException(f"no new {'/'.join(self.actions)} events: {timeout}") from None
        watched = self._watch()
        if watched.new:  # listed since the delivery read the feed: no need to wait
            return self._found(watched, 1)
        since = {action: moment.isoformat() for action, moment in watched.since.items()}
        deadline = datetime.now(UTC) + timedelta(seconds=float(self.timeout))  # kept by a restarted triggerer
        self.log.info("deferring: waiting in the triggerer for new events after %s (%d already decided on)", since,
                      sum(len(ids) for ids in watched.settled.values()))
        self.defer(
            trigger=AntavoEventTrigger(since, self.antavo_conn_id, poll_interval=float(self.poke_interval),
                                       settled=watched.settled, deadline=deadline.isoformat()),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Any, event: dict) -> dict:
        if event["status"] == "error":
            failure = AirflowException if event.get("retryable", True) else AirflowFailException
            raise failure(f"watching Antavo events failed: {event['message']}")
        if event["status"] == "timeout":
            raise AirflowSkipException(f"no new {'/'.join(self.actions)} events since {event['since']} "
                                       f"({event['polls']} checks)")
        self.log.info("%d new %s event(s) after %d check(s)", event["found"], "/".join(self.actions), event["polls"])
        return event


class RunBackOff(BaseOperator):
    """Waits in the triggerer, after failed runs, as long as deliveries have been failing (`back_off`: the first and
    the longest wait); at once when the run before succeeded."""

    ui_color = "#f0eee4"

    def __init__(self, *, back_off: tuple[timedelta, timedelta] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.back_off = back_off or EVENT_BACK_OFF

    def _back_off(self, context: Any) -> float:
        """Seconds to wait before the first look at Antavo: longer while the runs before this one failed."""
        from antavo_ometria.sync.events.delivery import back_off

        try:
            previous = context["ti"].get_previous_dagrun()
            if previous is None or previous.state != "failed":
                return 0.0
            failing_since = context["prev_end_date_success"] or previous.start_date
        except Exception as exc:  # no run history (a bare `task test`): no back-off, never a failure
            self.log.info("no back-off: the previous run could not be read (%s)", type(exc).__name__)
            return 0.0
        wait = back_off(failing_since, datetime.now(UTC), *self.back_off).total_seconds()
        self.log.warning("deliveries have failed since %s: backing off %.0f s before asking Antavo and Ometria again "
                         "(nothing is lost: the delivery reads from each rule's cursor)", failing_since.isoformat(), wait)
        return wait


    def execute(self, context: Any) -> None:
        from airflow.providers.standard.triggers.temporal import DateTimeTrigger

        delay = self._back_off(context)
        if delay > 0:
            self.defer(trigger=DateTimeTrigger(moment=datetime.now(UTC) + timedelta(seconds=delay)),
                       method_name="execute_complete")

    def execute_complete(self, context: Any, event: Any = None) -> None:
        self.log.info("backed off; the run goes on")
